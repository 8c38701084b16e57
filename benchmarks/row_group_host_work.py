"""The host work a row group duplicates: every member decodes and featurises its group's audio.

    python benchmarks/row_group_host_work.py [--minutes 10] [--repeats 3]

At stage 4 on v5p-64 (experiments/af_next_stage4_long_context.py) one row group holds all 8 hosts
(docs/SCALING.md, "How stage 4 is fed"), so each host builds the whole batch: 8 rows of 128K tokens,
1536 window slots (one block of 6 per sequence slice), at most 8 x 174 = 1392 of them real 30 s windows
of audio (11.6 hours per step).
This times, on this host and one core, what one window costs: decoding a 16 kHz FLAC file (as the
ArrayRecord shards store audio, and as a long recording is read) and its Whisper log-mel
(af_next_jax/data/audio_features.py, the pipeline's own code), and scales it to one step of one host.
The step's budget is the analytic FLOPs of stage 4's train step (its Program, the trainer's) over the
slice's bf16 peak at an assumed MFU. Prints a markdown table (recorded in docs/PERFORMANCE.md).
"""

from __future__ import annotations

import os

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"  # one core: the figure is per worker process

import argparse  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

V5P_PEAK_BF16 = 459e12


def _recording(minutes: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(minutes * 60 * 16_000)) / 16_000
    return (0.2 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 0.3 * t) > 0)
            + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process(tune_malloc=False)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the recording timed")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import soundfile

    from af_next_jax.data.audio import load_audio
    from af_next_jax.data.audio_features import window_audio
    from af_next_jax.experiment import build_program, experiment_from, load_config

    experiment = experiment_from(load_config("experiments/af_next_stage4_long_context.py"))
    program = build_program(experiment, 32)  # v5p-64: 32 chips (shardings only)
    encoder = experiment.model.encoder
    data = experiment.data
    real_windows = data.batch_size * (data.seq_len // encoder.tokens_per_window)

    samples = _recording(args.minutes)
    windows = window_audio(samples, encoder, max_windows=10_000)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "recording.flac")
        soundfile.write(path, samples, 16_000, subtype="PCM_16")
        decode = _best(lambda: load_audio(path), args.repeats) / windows.num_windows
    featurise = _best(lambda: window_audio(samples, encoder, max_windows=10_000).log_mel(),
                      args.repeats) / windows.num_windows
    per_step = (decode + featurise) * real_windows
    workers = data.num_workers
    print(f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; a "
          f"{args.minutes:g}-minute recording ({windows.num_windows} windows of 30 s), best of {args.repeats}; "
          f"stage 4: {real_windows} real windows per step ({data.max_windows_per_batch} slots)\n")
    print("| per 30 s window, one core | decode FLAC | log-mel | both |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| ms | {1e3 * decode:.1f} | {1e3 * featurise:.1f} | {1e3 * (decode + featurise):.1f} |\n")
    print(f"| one host, one step of stage 4 | core-seconds | with {workers} workers (data.num_workers) | "
          f"step at 50% / 30% MFU | share of the step (30% MFU) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    step = {mfu: program.flops_per_step / (32 * V5P_PEAK_BF16 * mfu) for mfu in (0.5, 0.3)}
    print(f"| decode + log-mel of the group's batch | {per_step:.1f} | {per_step / workers:.2f} s | "
          f"{step[0.5]:.1f} s / {step[0.3]:.1f} s | {per_step / workers / step[0.3]:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
