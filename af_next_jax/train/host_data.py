"""This process's share of every global batch: a fixed number of data shards, split over row groups.

The training stream is `S` independent pipelines ("data shards"): shard `s` reads lines `s::S` of
every manifest (its own seeded shuffle, packing and iterator state) and fills `batch_size / S` rows
and `max_windows_per_batch / S` windows of each global batch. The processes form `G` row groups
(af_next_jax/experiment/feeding.py: the processes holding slices of the same rows; one process per
group when every process holds whole rows). Group `g` owns the shards `g*S/G ... (g+1)*S/G - 1`;
every member of a group reads them, concatenates their batches in shard order and so builds the
same host batch (checked: `check_group_agreement`). The global batch, and with it the loss curve,
depends on `S` only, not on how many processes or groups read it:

  - `config.data.shards = 0` (default) takes `S` = the number of row groups at the run's first start;
  - a checkpoint stores every shard's position once (checkpointing.py merges the members' copies,
    which must agree), and a resumed run keeps the `S` it was started with, so it re-shards exactly
    onto any process count and sequence-parallel layout whose group count divides `S`; any other
    stops with an error that says what to do;
  - `--config.data.shards=2` gives 1 process and 2 processes the same batches (the two-process
    tests compare their loss curves).
"""

from __future__ import annotations

import json
import zlib

import numpy as np

from af_next_jax.batch import AUDIO_FIELDS

AUDIO = frozenset(AUDIO_FIELDS)


class DataShardError(ValueError):
    """The saved data positions cannot be continued with this process count or config."""


class GroupDataMismatch(RuntimeError):
    """The members of a row group built different host batches (or hold different data positions)."""


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


def resolve_shard_count(configured: int, num_groups: int, batch_size: int, max_windows: int,
                        saved: int | None = None, saved_step: int | None = None) -> int:
    """S for this run: the checkpoint's if resuming, else `configured` or the row-group count; validated."""
    where = f"the checkpoint at step {saved_step}" if saved_step is not None else "the checkpoint"
    if saved is not None:
        if configured and configured != saved:
            raise DataShardError(
                f"config.data.shards={configured}, but {where} read its data as {saved} shards; changing it would "
                f"change the data order of a running run. Drop the override (0 keeps the saved {saved}), or start "
                f"a new --workdir.")
        shards = saved
        if shards % num_groups:
            raise DataShardError(
                f"{where} holds the positions of {saved} data shards, which the {num_groups} row groups of this "
                f"layout (processes that read different data: the process count, divided by the processes a row "
                f"spans) cannot split evenly, so the run cannot continue with the same data order. Resume with a "
                f"process count and mesh whose row-group count divides {shards} ({_divisors(shards)}), or start a "
                f"new --workdir (with --config.init_from=... to keep the weights).")
    else:
        shards = configured or num_groups
        if shards % num_groups:
            raise DataShardError(f"config.data.shards={shards} must be a multiple of the {num_groups} row groups "
                                 f"(every group reads whole shards)")
    for name, value in (("batch_size", batch_size), ("max_windows_per_batch", max_windows)):
        if value % shards:
            raise DataShardError(f"config.data.{name}={value} is global and must split evenly over {shards} data "
                                 f"shards (config.data.shards, default one per row group)")
    return shards


def owned_shards(num_shards: int, group_index: int, num_groups: int) -> range:
    per_group = num_shards // num_groups
    return range(group_index * per_group, (group_index + 1) * per_group)


def merged_positions(states: list[bytes | None]) -> list[bytes | None]:
    """The saved data positions of every process, each shard once: the members of a row group hold the
    same shards, whose positions must agree. States of injected iterators (not HostBatches) are kept as
    they are, one per process."""
    decoded = [json.loads(state) if state else None for state in states]
    if not all(isinstance(d, dict) and "num_shards" in d for d in decoded):
        return states
    shards: dict[str, str] = {}
    holders: dict[str, int] = {}
    for process, state in enumerate(decoded):
        for shard, position in state["shards"].items():
            if shard in shards and shards[shard] != position:
                raise GroupDataMismatch(
                    f"processes {holders[shard]} and {process} read data shard {shard} but are at different "
                    f"positions: the members of a row group no longer read the same data (a different data config, "
                    f"seed or files on one host?)")
            shards[shard], holders[shard] = position, process
    return [json.dumps({"num_shards": decoded[0]["num_shards"], "shards": dict(sorted(shards.items()))}).encode()]


def batch_fingerprint(batch: dict) -> int:
    """A cheap checksum of a host batch's tokens and audio layout (what two members must agree on)."""
    checksum = 0
    for name in ("token_ids", "segment_ids", "mel_valid_frames", "window_index"):
        checksum = zlib.crc32(np.ascontiguousarray(batch[name]).tobytes(), checksum)
    return checksum & 0x7FFFFFFF


def check_group_agreement(plan, fingerprint: int, step: int) -> None:
    """A collective (every process, same step): the members of every row group built the same host batch.

    Raises GroupDataMismatch naming the processes before the step trains on it."""
    from af_next_jax.train import multihost

    fingerprints = multihost.allgather_ints([fingerprint])[:, 0]
    for group in plan.groups:
        seen = {process: int(fingerprints[process]) for process in group.processes}
        if len(set(seen.values())) > 1:
            raise GroupDataMismatch(
                f"row group {group.index} (processes {list(group.processes)}) built different batches for step "
                f"{step} (checksums by process: {seen}): its members must read the same data with the same config "
                f"(data.*, seed, files); stopping before training on them")


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
