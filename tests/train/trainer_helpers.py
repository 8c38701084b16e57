"""Small helpers shared by the trainer tests (imported by tests/train/*.py)."""

from __future__ import annotations

import os

import numpy as np

from af_next_jax.config import tiny
from af_next_jax.model.synthetic import synthetic_batch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LEN = 256
NUM_WINDOWS = 4


def micro_batch(seed: int, config=None, num_windows: int = NUM_WINDOWS) -> dict:
    return synthetic_batch(config or tiny(), audio_frames_per_example=[[500], [300, 200]], seq_len=SEQ_LEN,
                           num_windows=num_windows, seed=seed)


def stack(*batches) -> dict:
    return {name: np.stack([b[name] for b in batches]) for name in batches[0]}


class SyntheticBatches:
    """An in-memory stand-in for the data pipeline: batch i is `micro_batch(i)`; `poison_from` makes
    every batch from that index on carry a NaN in its log-mel (a non-finite loss)."""

    def __init__(self, config=None, poison_from: int | None = None, num_windows: int = NUM_WINDOWS):
        self.index, self.config, self.poison_from, self.num_windows = 0, config, poison_from, num_windows

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = micro_batch(self.index, self.config, self.num_windows)
        if self.poison_from is not None and self.index >= self.poison_from:
            batch["mel_windows"][0, 0, 0] = np.nan
        self.index += 1
        return batch

    def get_state(self) -> bytes:
        return str(self.index).encode()

    def set_state(self, state: bytes) -> None:
        self.index = int(state)

    def metrics(self) -> dict:
        return {"data/skipped": 0.0}


# ---------------------------------------------------------------- the trainer CLI in subprocesses

def free_port(low: int = 0, high: int = 0) -> int:
    """A free TCP port on 127.0.0.1 (in [low, high] when given: SLURM derives its port from the job id)."""
    import random
    import socket

    candidates = [0] if not low else random.sample(range(low, high + 1), 200)
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high}]")


def train_command(workdir: str, overrides: list[str], *, experiment: str = "experiments/debug.py") -> list[str]:
    import sys

    return [sys.executable, "-m", "af_next_jax.train", "--config", experiment, "--workdir", workdir, *overrides]


def cpu_environment(devices: int, cache_dir: str | None = None, **extra) -> dict:
    """The environment of one trainer process: `devices` fake CPU devices, an optional shared compile cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "AF_NEXT_", "JAX_COORDINATOR"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    env.update(extra)
    return env


def slurm_environment(process_id: int, num_processes: int, port: int) -> dict:
    """The variables `srun` sets for task `process_id` of a one-node job step (nothing else): jax's
    SLURM detection derives the coordinator port from the job id, 61440 + SLURM_JOB_ID % 4096."""
    return dict(SLURM_JOB_ID=str(port - 61440), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS=str(num_processes),
                SLURM_PROCID=str(process_id), SLURM_LOCALID=str(process_id), SLURM_NODEID="0",
                SLURM_STEP_NUM_NODES="1", SLURM_STEP_TASKS_PER_NODE=str(num_processes))


def explicit_launch_flags(process_id: int, num_processes: int, port: int) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes), "--process-id",
            str(process_id)]


def start_processes(commands_and_envs, log_dir: str, name: str):
    """Popen each (command, env); stdout+stderr to LOG_DIR/NAME.I.log. Returns the processes."""
    import subprocess

    processes = []
    for index, (command, env) in enumerate(commands_and_envs):
        log = open(os.path.join(log_dir, f"{name}.{index}.log"), "w")
        processes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    return processes


def wait_all(processes, timeout: float) -> list[int]:
    """Exit codes; kills every process still running at the deadline (and reports -9 for it)."""
    import time

    deadline = time.time() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.time())))
        except Exception:  # noqa: BLE001 -- subprocess.TimeoutExpired: do not leave it running
            process.kill()
            codes.append(process.wait())
    return codes


def read_log(log_dir: str, name: str, index: int) -> str:
    with open(os.path.join(log_dir, f"{name}.{index}.log"), encoding="utf-8", errors="replace") as handle:
        return handle.read()
