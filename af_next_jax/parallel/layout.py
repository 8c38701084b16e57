"""Causal load balancing for ring attention: the zigzag sequence layout.

With a causal mask and the sequence cut into R contiguous ring shards, shard 0 attends to almost
nothing and shard R-1 to everything. Zigzag: cut the sequence into 2R chunks and give ring rank r
the chunks r and 2R-1-r, so every rank owns one early and one late chunk and does the same work.
For R = 4 the order is [0, 7 | 1, 6 | 2, 5 | 3, 4].

The model applies `to_load_balanced` to embeddings, positions and segment ids before the decoder
layers and `from_load_balanced` to the final hidden states; everything per-token in between
(norms, MLP, RoPE by the carried positions, the loss) is order-independent, and ring attention
builds its causal mask from the original order (ring.py). Only the ring degree matters: in the
hybrid, each ring rank's chunk pair is further split over the Ulysses axis and regathered whole by
the all-to-all.

Under a mesh the permutation is a handful of partial `ppermute`s between sequence shards (each
device receives only its own L / (R U) tokens); written as a gather on the global array, XLA would
all-gather the whole sequence onto every device (64 MiB instead of 8 for 64K x 256 float32 on 8).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def ambient_ring_degree() -> int:
    """Size of the "ring" axis of the mesh set with `jax.set_mesh` (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "ring" not in mesh.axis_names:
        return 1
    return mesh.shape["ring"]


def zigzag_chunk_order(ring_degree: int) -> np.ndarray:
    """Chunk index held at each position of the load-balanced layout: [0, 2R-1, 1, 2R-2, ...]."""
    order = [[rank, 2 * ring_degree - 1 - rank] for rank in range(ring_degree)]
    return np.asarray(order, dtype=np.int32).reshape(-1)


def _permute_chunks(x, chunk_order: np.ndarray, axis: int):
    axis = axis % x.ndim
    num_chunks = len(chunk_order)
    length = x.shape[axis]
    if length % num_chunks:
        raise ValueError(f"sequence length {length} must be a multiple of 2 x ring degree = {num_chunks} "
                         f"for the zigzag layout; pad it to {-(-length // num_chunks) * num_chunks}")
    chunked = x.reshape(x.shape[:axis] + (num_chunks, length // num_chunks) + x.shape[axis + 1:])
    return jnp.take(chunked, jnp.asarray(chunk_order), axis=axis).reshape(x.shape)


def _piece_moves(ring_degree: int, ulysses_degree: int, inverse: bool):
    """Static plan of the permutation on a sequence sharded over ring x ulysses devices (ring major).

    The sequence is cut into pieces small enough to be whole both in a zigzag chunk and in a device
    shard (lcm(2R, R U) pieces). Returns (pieces per device, {(target slot, source slot): [(source
    device, target device), ...]}): one partial ppermute per key moves every piece once.
    """
    devices = ring_degree * ulysses_degree
    num_chunks = 2 * ring_degree
    num_pieces = math.lcm(num_chunks, devices)
    per_chunk, per_device = num_pieces // num_chunks, num_pieces // devices
    chunk_order = zigzag_chunk_order(ring_degree)
    balanced_to_natural = [int(chunk_order[p // per_chunk]) * per_chunk + p % per_chunk for p in range(num_pieces)]
    moves: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for balanced, natural in enumerate(balanced_to_natural):
        target, source = (natural, balanced) if inverse else (balanced, natural)
        key = (target % per_device, source % per_device)
        moves.setdefault(key, []).append((source // per_device, target // per_device))
    return per_device, moves


def _permute_sharded(x, axis: int, mesh, inverse: bool):
    """The zigzag permutation as partial ppermutes under shard_map: each device receives exactly its
    L / (R U) tokens (a plain gather would make XLA all-gather the whole sequence on every device)."""
    axis = axis % x.ndim
    ring_degree, ulysses_degree = mesh.shape["ring"], mesh.shape.get("ulysses", 1)
    sequence_axes = tuple(name for name in ("ring", "ulysses") if name in mesh.axis_names)
    devices = ring_degree * ulysses_degree
    length = x.shape[axis]
    num_pieces = math.lcm(2 * ring_degree, devices)
    if length % num_pieces:
        raise ValueError(f"sequence length {length} must be a multiple of {num_pieces} (2 x ring={ring_degree} "
                         f"zigzag chunks over ring x ulysses={devices} shards); pad it to "
                         f"{-(-length // num_pieces) * num_pieces}")
    per_device, moves = _piece_moves(ring_degree, ulysses_degree, inverse)
    batch_axes = tuple(name for name in ("data", "fsdp") if name in mesh.axis_names)
    batch_shards = math.prod(mesh.shape[name] for name in batch_axes)
    spec = [None] * x.ndim
    spec[axis] = sequence_axes
    if axis != 0 and batch_axes and x.shape[0] % batch_shards == 0:
        spec[0] = batch_axes
    spec = jax.sharding.PartitionSpec(*spec)

    def per_shard(local):
        pieces = jnp.split(local, per_device, axis=axis)
        slots = [jnp.zeros_like(pieces[0]) for _ in range(per_device)]
        for (target_slot, source_slot), pairs in sorted(moves.items()):
            slots[target_slot] = slots[target_slot] + jax.lax.ppermute(pieces[source_slot], sequence_axes, pairs)
        return jnp.concatenate(slots, axis=axis)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(x)


def to_load_balanced(x, axis: int = 1, *, ring_degree: int | None = None):
    """Natural token order -> zigzag order along `axis` (identity when the ring degree is 1).

    Under a mesh with ring > 1 the permutation runs as ppermutes between sequence shards; with an
    explicit `ring_degree` (no mesh) it is a plain gather on the global array.
    """
    if ring_degree is None:
        ring_degree = ambient_ring_degree()
        if ring_degree > 1:
            return _permute_sharded(x, axis, jax.sharding.get_abstract_mesh(), inverse=False)
    if ring_degree == 1:
        return x
    return _permute_chunks(x, zigzag_chunk_order(ring_degree), axis)


def from_load_balanced(x, axis: int = 1, *, ring_degree: int | None = None):
    """Zigzag order -> natural token order along `axis`; inverse of `to_load_balanced`."""
    if ring_degree is None:
        ring_degree = ambient_ring_degree()
        if ring_degree > 1:
            return _permute_sharded(x, axis, jax.sharding.get_abstract_mesh(), inverse=True)
    if ring_degree == 1:
        return x
    return _permute_chunks(x, np.argsort(zigzag_chunk_order(ring_degree)).astype(np.int32), axis)
