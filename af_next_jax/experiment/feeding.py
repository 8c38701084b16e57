"""How the data reaches the devices: which processes build the same host batch (a row group).

A process feeds the devices it drives. The rows of a batch are split over the mesh's batch axes
(data x fsdp) and each row's sequence over the sequence axes (ring x ulysses); when the sequence
axes span several processes (ring across nodes, or a v5p row on 8 hosts of 4 chips), those
processes hold slices of the same rows. They form a row group: every member reads the same data
shards (same seed, same packing), builds the same host batch of the group's rows, and hands each of
its devices the slice it holds. Groups hold disjoint rows and read disjoint data; a process whose
devices hold whole rows is a group of one. Each row owns a fixed run of window slots (the batch
contract, af_next_jax/batch.py), and the windows are split over every device with the batch axes
major, so the windows a group's devices hold are its rows' slots. A group's rows need not be one
block: a TPU mesh orders the chips by the physical torus, so a host's chips may hold rows 0, 1, 16, 17.
The host batch lists them in increasing order.

The plan is computed from the mesh's device array (each device's process) and the batch's
partition specs, so it works for compile-only devices (a libtpu topology) and for stand-in devices
with process indices alike.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from af_next_jax.experiment.settings import ExperimentError


@dataclasses.dataclass(frozen=True)
class RowGroup:
    index: int                        # groups are numbered in row order
    processes: tuple[int, ...]        # the members, which build the same host batch
    rows: tuple[int, ...]             # global rows of a micro-batch, increasing: the host batch's rows
    windows: tuple[int, ...]          # global windows (the rows' slots), increasing: the host batch's windows

    def local_start(self, field_kind: str, global_start: int) -> int:
        """Where a device's block of rows ("rows") or windows ("windows") starting at `global_start`
        begins in the host batch."""
        return getattr(self, field_kind).index(global_start)


@dataclasses.dataclass(frozen=True)
class FeedingPlan:
    groups: tuple[RowGroup, ...]
    batch_size: int
    num_windows: int

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def group_of(self, process: int) -> RowGroup:
        return next(group for group in self.groups if process in group.processes)

    def describe(self) -> str:
        """A table: who reads what, and the host batch each process builds."""
        group = self.groups[0]
        lines = [f"data feeding: {self.num_groups} row group(s) read disjoint data; the members of a group read "
                 f"the same data and build the same host batch of {len(group.rows)} rows and {len(group.windows)} "
                 f"windows per micro-batch"]
        for group in self.groups[:8]:
            lines.append(f"  group {group.index}: processes {_ranges(group.processes)} | rows "
                         f"{_ranges(group.rows)} | windows {_ranges(group.windows)}")
        if len(self.groups) > 8:
            lines.append(f"  ... {len(self.groups) - 8} more groups")
        return "\n".join(lines)


def _ranges(values) -> str:
    """1, 2, 3, 7 -> "1-3, 7"."""
    runs, values = [], sorted(values)
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(f"{a}-{b}" if b > a + 1 else (f"{a}, {b}" if b > a else f"{a}") for a, b in runs)


def _blocks_per_device(mesh_shape: dict, axis_names: tuple, entry, size: int) -> np.ndarray:
    """For every device of the mesh (an array shaped like the mesh), the [start, stop) block of a
    dimension of `size` split over the mesh axes of `entry` (major to minor)."""
    entry = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    shape = tuple(mesh_shape[name] for name in axis_names)
    coords = np.indices(shape)  # [axes, *mesh]
    index = np.zeros(shape, np.int64)
    for name in entry:
        axis = axis_names.index(name)
        index = index * shape[axis] + coords[axis]
    parts = math.prod(mesh_shape[name] for name in entry)
    block = size // parts
    return np.stack([index * block, (index + 1) * block], axis=-1)


def feeding_plan(device_processes: np.ndarray, mesh_shape: dict, axis_names: tuple, rows_spec_entry,
                 windows_spec_entry, batch_size: int, num_windows: int) -> FeedingPlan:
    """The row groups of a mesh whose devices (in mesh order) belong to `device_processes`, for a batch
    whose rows are split over `rows_spec_entry` and windows over `windows_spec_entry` (mesh axis names).

    Raises ExperimentError when processes hold overlapping but different rows, or groups of unequal size
    (layouts no host pipeline can feed)."""
    rows = _blocks_per_device(mesh_shape, axis_names, rows_spec_entry, batch_size)
    windows = _blocks_per_device(mesh_shape, axis_names, windows_spec_entry, num_windows)
    by_process: dict[int, tuple[set, set]] = {}
    for position in np.ndindex(device_processes.shape):
        process = int(device_processes[position])
        row_set, window_set = by_process.setdefault(process, (set(), set()))
        row_set.update(range(*rows[position]))
        window_set.update(range(*windows[position]))
    members: dict[frozenset, list[int]] = {}
    for process, (row_set, _) in sorted(by_process.items()):
        members.setdefault(frozenset(row_set), []).append(process)
    groups, seen = [], set()
    for row_set, processes in sorted(members.items(), key=lambda item: min(item[0])):
        if row_set & seen:
            others = [group.processes for group in groups if row_set & set(group.rows)]
            raise ExperimentError(
                f"processes {processes} and {others[0]} hold overlapping but different rows: a process would need "
                f"the data of two row groups, which no host pipeline can feed; choose mesh sizes whose sequence "
                f"axes cover whole hosts (or stay inside one)")
        seen |= row_set
        window_set = set().union(*(by_process[p][1] for p in processes))
        groups.append(RowGroup(len(groups), tuple(processes), tuple(sorted(row_set)), tuple(sorted(window_set))))
    if len({len(group.rows) for group in groups}) > 1:
        raise ExperimentError(f"row groups hold different numbers of rows ({[len(g.rows) for g in groups]}): "
                              f"data shards fill equal parts of a batch")
    return FeedingPlan(tuple(groups), batch_size, num_windows)


def plan_for_mesh(mesh, micro_batch_shardings: dict, batch_size: int, num_windows: int) -> FeedingPlan:
    """The plan of a concrete mesh (its devices' process indices) for the micro-batch's shardings."""
    processes = np.vectorize(lambda device: device.process_index, otypes=[np.int64])(mesh.devices)
    rows_entry = micro_batch_shardings["token_ids"].spec[0] if len(micro_batch_shardings["token_ids"].spec) else None
    windows_spec = micro_batch_shardings["mel_windows"].spec
    return feeding_plan(processes, dict(mesh.shape), tuple(mesh.axis_names), rows_entry,
                        windows_spec[0] if len(windows_spec) else None, batch_size, num_windows)
