"""Rows split across processes against one process, per layout: the loss curves and the run times.

    python benchmarks/split_rows_curves.py [--steps 6] [--layouts ring_across_processes ...]

Each layout of tests/train/split_rows_helpers.py (the long-context debug experiment, hybrid sequence
parallelism, 2 rows of 1024 tokens): 2 processes x 4 fake CPU devices (gloo, launched with the SLURM
variables only) and 1 process x 8 devices with the same mesh sizes, trained the same steps on the same
data. Prints, per layout, the largest relative difference of loss and gradient norm over the steps and
each run's wall time (start to exit, compile included), one after the other on this machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests", "train"), os.path.join(ROOT, "tests")]

from split_rows_helpers import LAYOUTS, TIMEOUT, flags, launch, run_one_process  # noqa: E402
from trainer_helpers import wait_all  # noqa: E402

from af_next_jax.train.metrics import read_metrics  # noqa: E402


def _largest_relative_difference(two: dict, one: dict, name: str) -> float:
    return max(abs(two[step][name] - one[step][name]) / abs(one[step][name]) for step in one)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layouts", nargs="*", default=sorted(LAYOUTS))
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="split_rows_curves_")
    demo = os.path.join(root, "demo")
    subprocess.run([sys.executable, "-m", "af_next_jax.data", "make-demo", "--out", demo, "--train-clips", "16",
                    "--heldout-clips", "4"], check=True, cwd=ROOT, capture_output=True)
    print("| layout | steps | largest relative loss difference | grad norm | 2 processes (s) | 1 process (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for layout in args.layouts:
        split, single = LAYOUTS[layout]
        two, one = os.path.join(root, f"{layout}_two"), os.path.join(root, f"{layout}_one")
        start = time.perf_counter()
        codes = wait_all(launch(two, root, f"{layout}_two", 2, 4, flags(demo, args.steps, *split)), TIMEOUT)
        two_seconds = time.perf_counter() - start
        start = time.perf_counter()
        codes += run_one_process(one, root, f"{layout}_one", flags(demo, args.steps, *single))
        one_seconds = time.perf_counter() - start
        if codes != [0, 0, 0]:
            print(f"| {layout} | failed: exit codes {codes} (logs in {root}) | | | | |", flush=True)
            continue
        curves_two, curves_one = read_metrics(two), read_metrics(one)
        print(f"| {layout} | {args.steps} | {_largest_relative_difference(curves_two, curves_one, 'loss'):.1e} | "
              f"{_largest_relative_difference(curves_two, curves_one, 'grad_norm'):.1e} | {two_seconds:.0f} | "
              f"{one_seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
