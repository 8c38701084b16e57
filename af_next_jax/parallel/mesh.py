"""The device mesh: one `MeshConfig` says how many devices each parallelism axis gets.

Mesh axes, outermost (slowest links) to innermost (fastest links):

  data     pure data parallelism: parameters replicated, batch split
  fsdp     data parallelism with parameters and optimizer state sharded (ZeRO-3)
  ring     sequence parallelism by ring attention (K/V blocks rotate with ppermute)
  ulysses  sequence parallelism by all-to-all (sequence-sharded <-> head-sharded)
  tensor   tensor (head / MLP-width) parallelism

Every axis has a size inside one slice (ICI: a TPU slice, an NVLink node) and a size across slices
(DCN: TPU multislice, InfiniBand between nodes). The mesh axis size is the product. The order puts
`ring` outside `ulysses`: the paper recipe is Ulysses inside a node and the ring across nodes, and
the ring is the one that tolerates slow links (it overlaps each transfer with one block of compute).

The decoder sequence is sharded over ("ring", "ulysses") with ring the major index, so that after
the Ulysses all-to-all each device holds one contiguous ring chunk (see attention/sequence_parallel.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils

from af_next_jax.config import SEQUENCE_PARALLEL_STRATEGIES, SEQUENCE_PARALLELISM

MESH_AXES = ("data", "fsdp", "ring", "ulysses", "tensor")
BATCH_AXES = ("data", "fsdp")
SEQUENCE_AXES = ("ring", "ulysses")  # ring major: the order the sequence is split in


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Per-slice (ICI) and across-slice (DCN) sizes of each mesh axis.

    One ICI size may be -1: it takes whatever devices per slice the others leave.
    `shard_params_over_sequence`: also shard parameters / optimizer state over the sequence axes
    (FSDP over data-free axes). Without it the sequence-parallel devices hold full replicas, which
    at 7B costs ~15 GB of bf16 weights + 60 GB of Adam state per device.
    `shard_windows_over_sequence`: the encoder's window axis is split over the sequence axes too
    (the encoder is parallelised over windows, never with sequence parallelism).
    """

    data: int = 1
    fsdp: int = -1
    ring: int = 1
    ulysses: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_ring: int = 1
    dcn_ulysses: int = 1
    dcn_tensor: int = 1
    shard_params_over_sequence: bool = True
    shard_windows_over_sequence: bool = True

    def __post_init__(self):
        ici = self.ici_sizes
        _require(sum(size == -1 for size in ici.values()) <= 1,
                 f"at most one ICI mesh axis may be -1 (fill the remaining devices), got {ici}")
        for name, size in {**ici, **self.dcn_sizes}.items():
            _require(size == -1 or size >= 1, f"mesh axis {name} must be >= 1 (or -1 to fill), got {size}")
        for name, size in self.dcn_sizes.items():
            _require(size != -1, f"DCN sizes must be explicit, got dcn {name}={size}")

    @property
    def ici_sizes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in MESH_AXES}

    @property
    def dcn_sizes(self) -> dict[str, int]:
        return {axis: getattr(self, f"dcn_{axis}") for axis in MESH_AXES}

    @property
    def num_slices(self) -> int:
        return math.prod(self.dcn_sizes.values())

    def resolved(self, num_devices: int) -> "MeshConfig":
        """The same config with the -1 axis filled in for `num_devices`; validates the product."""
        num_slices = self.num_slices
        _require(num_devices % num_slices == 0,
                 f"{num_devices} devices do not split into {num_slices} slices "
                 f"(DCN sizes {self.dcn_sizes}); the DCN product must divide the device count")
        per_slice = num_devices // num_slices
        ici = self.ici_sizes
        fixed = math.prod(size for size in ici.values() if size != -1)
        fill_axis = next((axis for axis, size in ici.items() if size == -1), None)
        if fill_axis is not None:
            _require(per_slice % fixed == 0,
                     f"mesh ICI sizes {ici} leave no integer size for {fill_axis}: {per_slice} devices per "
                     f"slice are not divisible by {fixed}; valid products divide {per_slice}: "
                     f"{_divisors(per_slice)}")
            return dataclasses.replace(self, **{fill_axis: per_slice // fixed})
        if fixed != per_slice:
            suggestion = _suggest_fill(ici, per_slice)
            raise ValueError(
                f"mesh ICI sizes {ici} multiply to {fixed} but there are {per_slice} devices per slice "
                f"({num_devices} devices / {num_slices} slices). {suggestion}")
        return self

    def axis_sizes(self, num_devices: int | None = None) -> dict[str, int]:
        """Total (ICI x DCN) size of every mesh axis."""
        config = self.resolved(num_devices if num_devices is not None else jax.device_count())
        return {axis: config.ici_sizes[axis] * config.dcn_sizes[axis] for axis in MESH_AXES}


def _suggest_fill(ici: dict[str, int], per_slice: int) -> str:
    for axis in ("fsdp", "data"):
        others = math.prod(size for name, size in ici.items() if name != axis)
        if per_slice % others == 0:
            return f"Try {axis}={per_slice // others} (or {axis}=-1 to fill)."
    return f"Choose sizes whose product is {per_slice}, or set one axis to -1."


def make_mesh(mesh_config: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """Build the mesh with axes MESH_AXES (all AxisType.Auto, so GSPMD and logical rules apply)."""
    devices = list(jax.devices() if devices is None else devices)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.sharding.Mesh(mesh_device_array(mesh_config, devices), MESH_AXES, axis_types=axis_types)


def mesh_device_array(mesh_config: MeshConfig, devices) -> np.ndarray:
    """The devices arranged in the mesh's shape (MESH_AXES order).

    With DCN sizes > 1 the devices are arranged slice-major (`create_hybrid_device_mesh`); when the
    devices' slice indices do not give that many slices (GPUs, CPU), they are grouped by process:
    one host = one slice. Any objects with `platform`, `process_index` (and `slice_index`) work, so a
    cluster's layout can be worked out from stand-in devices (benchmarks/scaling.py).
    """
    config = mesh_config.resolved(len(devices))
    ici_shape = [config.ici_sizes[axis] for axis in MESH_AXES]
    dcn_shape = [config.dcn_sizes[axis] for axis in MESH_AXES]
    if config.num_slices == 1:
        if devices[0].platform == "tpu":
            return mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
        return np.asarray(devices).reshape(ici_shape)
    num_slice_ids = len({getattr(device, "slice_index", 0) for device in devices})
    return mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=num_slice_ids != config.num_slices,
        allow_split_physical_axes=True)


def validate_sequence_parallel(mesh_config: MeshConfig, *, num_heads: int, num_kv_heads: int,
                               sequence_length: int, batch_size: int, implementation: str,
                               num_devices: int | None = None) -> None:
    """Fail early, naming the numbers and a valid alternative, for a mesh that cannot run a model.

    Checks: heads split over tensor x ulysses; K/V heads over tensor (then replicated up to the
    Ulysses degree only when needed); the sequence into 2 x ring zigzag chunks and ring x ulysses
    shards; the batch over data x fsdp; the implementation uses exactly the sequence axes it owns.
    `implementation` is the config's `sequence_parallelism`: none | ring | ulysses | hybrid.
    """
    _require(implementation in SEQUENCE_PARALLELISM,
             f"unknown sequence parallelism {implementation!r}; valid: {SEQUENCE_PARALLELISM}")
    sizes = mesh_config.axis_sizes(num_devices)
    ring, ulysses, tensor = sizes["ring"], sizes["ulysses"], sizes["tensor"]
    batch_shards = sizes["data"] * sizes["fsdp"]
    if implementation == "ring":
        _require(ulysses == 1, f"implementation 'ring' shards the sequence over the ring axis only, but the "
                 f"mesh has ulysses={ulysses}; use implementation='hybrid', or ring={ring * ulysses}, ulysses=1")
    elif implementation == "ulysses":
        _require(ring == 1, f"implementation 'ulysses' shards the sequence over the ulysses axis only, but the "
                 f"mesh has ring={ring}; use implementation='hybrid', or ulysses={ring * ulysses}, ring=1")
    elif implementation == "none":
        _require(ring * ulysses == 1, f"sequence_parallelism 'none' attends over the whole sequence on one device, "
                 f"but the mesh shards it ring={ring} x ulysses={ulysses}; choose one of "
                 f"{SEQUENCE_PARALLEL_STRATEGIES} or set ring=ulysses=1")
    _require(num_heads % tensor == 0, f"{num_heads} query heads do not split over tensor={tensor}; valid tensor "
             f"sizes: {[d for d in _divisors(num_heads) if num_kv_heads % d == 0]}")
    _require(num_kv_heads % tensor == 0,
             f"{num_kv_heads} K/V heads do not split over tensor={tensor}; valid tensor sizes: "
             f"{[d for d in _divisors(num_heads) if num_kv_heads % d == 0]}")
    local_heads, local_kv_heads = num_heads // tensor, num_kv_heads // tensor
    if ulysses > 1:
        _require(local_heads % ulysses == 0,
                 f"{num_heads} query heads / tensor={tensor} = {local_heads} do not split over ulysses={ulysses}; "
                 f"valid ulysses degrees: {_divisors(local_heads)} (move the rest to ring with "
                 f"implementation='hybrid')")
        replicated_kv = math.lcm(local_kv_heads, ulysses)
        _require(local_heads % replicated_kv == 0,
                 f"{local_kv_heads} K/V heads per tensor shard cannot be replicated to a multiple of "
                 f"ulysses={ulysses} that divides {local_heads} query heads; valid ulysses degrees: "
                 f"{[d for d in _divisors(local_heads) if local_heads % math.lcm(local_kv_heads, d) == 0]}")
    multiple = math.lcm(2 * ring, ring * ulysses) if ring > 1 else ulysses
    _require(sequence_length % multiple == 0,
             f"sequence length {sequence_length} must be a multiple of {multiple} "
             f"(2 x ring={ring} zigzag chunks and ring x ulysses={ring * ulysses} shards); nearest valid "
             f"lengths: {sequence_length // multiple * multiple} or {-(-sequence_length // multiple) * multiple}")
    _require(batch_size % batch_shards == 0,
             f"batch size {batch_size} does not split over data x fsdp = {batch_shards}; use a multiple of "
             f"{batch_shards} or move devices from data/fsdp to ring/ulysses")


def kv_replication(num_kv_heads_local: int, ulysses: int) -> int:
    """How many times each local K/V head is repeated so the Ulysses all-to-all can split K/V heads.

    1 when the K/V heads already split over the Ulysses degree (GQA kept); otherwise the smallest
    factor making the count a multiple of the degree (lcm / count), so no more memory than needed.
    """
    if num_kv_heads_local % ulysses == 0:
        return 1
    return math.lcm(num_kv_heads_local, ulysses) // num_kv_heads_local
