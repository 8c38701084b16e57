"""Data pipeline speed: log-mel vs transformers' WhisperFeatureExtractor, and end-to-end batches.

    python benchmarks/data.py [--clips 8] [--batches 12] [--only features|pipeline|shards]

Features: 30 s windows of synthetic audio, one thread each (OMP/BLAS/torch pinned to 1 thread), so
the figure is audio hours featurised per second per core. Pipeline: the demo dataset through
`make_batch_iterator` with the debug experiment's shapes (tiny preset, seq_len 512, 4 rows, 8 windows),
with 0 and 2 worker processes. Prints the markdown tables recorded in docs/PERFORMANCE.md.

Shards (benchmarks/data_shards.py, recorded in docs/DATA.md): the same examples read from ArrayRecord
shards and from JSONL + wav files, side by side; the DirectRunner build rate per core; bytes per
audio hour.
"""

import os

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402


def _clips(count: int, seconds: int = 30) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(seconds * 16_000) / 16_000
    return [(0.2 * np.sin(2 * np.pi * (300 + 50 * k) * t) * (np.sin(2 * np.pi * 0.3 * t) > 0)
             + 0.05 * rng.standard_normal(len(t))).astype(np.float32) for k in range(count)]


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def feature_table(num_clips: int) -> list[str]:
    import torch
    from transformers import WhisperFeatureExtractor

    from af_next_jax.config import EncoderConfig
    from af_next_jax.data.features import log_mel_windows

    torch.set_num_threads(1)
    clips, encoder = _clips(num_clips), EncoderConfig()
    extractor = WhisperFeatureExtractor(feature_size=128)
    hours = num_clips * 30 / 3600
    log_mel_windows(clips[0][None], encoder)  # filter bank and imports outside the timing
    candidates = {
        "af_next_jax log_mel_windows (scipy float32 rfft)":
            lambda: log_mel_windows(np.stack(clips), encoder),
        "WhisperFeatureExtractor numpy path (`_np_extract_fbank_features`)":
            lambda: [extractor._np_extract_fbank_features(clip[None], "cpu") for clip in clips],
        "WhisperFeatureExtractor __call__ (torch.stft, 1 thread)":
            lambda: [extractor(clip, sampling_rate=16000, return_tensors="np") for clip in clips],
    }
    rows = ["| log-mel implementation (30 s windows, 1 core) | ms / window | audio h / s / core | vs HF numpy |",
            "| --- | ---: | ---: | ---: |"]
    results = {name: _best_of(fn, repeats=2 if "numpy path" in name else 3) for name, fn in candidates.items()}
    numpy_reference = results["WhisperFeatureExtractor numpy path (`_np_extract_fbank_features`)"]
    for name, seconds in results.items():
        rows.append(f"| {name} | {1000 * seconds / num_clips:.1f} | {hours / seconds:.2f} | "
                    f"{numpy_reference / seconds:.1f}x |")
    return rows


def pipeline_table(num_batches: int) -> list[str]:
    from af_next_jax import config as config_lib
    from af_next_jax.data import DataConfig, load_tokenizer, make_batch_iterator
    from af_next_jax.data.demo import make_demo

    rows = ["| pipeline (demo data, tiny preset, 4 x 512 tokens, 8 windows) | first batch s | batches / s | "
            "examples / s | tokens / s (non-pad) | audio windows / s |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as folder:
        make_demo(folder)
        tokenizer = load_tokenizer(os.path.join(folder, "tokenizer.json"))
        model_config = config_lib.tiny().replace(**tokenizer.model_config_ids())
        for workers in (0, 2):
            data_config = DataConfig(manifests=(os.path.join(folder, "train.jsonl"),),
                                     tokenizer=os.path.join(folder, "tokenizer.json"), seq_len=512, batch_size=4,
                                     max_windows_per_batch=8, num_workers=workers, num_threads=2,
                                     process_index=0, process_count=1)
            started = time.perf_counter()
            iterator = make_batch_iterator(data_config, model_config)
            next(iterator)
            first = time.perf_counter() - started
            for _ in range(2):  # warm the worker queues
                next(iterator)
            examples = tokens = windows = 0
            started = time.perf_counter()
            for _ in range(num_batches):
                batch = next(iterator)
                examples += int(batch["segment_ids"].max(axis=1).sum())
                tokens += int((batch["segment_ids"] > 0).sum())
                windows += int((batch["mel_valid_frames"] > 0).sum())
            elapsed = time.perf_counter() - started
            iterator.close()
            if workers == 0:
                try:
                    step_seconds = tiny_train_step_seconds(batch, model_config)
                    step_row = (f"| tiny model forward + backward on the same batch (jit, CPU) | | "
                                f"{1 / step_seconds:.1f} | | | |")
                except Exception as error:  # the model is another engineer's moving target
                    step_row = f"| tiny model step: unavailable ({type(error).__name__}: {error}) | | | | | |"
            rows.append(f"| num_workers={workers}, num_threads=2 | {first:.1f} | {num_batches / elapsed:.1f} | "
                        f"{examples / elapsed:.0f} | {tokens / elapsed:.0f} | {windows / elapsed:.0f} |")
    return rows + [step_row]


def tiny_train_step_seconds(batch: dict, model_config, repeats: int = 5) -> float:
    """Seconds per forward + backward of the tiny model on one pipeline batch (the bar to outrun)."""
    import jax
    import jax.numpy as jnp

    from af_next_jax.model.af_next import AFNextModel

    model = AFNextModel(model_config)
    params = jax.jit(model.init)(jax.random.key(0), batch)

    def loss_fn(params, batch):
        logits = model.apply(params, batch).astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits)
        picked = jnp.take_along_axis(log_probs, batch["target_ids"][..., None], axis=-1)[..., 0]
        return -(picked * batch["loss_mask"]).sum() / jnp.maximum(batch["loss_mask"].sum(), 1.0)

    step = jax.jit(jax.value_and_grad(loss_fn))
    jax.block_until_ready(step(params, batch))
    started = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(step(params, batch))
    return (time.perf_counter() - started) / repeats


def main() -> None:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # the XLA:CPU flags and allocator settings the commands use, as measured
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8, help="30 s clips for the feature benchmark")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per pipeline setting")
    parser.add_argument("--shard-clips", type=int, default=96, help="demo clips (10-20 s) for the shard tables")
    parser.add_argument("--only", choices=("features", "pipeline", "shards"), default=None)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    if args.only in (None, "features"):
        print("\n".join(feature_table(args.clips)) + "\n")
    if args.only in (None, "pipeline"):
        print("\n".join(pipeline_table(args.batches)) + "\n")
    if args.only in (None, "shards"):
        from data_shards import shard_tables

        print("\n\n".join("\n".join(table) for table in shard_tables(args.shard_clips, args.batches)))


if __name__ == "__main__":
    main()
