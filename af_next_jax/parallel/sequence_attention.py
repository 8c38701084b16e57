"""Sequence-parallel attention on global arrays: the entry point model/attention.py dispatches to.

`sequence_parallel_attention` runs inside the model's jit under `jax.set_mesh(mesh)`; it reads the
ambient mesh, wraps the per-shard algorithm in `jax.shard_map` and returns a global array sharded
like its query:

  ring      ring attention over the "ring" axis (the mesh must have ulysses = 1)
  ulysses   all-to-all over the "ulysses" axis, local flash attention (ring = 1)
  hybrid    Ulysses over "ulysses", ring attention over "ring" on each Ulysses head group

Layout contract: the sequence axis is sharded over ("ring", "ulysses"), ring major; for ring and
hybrid with `causal`, tokens are in the zigzag layout of layout.py (`load_balanced=True`, what the
model does). Batch is split over ("data", "fsdp") and heads over "tensor" when they divide.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from af_next_jax.parallel.block_attention import local_flash_attention, select_block_forward
from af_next_jax.parallel.mesh import BATCH_AXES, SEQUENCE_AXES, kv_replication
from af_next_jax.parallel.ring import ring_attention
from af_next_jax.parallel.ulysses import ulysses_attention


def _axis_size(mesh, name: str) -> int:
    return mesh.shape[name] if name in mesh.axis_names else 1


def _dividing_axes(mesh, names, dim: int):
    """The prefix of `names` (present in the mesh) whose product divides `dim`, as a spec entry."""
    kept, product = [], 1
    for name in names:
        if name not in mesh.axis_names:
            continue
        if dim % (product * mesh.shape[name]):
            break
        kept.append(name)
        product *= mesh.shape[name]
    return tuple(kept) if kept else None


def _check(mesh, implementation, num_heads, num_kv_heads, length, tensor_axis):
    ring, ulysses = _axis_size(mesh, "ring"), _axis_size(mesh, "ulysses")
    if implementation == "ring" and ulysses > 1:
        raise ValueError(f"implementation 'ring' needs mesh ulysses=1, got ulysses={ulysses}; "
                         f"use 'hybrid' or fold it into ring={ring * ulysses}")
    if implementation == "ulysses" and ring > 1:
        raise ValueError(f"implementation 'ulysses' needs mesh ring=1, got ring={ring}; "
                         f"use 'hybrid' or fold it into ulysses={ring * ulysses}")
    tensor = _axis_size(mesh, "tensor") if tensor_axis else 1
    local_heads, local_kv_heads = num_heads // tensor, num_kv_heads // tensor
    if local_heads % ulysses:
        raise ValueError(f"{local_heads} query heads per tensor shard do not split over ulysses={ulysses}")
    if local_heads % (local_kv_heads * kv_replication(local_kv_heads, ulysses)):
        raise ValueError(f"{local_kv_heads} K/V heads cannot be replicated to a multiple of ulysses={ulysses} "
                         f"dividing {local_heads} query heads")
    chunks = 2 * ring if ring > 1 else 1
    if length % (ring * ulysses) or length % chunks:
        raise ValueError(f"sequence length {length} must be a multiple of ring x ulysses = {ring * ulysses} "
                         f"and of 2 x ring = {2 * ring}")


def sequence_parallel_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, implementation: str, causal: bool,
                                segment_ids_q_BxL=None, segment_ids_kv_BxS=None, load_balanced: bool = True,
                                block_implementation: str = "auto"):
    """Attention equal to model/attention.py `xla_attention`, computed over the ambient mesh.

    `load_balanced`: the sequence is in the zigzag layout (ring/hybrid, causal). With False the
    ring's causal mask would be wrong, so it is only accepted when the ring degree is 1.
    `block_implementation`: 'auto' uses the Pallas flash kernel for blocks when available on the
    backend, else the plain-JAX chunked block (block_attention.py); 'xla' / 'pallas' force one.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(f"attention implementation {implementation!r} needs a mesh: call the model under "
                         f"`jax.set_mesh(af_next_jax.parallel.make_mesh(mesh_config))`")
    if implementation not in ("ring", "ulysses", "hybrid"):
        raise ValueError(f"implementation must be 'ring', 'ulysses' or 'hybrid', got {implementation!r}")
    batch, length, num_heads, _ = query_BxLxHxD.shape
    num_kv_heads = key_BxSxKxD.shape[2]
    if key_BxSxKxD.shape[1] != length:
        raise ValueError(f"sequence-parallel attention is self-attention: query length {length} != key length "
                         f"{key_BxSxKxD.shape[1]}")
    ring, ulysses = _axis_size(mesh, "ring"), _axis_size(mesh, "ulysses")
    if causal and ring > 1 and not load_balanced:
        raise ValueError("ring attention with a causal mask needs the zigzag layout (layout.to_load_balanced)")
    batch_axes = _dividing_axes(mesh, BATCH_AXES, batch)
    tensor_axis = _dividing_axes(mesh, ("tensor",), num_kv_heads)
    tensor_axis = tensor_axis if tensor_axis and num_heads % mesh.shape["tensor"] == 0 else None
    _check(mesh, implementation, num_heads, num_kv_heads, length, tensor_axis)
    sequence_axes = tuple(name for name in SEQUENCE_AXES if name in mesh.axis_names) or None
    if segment_ids_q_BxL is None:
        segment_ids_q_BxL = segment_ids_kv_BxS = jnp.ones((batch, length), jnp.int32)

    block_forward_fn = select_block_forward(block_implementation)
    if ring > 1:
        local_attention = functools.partial(ring_attention, "ring", ring, causal, block_forward_fn)
    else:
        def local_attention(q, k, v, sq, skv):
            return local_flash_attention(q, k, v, sq, skv, causal, block_forward_fn)

    def per_shard(query, key, value, segment_ids_q, segment_ids_kv):
        return ulysses_attention(local_attention, "ulysses", ulysses, query, key, value, segment_ids_q,
                                 segment_ids_kv)

    heads_spec = P(batch_axes, sequence_axes, tensor_axis, None)
    tokens_spec = P(batch_axes, sequence_axes)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(heads_spec,) * 3 + (tokens_spec,) * 2,
                         out_specs=heads_spec, check_vma=False)(
        query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, segment_ids_q_BxL, segment_ids_kv_BxS)
