"""Run a Pallas attention kernel under a multi-device mesh: per shard, inside `jax.shard_map`.

XLA cannot partition a Mosaic (TPU) or Triton (GPU) custom call: compiled for a mesh whose axes are
automatic, such a call stops with "Mosaic kernels cannot be automatically partitioned". Attention
without sequence parallelism (the encoder always, the decoder of stages 1-3) is independent per batch
row and per K/V head group, so each device runs the kernel on its rows (batch over the mesh's non-tensor
axes) and heads (over `tensor`), as far as they divide. Inside the sequence-parallel `shard_map` (or on
one device) there is no automatic axis left and the kernel is called directly.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

from af_next_jax.parallel.rules import fit_spec


def automatic_mesh_axes() -> tuple[str, ...]:
    """Axes of the mesh in context that XLA would partition (Auto, size > 1); () outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind == jax.sharding.AxisType.Auto and mesh.shape[name] > 1)


def kernel_per_shard(kernel, query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, causal: bool,
                     segment_ids_q_BxL=None, segment_ids_kv_BxS=None):
    """`kernel(q, k, v, causal=..., segment_ids_q_BxL=..., segment_ids_kv_BxS=...)`, per shard."""
    masks = dict(causal=causal, segment_ids_q_BxL=segment_ids_q_BxL, segment_ids_kv_BxS=segment_ids_kv_BxS)
    axes = automatic_mesh_axes()
    if not axes:
        return kernel(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, **masks)
    mesh = jax.sharding.get_abstract_mesh()
    batch, length, heads, head_dim = query_BxLxHxD.shape
    # Heads split over `tensor` only as far as K/V heads do (a query group stays with its K/V head).
    head_groups = math.gcd(heads, key_BxSxKxD.shape[2])
    rows_axes = tuple(axis for axis in axes if axis != "tensor")
    spec_BxLxHxD = fit_spec(P(rows_axes, None, "tensor" if "tensor" in axes else None, None),
                             (batch, length, head_groups, head_dim), mesh)
    spec_BxL = P(spec_BxLxHxD[0], None)
    with_segments = segment_ids_q_BxL is not None

    def per_shard(q, k, v, *segment_ids):
        segment_q, segment_kv = segment_ids if with_segments else (None, None)
        return kernel(q, k, v, causal=causal, segment_ids_q_BxL=segment_q, segment_ids_kv_BxS=segment_kv)

    segment_ids = (segment_ids_q_BxL, segment_ids_kv_BxS) if with_segments else ()
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(spec_BxLxHxD,) * 3 + (spec_BxL,) * len(segment_ids),
                         out_specs=spec_BxLxHxD, check_vma=False)(
        query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *segment_ids)
