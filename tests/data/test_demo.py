"""make-demo: offline, seconds, known timestamps, a tokenizer well inside the tiny model's vocabulary."""

import json

import numpy as np
import pytest

from af_next_jax import config as config_lib


def test_make_demo_writes_manifests_clips_and_tokenizer(demo_dir, demo_tokenizer):
    import soundfile

    train = [json.loads(line) for line in open(demo_dir / "train.jsonl")]
    heldout = [json.loads(line) for line in open(demo_dir / "heldout.jsonl")]
    assert len(train) >= 8 * 6 and len(heldout) >= 2 * 6
    assert {record["variant"] for record in train} == {"instruct", "think", "captioner"}
    assert not {r["audio"][0]["path"] for r in train} & {r["audio"][0]["path"] for r in heldout}
    for record in train[:5]:
        info = soundfile.info(str(demo_dir / record["audio"][0]["path"]))
        assert info.samplerate == 16000 and info.channels == 1 and info.duration <= 10.0
    assert demo_tokenizer.vocab_size < config_lib.tiny().decoder.vocab_size // 1.5


def test_demo_answers_match_the_audio(demo_dir):
    """The beep onset stated in the answers is where the 1 kHz-band energy actually rises."""
    import soundfile

    events = json.load(open(demo_dir / "events.json"))
    for clip, event in list(events.items())[:4]:
        samples, rate = soundfile.read(str(demo_dir / clip), dtype="float32")
        frame = rate // 100
        energy = np.square(samples[: len(samples) // frame * frame]).reshape(-1, frame).mean(axis=1)
        loud = np.flatnonzero(energy > 0.01)
        onsets = loud[np.concatenate([[True], np.diff(loud) > 5])] / 100
        assert min(abs(onsets - event["beep"][0])) <= 0.02
        assert min(abs(onsets - event["noise"][0])) <= 0.02


def test_make_demo_cli_is_fast(tmp_path, capsys):
    import time

    from af_next_jax.data.__main__ import main

    started = time.perf_counter()
    assert main(["make-demo", "--out", str(tmp_path / "demo"), "--train-clips", "4", "--heldout-clips", "1"]) == 0
    assert time.perf_counter() - started < 10
    assert json.loads(capsys.readouterr().out.splitlines()[0])["train"]["clips"] == 4


def test_spoken_words_come_from_espeak_ng_when_installed(tmp_path, monkeypatch):
    """A stand-in `espeak-ng` on PATH (22.05 kHz output like the real one) exercises the speech path."""
    import os
    import stat

    import soundfile

    from af_next_jax.data.demo import make_demo

    word = tmp_path / "word.wav"
    t = np.arange(int(0.5 * 22050)) / 22050
    soundfile.write(str(word), 0.5 * np.sin(2 * np.pi * 150 * t) * np.sin(2 * np.pi * 3 * t), 22050)
    fake = tmp_path / "bin" / "espeak-ng"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\n# called as: espeak-ng -w OUT.wav -s RATE WORD\ncp "{word}" "$2"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    summary = make_demo(str(tmp_path / "demo"), num_train_clips=3, num_heldout_clips=1, seed=1)
    assert summary["spoken_words"]
    events = json.load(open(tmp_path / "demo" / "events.json"))
    assert any("word" in event for event in events.values())
    lines = open(tmp_path / "demo" / "train.jsonl").read()
    assert "Which word is spoken, and when?" in lines


def _energy_onsets(samples: np.ndarray, rate: int) -> np.ndarray:
    """Seconds where the 10 ms frame energy rises above the faint background."""
    frame = rate // 100
    energy = np.square(samples[: len(samples) // frame * frame]).reshape(-1, frame).mean(axis=1)
    loud = np.flatnonzero(energy > 0.01)
    return loud[np.concatenate([[True], np.diff(loud) > 5])] / 100


@pytest.fixture(scope="module")
def long_demo_dir(tmp_path_factory):
    from af_next_jax.data.demo import make_demo

    out = tmp_path_factory.mktemp("long_demo")
    make_demo(str(out), num_train_clips=16, num_heldout_clips=4, seed=0, long_clip_windows=4)
    return out


def test_long_clips_span_several_windows_with_events_in_later_ones(long_demo_dir):
    import soundfile

    window_seconds = config_lib.tiny().encoder.window_seconds
    events = json.load(open(long_demo_dir / "events.json"))
    onset_windows = set()
    for clip, event in events.items():
        duration = soundfile.info(str(long_demo_dir / clip)).duration
        assert duration > window_seconds and duration <= 4 * window_seconds
        assert int(np.ceil(duration / window_seconds)) == event["windows"]
        onset_windows |= {int(event[kind][0] // window_seconds) for kind in ("beep", "noise")}
    assert onset_windows == {0, 1, 2, 3}


def test_long_clip_answers_match_the_audio(long_demo_dir):
    """The onsets the manifests state are where the energy rises, in whichever window they fall."""
    import soundfile

    events = json.load(open(long_demo_dir / "events.json"))
    stated = {}
    for line in open(long_demo_dir / "heldout.jsonl"):
        record = json.loads(line)
        answer = record["conversation"][-1]["content"]
        if record["task"] == "beep_onset" and record["variant"] == "instruct":
            stated[record["audio"][0]["path"]] = float(answer.removeprefix("The beep starts at ").rstrip("s."))
    assert len(stated) == 4
    for clip, onset in stated.items():
        samples, rate = soundfile.read(str(long_demo_dir / clip), dtype="float32")
        onsets = _energy_onsets(samples, rate)
        assert onset == events[clip]["beep"][0] and min(abs(onsets - onset)) <= 0.02
        assert min(abs(onsets - events[clip]["noise"][0])) <= 0.02


def test_long_clip_windows_outside_the_tiny_model_is_refused(tmp_path):
    from af_next_jax.data.demo import make_demo

    with pytest.raises(ValueError, match="long_clip_windows must be 0 .* or 2..4"):
        make_demo(str(tmp_path / "demo"), 1, 1, long_clip_windows=5)
