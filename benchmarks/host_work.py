"""The host work each row-group member repeats per step (audio decode + log-mel), against the step.

    python benchmarks/host_work.py [--minutes 5] [--workers 8]

Decodes a FLAC of `--minutes` of audio (load_audio) and featurises it for af_next_7b's encoder
(featurize_audio: 30 s windows, log-mel), on one core, and scales the per-window time to stage 4's group
batch (experiments/af_next_stage4_long_context.py: every member of a row group builds the whole host
batch) spread over the pipeline's workers. The step time is stage 4's analytic FLOPs per chip at a stated
MFU of a v5p chip's 459 TFLOP/s. Prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def seconds_per_window(minutes: int) -> tuple[float, float]:
    import soundfile

    from af_next_jax.config import SAMPLE_RATE, preset
    from af_next_jax.data.audio import load_audio
    from af_next_jax.data.audio_features import featurize_audio

    encoder = preset("af_next_7b").encoder
    samples = (np.random.default_rng(0).standard_normal(SAMPLE_RATE * 60 * minutes) * 0.1).astype(np.float32)
    path = os.path.join(tempfile.mkdtemp(), "audio.flac")
    soundfile.write(path, samples, SAMPLE_RATE)
    windows = minutes * 2
    best = (float("inf"), float("inf"))
    for _ in range(3):
        start = time.perf_counter()
        decoded = load_audio(path)
        decoded_at = time.perf_counter()
        featurize_audio(decoded, encoder, windows)
        done = time.perf_counter()
        best = min(best, ((decoded_at - start) / windows, (done - decoded_at) / windows), key=sum)
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8, help="the pipeline's workers (stage 4: data.num_workers)")
    parser.add_argument("--mfu", type=float, default=0.4)
    args = parser.parse_args()
    import scaling

    config = scaling.load_config(scaling.LONG_CONTEXT_SPEC)
    devices = scaling.parse_topology(config.target_topology, config.target_slices).devices_total
    from af_next_jax.experiment import experiment_from
    from af_next_jax.train.flops import train_step_flops

    settings = experiment_from(config)
    flops = train_step_flops(settings.model, batch_size=config.data.batch_size, seq_len=config.data.seq_len,
                             num_windows=config.data.max_windows_per_batch,
                             trained_groups=settings.trainer.trained_groups) / devices
    step = flops / (args.mfu * 459e12)
    decode, features = seconds_per_window(args.minutes)
    windows = config.data.max_windows_per_batch
    host = windows * (decode + features) / args.workers
    print("| per 30 s window: decode | log-mel | stage 4 windows per group batch | host work per step "
          f"({args.workers} workers) | step at {args.mfu:.0%} MFU | host / step |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {decode * 1e3:.1f} ms | {features * 1e3:.1f} ms | {windows} | {host:.1f} s | {step:.1f} s | {host / step:.2f} |")


if __name__ == "__main__":
    main()
