"""The single attention dispatch point of the model.

Every attention in the model (encoder and decoder) calls `dot_product_attention`. The
`implementation` switch picks the backend:
  xla      plain JAX (this file): materialises the [L, S] scores; the reference for the others
  pallas   fused flash attention from `kernels/` (imported as `af_next_kernels`)
  ring, ulysses, hybrid
           sequence-parallel attention over the mesh's sequence axes (`af_next_jax.parallel`)

Masks are described, never materialised by callers: `causal` plus per-token `segment_ids` (a query
attends a key only when their segment ids are equal). The encoder passes segment ids of 1 for every
query and the key's validity (1 valid, 0 padded) for keys, which masks padded frames as transformers
does. A query with no visible key gets a finite output (never NaN), which padding windows rely on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from af_next_jax.config import ATTENTION_IMPLEMENTATIONS

# Finite mask value: a fully masked row softmaxes to a uniform average instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def xla_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, causal, segment_ids_q_BxL=None,
                  segment_ids_kv_BxS=None, sm_scale=None):
    """Reference attention; GQA without repeating K/V: the G = H/K query heads of one KV head are
    stacked along the query axis, so both matmuls are plain batched [B, K] matmuls (XLA's CPU
    backend runs a dot with several free dimensions ~4x slower than this layout)."""
    batch, q_len, num_heads, head_dim = query_BxLxHxD.shape
    kv_len, num_kv_heads = key_BxSxKxD.shape[1], key_BxSxKxD.shape[2]
    groups = num_heads // num_kv_heads
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    query_BxKxGLxD = (query_BxLxHxD.reshape(batch, q_len, num_kv_heads, groups, head_dim)
                      .transpose(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, groups * q_len, head_dim))
    key_BxKxSxD = key_BxSxKxD.transpose(0, 2, 1, 3)
    value_BxKxSxD = value_BxSxKxD.transpose(0, 2, 1, 3)
    scores_BxKxGLxS = jnp.einsum("bkld,bksd->bkls", query_BxKxGLxD, key_BxKxSxD,
                                 preferred_element_type=jnp.float32) * sm_scale
    scores_BxKxGxLxS = scores_BxKxGLxS.reshape(batch, num_kv_heads, groups, q_len, kv_len)
    visible_BxLxS = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        visible_BxLxS = visible_BxLxS & (jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :])[None]
    if segment_ids_q_BxL is not None:
        visible_BxLxS = visible_BxLxS & (segment_ids_q_BxL[:, :, None] == segment_ids_kv_BxS[:, None, :])
    scores_BxKxGxLxS = jnp.where(visible_BxLxS[:, None, None], scores_BxKxGxLxS, MASK_VALUE)
    probs_BxKxGLxS = (jax.nn.softmax(scores_BxKxGxLxS, axis=-1).astype(value_BxSxKxD.dtype)
                      .reshape(batch, num_kv_heads, groups * q_len, kv_len))
    out_BxKxGLxD = jnp.einsum("bkls,bksd->bkld", probs_BxKxGLxS, value_BxKxSxD)
    return (out_BxKxGLxD.reshape(batch, num_kv_heads, groups, q_len, head_dim)
            .transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim))


def dot_product_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, causal: bool,
                          segment_ids_q_BxL=None, segment_ids_kv_BxS=None, implementation: str = "xla"):
    """Attention over [batch, length, heads, head_dim] tensors; K/V may have fewer heads (GQA)."""
    if query_BxLxHxD.shape[2] % key_BxSxKxD.shape[2]:
        raise ValueError(f"query heads {query_BxLxHxD.shape[2]} must be a multiple of key/value heads "
                         f"{key_BxSxKxD.shape[2]}")
    if (segment_ids_q_BxL is None) != (segment_ids_kv_BxS is None):
        raise ValueError("pass both segment_ids_q_BxL and segment_ids_kv_BxS, or neither")
    kwargs = dict(causal=causal, segment_ids_q_BxL=segment_ids_q_BxL, segment_ids_kv_BxS=segment_ids_kv_BxS)
    if implementation == "xla":
        return xla_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, **kwargs)
    if implementation == "pallas":
        from af_next_kernels.flash_attention import flash_attention
        return flash_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, **kwargs)
    if implementation in ("ring", "ulysses", "hybrid"):
        from af_next_jax.parallel.sequence_attention import sequence_parallel_attention
        return sequence_parallel_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD,
                                           implementation=implementation, **kwargs)
    raise ValueError(f"unknown attention implementation {implementation!r}; valid: {ATTENTION_IMPLEMENTATIONS}")
