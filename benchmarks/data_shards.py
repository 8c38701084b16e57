"""Shards vs JSONL + audio files, side by side in one run (called by benchmarks/data.py --only shards).

Data: demo clips of 10-20 s (`make_demo(long_clip_windows=4)`), one example per clip, written as
16 kHz PCM16 wav (no resampling when read: the manifests' best case) and as 44.1 kHz wav copies
(what most corpora look like: every read decodes and resamples). Both manifests are built into
FLAC shards with the DirectRunner (and the 16 kHz one into int16 shards too).

Cold cache: before every cold pass, each file the pass reads (wavs, manifests, shards) is evicted from
the page cache with posix_fadvise(POSIX_FADV_DONTNEED), so the pass reads from disk without
dropping the whole machine's cache (other jobs share it). A warm pass follows right after.
"""

import json
import os
import tempfile
import time


SAMPLE_RATE = 16_000


def _evict(paths) -> None:
    for path in paths:
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _files_under(folder: str) -> list[str]:
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def _one_example_per_clip(demo: str, rate: int) -> str:
    """A manifest with the first example of every clip; at `rate` != 16 kHz, the clips resampled to it."""
    import librosa
    import soundfile

    seen, lines = set(), []
    for line in open(os.path.join(demo, "train.jsonl")).read().splitlines():
        record = json.loads(line)
        clip = record["audio"][0]["path"]
        if clip in seen:
            continue
        seen.add(clip)
        if rate != SAMPLE_RATE:
            samples, _ = soundfile.read(os.path.join(demo, clip), dtype="float32")
            clip = clip.replace("clips/", f"clips{rate}/")
            os.makedirs(os.path.join(demo, os.path.dirname(clip)), exist_ok=True)
            soundfile.write(os.path.join(demo, clip), librosa.resample(samples, orig_sr=SAMPLE_RATE, target_sr=rate),
                            rate, subtype="PCM_16")
            record["audio"][0]["path"] = clip
        lines.append(json.dumps(record))
    path = os.path.join(demo, f"one_per_clip_{rate}.jsonl")
    with open(path, "w") as manifest:
        manifest.write("\n".join(lines) + "\n")
    return path


def _build(manifest: str, out: str, encoding: str) -> dict:
    from af_next_jax.data.build_shards import build_shards

    started_wall, started_cpu = time.perf_counter(), time.process_time()
    summary = build_shards([manifest], out, num_shards=4, audio_encoding=encoding,
                           pipeline_args=["--direct_num_workers=1"])
    built = summary["manifests"][0]
    return {**built, "wall": time.perf_counter() - started_wall, "cpu": time.process_time() - started_cpu}


def _read_source(entry: str) -> tuple[int, float]:
    """(examples, audio seconds) of reading and decoding every example of a source once, no featurising."""
    from af_next_jax.data import audio as audio_lib
    from af_next_jax.data.manifest import parse_line
    from af_next_jax.data.pipeline import _decode_shard_record, source_records

    records = source_records(entry)
    examples, seconds = 0, 0.0
    for index in range(len(records)):
        source, number, payload = records[index]
        if isinstance(payload, bytes):
            _, samples, _ = _decode_shard_record(source, number, payload)
        else:
            example = parse_line(payload, os.path.dirname(source), number)
            samples = [audio_lib.load_audio(ref.path, ref.start, ref.end) for ref in example.audio]
        examples += 1
        seconds += sum(len(audio) for audio in samples) / SAMPLE_RATE
    return examples, seconds


def _batches(entry: str, tokenizer: str, model_config, workers: int, num_batches: int) -> tuple[float, float]:
    """(examples/s, audio-h/s) of the full pipeline (featurise, tokenise, pack) after the first batch."""
    from af_next_jax.data import DataConfig, make_batch_iterator

    config = DataConfig(manifests=(entry,), tokenizer=tokenizer, seq_len=1024, batch_size=4, max_windows_per_batch=16,
                        num_workers=workers, num_threads=2, process_index=0, process_count=1)
    iterator = make_batch_iterator(config, model_config)
    next(iterator)
    examples, frames = 0, 0
    started = time.perf_counter()
    for _ in range(num_batches):
        batch = next(iterator)
        examples += int(batch["segment_ids"].max(axis=1).sum())
        frames += int(batch["mel_valid_frames"].sum())
    elapsed = time.perf_counter() - started
    iterator.close()
    return examples / elapsed, frames * 0.01 / 3600 / elapsed


