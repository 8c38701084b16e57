"""Decisions that every process of a multi-process run must take together (no-ops with one process).

Each helper is a collective: every process calls it, in the same order, and all get the same answer.
They run on the devices (`jax.experimental.multihost_utils.process_allgather`), so they work on any
backend the run uses (gloo on CPU hosts, NCCL, TPU ICI/DCN).
"""

from __future__ import annotations

import jax
import numpy as np


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def allgather_ints(values) -> np.ndarray:
    """[process_count, n] int32: every process's `values` (a sequence of n ints), by process index."""
    local = np.asarray(values, np.int32).reshape(-1)
    if not is_multiprocess():
        return local[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=False)).reshape(jax.process_count(), -1)


def agree_max(value: int) -> int:
    return int(allgather_ints([value]).max())


def agree_min(value: int) -> int:
    return int(allgather_ints([value]).min())


def agree_any(flag: bool) -> bool:
    return bool(agree_max(int(bool(flag))))


def allgather_bytes(value: bytes) -> list[bytes]:
    """Every process's byte string, by process index (a few KB each: iterator states)."""
    if not is_multiprocess():
        return [value]
    lengths = allgather_ints([len(value)])[:, 0]
    size = -(-int(lengths.max()) // 1024) * 1024 or 1024  # a few padded sizes: few compilations
    padded = np.zeros(size, np.uint8)
    padded[:len(value)] = np.frombuffer(value, np.uint8)
    from jax.experimental import multihost_utils

    rows = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
    return [bytes(row[:length]) for row, length in zip(rows, lengths)]


def barrier(name: str) -> None:
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
