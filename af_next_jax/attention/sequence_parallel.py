"""Sequence-parallel attention on global arrays: ring, Ulysses or hybrid over the ambient mesh.

`sequence_parallel_attention` runs inside the model's jit under `jax.set_mesh(mesh)`; it reads the
ambient mesh, wraps the per-shard algorithm in `jax.shard_map` and returns a global array sharded
like its query:

  ring      ring attention over the "ring" axis (the mesh must have ulysses = 1)
  ulysses   all-to-all over the "ulysses" axis, then the block kernel on whole sequences (ring = 1)
  hybrid    Ulysses over "ulysses", ring attention over "ring" on each Ulysses head group

The block kernel (xla | pallas | auto, block_kernels.py) is chosen apart from the strategy and runs
both the forward and the backward of every block.

Layout contract: the sequence axis is sharded over ("ring", "ulysses"), ring major; for ring and
hybrid with `causal`, tokens are in the zigzag layout of parallel/layout.py (`load_balanced=True`,
what the model does). Batch is split over ("data", "fsdp") and heads over "tensor" when they divide.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from af_next_jax.attention.blockwise import attention_delta
from af_next_jax.attention.block_kernels import BlockKernel, select_block_kernel
from af_next_jax.attention.ring import ring_attention
from af_next_jax.attention.ulysses import ulysses_attention
from af_next_jax.config import SEQUENCE_PARALLEL_STRATEGIES
from af_next_jax.parallel.mesh import BATCH_AXES, SEQUENCE_AXES, MeshConfig, validate_sequence_parallel
from af_next_jax.parallel.rules import fit_spec


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def local_flash_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, segment_ids_q_BxL, segment_ids_kv_BxS,
                          causal, block_kernel: BlockKernel):
    """Memory-efficient attention on one device (Ulysses after its all-to-all): the block kernel's
    forward, and its backward from the saved (out, lse) only."""
    out, _ = block_kernel.forward(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, causal=causal,
                                  segment_ids_q_BxL=segment_ids_q_BxL, segment_ids_kv_BxS=segment_ids_kv_BxS)
    return out.astype(query_BxLxHxD.dtype)


def _local_forward(query, key, value, segment_ids_q, segment_ids_kv, causal, block_kernel):
    out, lse = block_kernel.forward(query, key, value, causal=causal, segment_ids_q_BxL=segment_ids_q,
                                    segment_ids_kv_BxS=segment_ids_kv)
    out = out.astype(query.dtype)
    return out, (query, key, value, segment_ids_q, segment_ids_kv, out, lse)


def _local_backward(causal, block_kernel, residuals, dout):
    query, key, value, segment_ids_q, segment_ids_kv, out, lse = residuals
    dquery, dkey, dvalue = block_kernel.backward(query, key, value, dout, lse, attention_delta(out, dout),
                                                 causal=causal, segment_ids_q_BxL=segment_ids_q,
                                                 segment_ids_kv_BxS=segment_ids_kv)
    return (dquery.astype(query.dtype), dkey.astype(key.dtype), dvalue.astype(value.dtype), None, None)


local_flash_attention.defvjp(_local_forward, _local_backward)


def _axis_size(mesh, name: str) -> int:
    return mesh.shape[name] if name in mesh.axis_names else 1


def sequence_parallel_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, implementation: str, causal: bool,
                                segment_ids_q_BxL=None, segment_ids_kv_BxS=None, load_balanced: bool = True,
                                block_implementation: str = "auto"):
    """Attention equal to reference.py `xla_attention`, computed over the ambient mesh.

    `implementation`: the strategy, ring | ulysses | hybrid. `block_implementation`: the kernel of
    each block, xla | pallas | auto (pallas when the mesh's devices are GPUs or TPUs).
    `load_balanced`: the sequence is in the zigzag layout (ring/hybrid, causal). With False the
    ring's causal mask would be wrong, so it is only accepted when the ring degree is 1.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        raise ValueError(f"sequence parallelism {implementation!r} needs a mesh: call the model under "
                         f"`jax.set_mesh(af_next_jax.parallel.make_mesh(mesh_config))`")
    if implementation not in SEQUENCE_PARALLEL_STRATEGIES:
        raise ValueError(f"sequence parallelism must be one of {SEQUENCE_PARALLEL_STRATEGIES}, got {implementation!r}")
    batch, length, num_heads, head_dim = query_BxLxHxD.shape
    num_kv_heads = key_BxSxKxD.shape[2]
    if key_BxSxKxD.shape[1] != length:
        raise ValueError(f"sequence-parallel attention is self-attention: query length {length} != key length "
                         f"{key_BxSxKxD.shape[1]}")
    ring, ulysses = _axis_size(mesh, "ring"), _axis_size(mesh, "ulysses")
    if causal and ring > 1 and not load_balanced:
        raise ValueError("ring attention with a causal mask needs the zigzag layout (layout.to_load_balanced)")
    # Heads go over "tensor" only when it divides both the query and the K/V heads (gcd of the two).
    heads_spec = fit_spec(P(BATCH_AXES, SEQUENCE_AXES, "tensor", None),
                           (batch, length, math.gcd(num_heads, num_kv_heads), head_dim), mesh)
    tensor = _axis_size(mesh, "tensor") if heads_spec[2] else 1
    # The mesh as these heads see it: one check, the trainer's (mesh.validate_sequence_parallel).
    validate_sequence_parallel(MeshConfig(data=1, fsdp=1, ring=ring, ulysses=ulysses, tensor=tensor),
                               num_heads=num_heads, num_kv_heads=num_kv_heads, sequence_length=length,
                               batch_size=1, implementation=implementation,
                               num_devices=ring * ulysses * tensor)
    if segment_ids_q_BxL is None:
        segment_ids_q_BxL = segment_ids_kv_BxS = jnp.ones((batch, length), jnp.int32)

    block_kernel = select_block_kernel(block_implementation)
    if ring > 1:
        local_attention = functools.partial(ring_attention, "ring", ring, causal, block_kernel)
    else:
        def local_attention(q, k, v, sq, skv):
            return local_flash_attention(q, k, v, sq, skv, causal, block_kernel)

    def per_shard(query, key, value, segment_ids_q, segment_ids_kv):
        return ulysses_attention(local_attention, "ulysses", ulysses, query, key, value, segment_ids_q,
                                 segment_ids_kv)

    tokens_spec = P(*heads_spec[:2])
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(heads_spec,) * 3 + (tokens_spec,) * 2,
                         out_specs=heads_spec, check_vma=False)(
        query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, segment_ids_q_BxL, segment_ids_kv_BxS)