def shard_tables(num_clips: int, num_batches: int) -> list[list[str]]:
    from af_next_jax import config as config_lib
    from af_next_jax.data import load_tokenizer
    from af_next_jax.data.demo import make_demo

    tables = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as folder:
        demo = os.path.join(folder, "demo")
        make_demo(demo, num_train_clips=num_clips, num_heldout_clips=1, long_clip_windows=4)
        manifests = {"16 kHz wav": _one_example_per_clip(demo, SAMPLE_RATE),
                     "44.1 kHz wav": _one_example_per_clip(demo, 44_100)}
        _build(manifests["16 kHz wav"], os.path.join(folder, "warm_up"), "int16")  # Beam's first-pipeline start-up
        builds = {("16 kHz wav", "flac"): _build(manifests["16 kHz wav"], os.path.join(folder, "flac16"), "flac"),
                  ("16 kHz wav", "int16"): _build(manifests["16 kHz wav"], os.path.join(folder, "int16"), "int16"),
                  ("44.1 kHz wav", "flac"): _build(manifests["44.1 kHz wav"], os.path.join(folder, "flac44"), "flac")}
        wav_bytes = {name: sum(os.path.getsize(os.path.join(demo, json.loads(line)["audio"][0]["path"]))
                               for line in open(path).read().splitlines()) for name, path in manifests.items()}
        hours = builds[("16 kHz wav", "flac")]["audio_seconds"] / 3600
        rows = ["| storage (same examples) | MB | MB per audio hour | DirectRunner build, 1 worker: examples/s | "
                "audio h/s per core (CPU time) |", "| --- | ---: | ---: | ---: | ---: |"]
        for name in manifests:
            rows.append(f"| JSONL + {name} files | {wav_bytes[name] / 1e6:.1f} | {wav_bytes[name] / 1e6 / hours:.0f} "
                        f"| | |")
        for (name, encoding), built in builds.items():
            rows.append(f"| shards, {encoding} (built from {name}) | {built['bytes'] / 1e6:.1f} | "
                        f"{built['bytes_per_audio_hour'] / 1e6:.0f} | {built['examples'] / built['wall']:.1f} | "
                        f"{built['audio_seconds'] / 3600 / built['cpu']:.3f} |")
        tables.append([f"{len(open(manifests['16 kHz wav']).readlines())} examples, {hours:.2f} audio hours "
                       f"(10-20 s clips)", ""] + rows)

        tokenizer = os.path.join(demo, "tokenizer.json")
        model_config = config_lib.tiny().replace(**load_tokenizer(tokenizer).model_config_ids())
        sources = {"JSONL + 16 kHz wav": manifests["16 kHz wav"], "JSONL + 44.1 kHz wav": manifests["44.1 kHz wav"],
                   "shards, flac": os.path.join(folder, "flac16", "one_per_clip_16000-*.array_record"),
                   "shards, int16": os.path.join(folder, "int16", "one_per_clip_16000-*.array_record")}
        files = {name: ([entry] + [os.path.join(demo, json.loads(line)["audio"][0]["path"])
                                   for line in open(entry).read().splitlines()]
                        if entry.endswith(".jsonl") else _files_under(os.path.dirname(entry)))
                 for name, entry in sources.items()}
        rows = ["| source | read + decode, cold: examples/s | audio h/s | warm: examples/s | audio h/s | "
                "full pipeline 0 workers: examples/s | audio h/s | 2 workers: examples/s | audio h/s |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, entry in sources.items():
            cells = []
            for cold in (True, False):
                elapsed = []  # best of 2: the machine is shared, the minimum is the least disturbed pass
                for _ in range(2):
                    if cold:
                        _evict(files[name])
                    started = time.perf_counter()
                    examples, seconds = _read_source(entry)
                    elapsed.append(time.perf_counter() - started)
                cells += [f"{examples / min(elapsed):.0f}", f"{seconds / 3600 / min(elapsed):.2f}"]
            for workers in (0, 2):
                _evict(files[name])
                rate, audio_rate = _batches(entry, tokenizer, model_config, workers, num_batches)
                cells += [f"{rate:.1f}", f"{audio_rate:.3f}"]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
        tables.append(rows)
    return tables
