"""Before/after of benchmarks/train_step.py: a committed tree against the working tree, alternating.

    python benchmarks/train_step_before_after.py --before 5dbbec0 [--pairs 2] [--steps 15]

Extracts `--before` (any git revision) with `git archive` into a temporary folder (git state is not
touched), then runs the train-step benchmark of that tree and of this working tree in turn, `--pairs`
times, each in its own process with its own package on PYTHONPATH, and prints each run's table with the
time and load it started at. Compare within a pair: the machine's load moves between runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extract_tree(revision: str, destination: str) -> str:
    archive = subprocess.run(["git", "-C", REPOSITORY, "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", destination], input=archive, check=True)
    return destination


def run_benchmark(tree: str, steps: int) -> str:
    environment = dict(os.environ, PYTHONPATH=tree)
    finished = subprocess.run([sys.executable, os.path.join("benchmarks", "train_step.py"), "--steps", str(steps)],
                              cwd=tree, env=environment, capture_output=True, text=True, check=True)
    return "\n".join(line for line in finished.stdout.splitlines() if line.startswith("|"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision of the 'before' tree, e.g. 5dbbec0")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="train_step_before_") as folder:
        trees = {f"before ({args.before})": extract_tree(args.before, folder), "after (working tree)": REPOSITORY}
        for pair in range(1, args.pairs + 1):
            for label, tree in trees.items():
                started = f"{time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.1f}"
                table = run_benchmark(tree, args.steps)
                print(f"pair {pair}, {label}, started {started}\n\n{table}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
