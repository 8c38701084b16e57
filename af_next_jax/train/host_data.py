"""This process's share of every global batch: a fixed number of data shards, split over processes.

The training stream is `S` independent pipelines ("data shards"): shard `s` reads lines `s::S` of
every manifest (its own seeded shuffle, packing and iterator state) and fills `batch_size / S` rows
and `max_windows_per_batch / S` windows of each global batch. Process `p` of `P` owns the shards
`p*S/P ... (p+1)*S/P - 1` and concatenates their batches in shard order. So the global batch, and
with it the loss curve, depends on `S` only, not on how many processes read it:

  - `config.data.shards = 0` (default) takes `S` = the process count at the run's first start;
  - a checkpoint stores every shard's position (the states of all processes, checkpointing.py),
    and a resumed run keeps the `S` it was started with, so it re-shards exactly onto any process
    count that divides `S`; any other count stops with an error that says what to do;
  - `--config.data.shards=2` gives 1 process and 2 processes the same batches (the two-process
    tests compare their loss curves).
"""

from __future__ import annotations

import json

import numpy as np

from af_next_jax.batch import AUDIO_FIELDS

AUDIO = frozenset(AUDIO_FIELDS)


class DataShardError(ValueError):
    """The saved data positions cannot be continued with this process count or config."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def saved_shard_count(states: list[bytes | None] | None) -> int | None:
    """The shard count S recorded in a checkpoint's iterator states (one per saving process), or None."""
    if not states or all(state is None for state in states):
        return None
    decoded = json.loads(next(state for state in states if state is not None))
    if isinstance(decoded, dict) and "num_shards" in decoded:
        return int(decoded["num_shards"])
    return len(states)  # a plain iterator state per process (older checkpoints): one shard per process


def resolve_shard_count(configured: int, process_count: int, batch_size: int, max_windows: int,
                        saved: int | None = None, saved_step: int | None = None) -> int:
    """S for this run: the checkpoint's if resuming, else `configured` or the process count; validated."""
    where = f"the checkpoint at step {saved_step}" if saved_step is not None else "the checkpoint"
    if saved is not None:
        if configured and configured != saved:
            raise DataShardError(
                f"config.data.shards={configured}, but {where} read its data as {saved} shards; changing it would "
                f"change the data order of a running run. Drop the override (0 keeps the saved {saved}), or start "
                f"a new --workdir.")
        shards = saved
        if shards % process_count:
            raise DataShardError(
                f"{where} holds the positions of {shards} data shards, which {process_count} processes cannot split "
                f"evenly, so the run cannot continue with the same data order. Resume with a process count that "
                f"divides {shards} ({_divisors(shards)}), or start a new --workdir (with --config.init_from=... to "
                f"keep the weights).")
    else:
        shards = configured or process_count
        if shards % process_count:
            raise DataShardError(f"config.data.shards={shards} must be a multiple of the process count "
                                 f"{process_count} (every process reads whole shards)")
    for name, value in (("batch_size", batch_size), ("max_windows_per_batch", max_windows)):
        if value % shards:
            raise DataShardError(f"config.data.{name}={value} is global and must split evenly over {shards} data "
                                 f"shards (config.data.shards, default one per process)")
    return shards


def owned_shards(num_shards: int, process_index: int, process_count: int) -> range:
    per_process = num_shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


class HostBatches:
    """Batches of this process's shards, concatenated in shard order (rows, then windows)."""

    def __init__(self, iterators: dict[int, object], num_shards: int):
        self.num_shards = num_shards
        self._iterators = dict(sorted(iterators.items()))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(iterator) for iterator in self._iterators.values()]
        if len(parts) == 1:
            return parts[0]
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps({"num_shards": self.num_shards, "shards": {
            str(shard): iterator.get_state().decode() for shard, iterator in self._iterators.items()}}).encode()

    def set_global_state(self, states: list[bytes | None]) -> None:
        """Continue from the iterator states of every process that saved (any process count)."""
        saved = saved_shard_count(states)
        if saved != self.num_shards:
            raise DataShardError(f"the checkpoint holds {saved} data shards, this iterator reads {self.num_shards}")
        positions = {}
        for process, state in enumerate(states):
            if state is None:
                continue
            decoded = json.loads(state)
            if isinstance(decoded, dict) and "num_shards" in decoded:
                positions.update({int(shard): value.encode() for shard, value in decoded["shards"].items()})
            else:
                positions[process] = state
        for shard, iterator in self._iterators.items():
            if shard not in positions:
                raise DataShardError(f"the checkpoint has no position for data shard {shard} of {self.num_shards}")
            iterator.set_state(positions[shard])

    def set_state(self, state: bytes) -> None:
        self.set_global_state([state])

    def metrics(self) -> dict[str, float]:
        """This process's data counters, summed over its shards."""
        totals: dict[str, float] = {}
        for iterator in self._iterators.values():
            for name, value in iterator.metrics().items():
                totals[name] = totals.get(name, 0.0) + value
        if "data/skip_fraction" in totals:
            skipped, used = totals.get("data/skipped", 0.0), totals.get("data/examples", 0.0)
            totals["data/skip_fraction"] = skipped / max(1.0, skipped + used)
        return totals

    def close(self) -> None:
        for iterator in self._iterators.values():
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
