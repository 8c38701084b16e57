"""The `make run` experiment (experiments/debug.py, unchanged but for fewer steps and a smaller batch),
trained once per test session on make-demo data: the resume tests compare against this run, and the
generate/evaluate CLI tests ask the model it trains (tests/conftest.py: `debug_run`)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Headroom for test_resume's SIGTERM: the kill waits for step 3's asynchronous save, so on a loaded machine
# the killed run may log up to ~8 steps first, and the SIGTERM goes 2 steps after that (with 9 steps the
# run could finish before it arrived).
TOTAL_STEPS = 15


def train_command(workdir: str, demo_data: str) -> list[str]:
    return [sys.executable, "-m", "af_next_jax.train", "--config", "experiments/debug.py", "--workdir", workdir,
            f"--config.data.dir={demo_data}", f"--config.total_steps={TOTAL_STEPS}", "--config.data.batch_size=2",
            "--config.data.max_windows_per_batch=6", "--config.checkpoint_every=3", "--config.eval_every=0",
            "--config.log_every=1", "--config.peak_flops_per_device=1e11"]


def environment(cache_dir: str) -> dict:
    """One CPU device, like the README's main job, and a persistent compilation cache shared by the runs."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    return env


def make_demo_data(out: str) -> str:
    subprocess.run([sys.executable, "-m", "af_next_jax.data", "make-demo", "--out", out,
                    "--train-clips", "16", "--heldout-clips", "4"], check=True, cwd=REPO, capture_output=True)
    return out


def train_debug_run(workdir: str, demo_data: str, cache_dir: str) -> str:
    subprocess.run(train_command(workdir, demo_data), cwd=REPO, env=environment(cache_dir), check=True,
                   capture_output=True)
    return workdir
