"""`make-demo`: a small, real dataset with known timestamps, generated offline in seconds.

Each clip (16 kHz mono, 3-9 s) holds a sine beep (low/mid/high pitch) and a white-noise burst at
known onsets over faint background noise, plus a spoken word when `espeak-ng` is installed.
Questions ask what happens when, in three forms: instruct ("The beep starts at 2.4s."), think
(`<think>` reasoning with the event times, then the answer) and captioner. A byte-level BPE tokenizer
trained on the demo text (well under the tiny model's 1024 ids) is written next to the manifests.

Sized for the quickstart: the tiny model (5 s windows, 125 audio tokens) at seq_len 512-1024 sees
each clip as 1-2 windows and a 40-90 token conversation. With `--long-clip-windows W` (opt-in, a
separate folder) every clip spans 2..W windows with its events in any window instead
(notebooks/rote_ablation.ipynb).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

from af_next_jax.config import SAMPLE_RATE, tiny
from af_next_jax.data.tokenizer import PAD_CANDIDATES, SPECIAL_TOKENS

PITCHES = {"low": 330.0, "mid": 880.0, "high": 2200.0}
WORDS = ("hello", "seven", "yellow", "river", "music", "window")
SYSTEM_PROMPT = "You are a helpful assistant that listens to audio."
DEMO_VOCAB_SIZE = 640


def _seconds(value: float) -> str:
    return f"{value:.1f}s"


def _synthesize_word(word: str) -> np.ndarray | None:
    """The spoken word at 16 kHz from espeak-ng, or None when espeak-ng is not installed."""
    if shutil.which("espeak-ng") is None:
        return None
    import soundfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "word.wav")
        result = subprocess.run(["espeak-ng", "-w", path, "-s", "160", word], capture_output=True, timeout=30)
        if result.returncode != 0 or not os.path.exists(path):
            return None
        samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        import librosa

        samples = librosa.resample(samples, orig_sr=rate, target_sr=SAMPLE_RATE)
    return 0.6 * samples / max(1e-6, float(np.abs(samples).max()))


def _make_clip(rng: np.random.Generator, word_audio: dict) -> tuple[np.ndarray, dict]:
    duration = float(rng.choice(np.arange(3.0, 9.01, 0.5)))
    samples = (0.003 * rng.standard_normal(int(duration * SAMPLE_RATE))).astype(np.float32)
    pitch = str(rng.choice(list(PITCHES)))
    lengths = {"beep": float(rng.choice([0.3, 0.5, 0.8])), "noise": float(rng.choice([0.3, 0.5]))}
    # One event in each half of the clip, in random order; onsets on a 0.1 s grid.
    first_kind, second_kind = ("beep", "noise") if rng.random() < 0.5 else ("noise", "beep")
    starts = {first_kind: round(float(rng.uniform(0.2, duration / 2 - lengths[first_kind])), 1),
              second_kind: round(float(rng.uniform(duration / 2, duration - lengths[second_kind] - 0.1)), 1)}
    events = _add_beep_and_noise(rng, samples, duration, pitch, starts, lengths)
    if word_audio:
        word = str(rng.choice(list(word_audio)))
        speech = word_audio[word][: int(1.2 * SAMPLE_RATE)]
        # The word goes in the longest silent gap, if it fits there.
        spans = sorted([events["beep"], events["noise"]])
        gaps = [(0.1, spans[0][0]), (spans[0][1], spans[1][0]), (spans[1][1], duration)]
        gap_start, gap_end = max(gaps, key=lambda gap: gap[1] - gap[0])
        if gap_end - gap_start >= len(speech) / SAMPLE_RATE + 0.2:
            word_start = round(gap_start + 0.1, 1)
            first = int(word_start * SAMPLE_RATE)
            samples[first:first + len(speech)] += speech
            events["word"] = {"text": word, "span": [word_start, round(word_start + len(speech) / SAMPLE_RATE, 1)]}
    return np.clip(samples, -1.0, 1.0), events


def _add_beep_and_noise(rng: np.random.Generator, samples: np.ndarray, duration: float, pitch: str,
                        starts: dict, lengths: dict) -> dict:
    """Adds the beep and the noise burst to `samples` in place; returns the clip's events."""
    beep_start, noise_start = starts["beep"], starts["noise"]
    beep_length, noise_length = lengths["beep"], lengths["noise"]
    events = {"duration": duration, "pitch": pitch, "beep": [beep_start, round(beep_start + beep_length, 1)],
              "noise": [noise_start, round(noise_start + noise_length, 1)]}
    t = np.arange(int(beep_length * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = np.minimum(1.0, np.minimum(t, beep_length - t) / 0.01)  # 10 ms ramps, no clicks
    first = int(beep_start * SAMPLE_RATE)
    samples[first:first + len(t)] += (0.4 * envelope * np.sin(2 * np.pi * PITCHES[pitch] * t)).astype(np.float32)
    first = int(noise_start * SAMPLE_RATE)
    samples[first:first + int(noise_length * SAMPLE_RATE)] += (
        0.3 * rng.standard_normal(int(noise_length * SAMPLE_RATE))).astype(np.float32)
    return events


def _make_long_clip(rng: np.random.Generator, max_windows: int, window_seconds: float) -> tuple[np.ndarray, dict]:
    """A clip of 2..max_windows encoder windows with each event in a window drawn independently.

    Events land in any window (both may share one), so an onset can only be stated by reading the
    time across window boundaries: what RoTE's window axis encodes. No spoken word (the ablation is
    about event times).
    """
    windows = int(rng.integers(2, max_windows + 1))
    # The last window is at least half full, so the clip really spans `windows` windows.
    duration = round(float(rng.uniform((windows - 0.5) * window_seconds, windows * window_seconds - 0.1)), 1)
    samples = (0.003 * rng.standard_normal(int(duration * SAMPLE_RATE))).astype(np.float32)
    pitch = str(rng.choice(list(PITCHES)))
    lengths = {"beep": float(rng.choice([0.3, 0.5, 0.8])), "noise": float(rng.choice([0.3, 0.5]))}
    starts = {}
    while not starts or abs(starts["beep"] - starts["noise"]) < 1.0:  # the events never overlap
        for kind in ("beep", "noise"):
            window = int(rng.integers(0, windows))
            window_end = min((window + 1) * window_seconds, duration - 0.1)
            low = window * window_seconds + (0.2 if window == 0 else 0.0)
            starts[kind] = round(float(rng.uniform(low, window_end - lengths[kind])), 1)
    events = _add_beep_and_noise(rng, samples, duration, pitch, starts, lengths)
    events["windows"] = windows
    events["window_seconds"] = window_seconds
    return np.clip(samples, -1.0, 1.0), events


def _questions(events: dict) -> list[tuple[str, str, str, str]]:
    """(task, variant, question, answer) tuples about one clip."""
    beep, noise, pitch = events["beep"], events["noise"], events["pitch"]
    first, second = ("beep", "noise burst") if beep[0] < noise[0] else ("noise burst", "beep")
    timeline = (f"<think>A {pitch}-pitched tone plays from {_seconds(beep[0])} to {_seconds(beep[1])}; "
                f"a noise burst runs from {_seconds(noise[0])} to {_seconds(noise[1])}.")
    if "word" in events:
        timeline += f" Someone says \"{events['word']['text']}\" at {_seconds(events['word']['span'][0])}."
    timeline += "</think>"
    beep_answer = f"The beep starts at {_seconds(beep[0])}."
    noise_answer = f"The noise burst starts at {_seconds(noise[0])}."
    items = [
        ("beep_onset", "instruct", "At what time does the beep start?", beep_answer),
        ("noise_onset", "instruct", "When does the noise burst begin?", noise_answer),
        ("pitch", "instruct", "Is the beep low, mid or high pitched?", f"The beep is {pitch} pitched."),
        ("order", "think", "Which comes first, the beep or the noise burst?",
         f"{timeline}The {first} comes first, then the {second}."),
        ("beep_onset", "think", "At what time does the beep start?", timeline + beep_answer),
        ("caption", "captioner", "Describe the audio with timestamps.",
         f"A {pitch} beep from {_seconds(beep[0])} to {_seconds(beep[1])} and a noise burst from "
         f"{_seconds(noise[0])} to {_seconds(noise[1])}."),
    ]
    if "word" in events:
        word = events["word"]
        items.append(("word", "instruct", "Which word is spoken, and when?",
                      f"The word \"{word['text']}\" is spoken at {_seconds(word['span'][0])}."))
    return items


def _manifest_line(example_id: str, clip: str, task: str, variant: str, question: str, answer: str) -> str:
    return json.dumps({"id": example_id, "audio": [{"path": clip}], "task": task, "variant": variant,
                       "conversation": [{"role": "system", "content": SYSTEM_PROMPT},
                                        {"role": "user", "content": f"<sound>\n{question}"},
                                        {"role": "assistant", "content": answer}]})


def train_demo_tokenizer(texts: list[str], path: str, vocab_size: int = DEMO_VOCAB_SIZE) -> None:
    """Byte-level BPE (Qwen-style) trained on `texts`, with every special token the pipeline needs."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [PAD_CANDIDATES[0], *SPECIAL_TOKENS.values()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(path)


def make_demo(out_dir: str, num_train_clips: int = 48, num_heldout_clips: int = 12, seed: int = 0,
              long_clip_windows: int = 0) -> dict:
    """Write clips/, train.jsonl, heldout.jsonl, events.json and tokenizer.json under `out_dir`.

    `long_clip_windows` = W >= 2 makes every clip long instead: 2..W of the tiny model's windows, each
    event in any window (the RoTE ablation's data; `make-demo --long-clip-windows W`). 0, the default,
    writes the short quickstart clips that `make run` trains on.
    """
    import soundfile

    if long_clip_windows != 0 and not 2 <= long_clip_windows <= tiny().max_windows_per_audio:
        raise ValueError(f"long_clip_windows must be 0 (short clips) or 2..{tiny().max_windows_per_audio} "
                         f"(the tiny model's max_windows_per_audio), got {long_clip_windows}")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
    if long_clip_windows:
        window_seconds = tiny().encoder.window_seconds
        word_audio = {}
        make_clip = lambda: _make_long_clip(rng, long_clip_windows, window_seconds)  # noqa: E731
    else:
        word_audio = {word: audio for word in WORDS if (audio := _synthesize_word(word)) is not None}
        make_clip = lambda: _make_clip(rng, word_audio)  # noqa: E731
    all_events, texts, counts = {}, [SYSTEM_PROMPT, "system", "user", "assistant"], {}
    for split, num_clips in (("train", num_train_clips), ("heldout", num_heldout_clips)):
        lines = []
        for clip_number in range(num_clips):
            samples, events = make_clip()
            clip = f"clips/{split}_{clip_number:03d}.wav"
            soundfile.write(os.path.join(out_dir, clip), samples, SAMPLE_RATE, subtype="PCM_16")
            all_events[clip] = events
            for index, (task, variant, question, answer) in enumerate(_questions(events)):
                example_id = f"{split}-{clip_number:03d}-{index}"
                lines.append(_manifest_line(example_id, clip, task, variant, question, answer))
                texts += [question, answer]
        if split == "train":
            lines = [lines[i] for i in rng.permutation(len(lines))]
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as manifest:
            manifest.write("\n".join(lines) + "\n")
        counts[split] = {"clips": num_clips, "examples": len(lines)}
    train_demo_tokenizer(texts, os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "events.json"), "w", encoding="utf-8") as events_file:
        json.dump(all_events, events_file, indent=1)
    return {"out": out_dir, "spoken_words": bool(word_audio), "long_clip_windows": long_clip_windows, **counts}
