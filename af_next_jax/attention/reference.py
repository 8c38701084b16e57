"""Attention that materialises the [L, S] scores: the XLA kernel and the ground truth for the others.

`xla_attention` is the "xla" kernel of a decoding step (one query row) and the reference every other
path is tested against (training shapes run recompute.py, which equals it without saving the scores); `reference_attention` also returns the LSE and computes in float64 when given
float64 inputs (the kernels' tests use it as ground truth). Both follow masking.py's convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from af_next_jax.attention.masking import EMPTY_ROW_LSE, MASK_SCORE, visible_BxLxS


def xla_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, causal, segment_ids_q_BxL=None,
                  segment_ids_kv_BxS=None, sm_scale=None):
    """GQA without repeating K/V: the G = H/K query heads of one KV head are stacked along the query
    axis, so both matmuls are plain batched [B, K] matmuls (XLA's CPU backend runs a dot with several
    free dimensions ~4x slower than this layout)."""
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
    visible = visible_BxLxS(q_len, kv_len, causal=causal, segment_ids_q_BxL=segment_ids_q_BxL,
                            segment_ids_kv_BxS=segment_ids_kv_BxS)
    scores_BxKxGxLxS = jnp.where(visible[:, None, None], scores_BxKxGxLxS, MASK_SCORE)
    probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS, axis=-1)
    # The convention: a row that sees no key gets 0 (the softmax alone would give it the uniform
    # average). Zeroing the probabilities, not the output, also zeroes that row's gradients.
    probs_BxKxGxLxS = jnp.where(visible.any(axis=-1)[:, None, None, :, None], probs_BxKxGxLxS, 0.0)
    probs_BxKxGLxS = probs_BxKxGxLxS.astype(value_BxSxKxD.dtype).reshape(batch, num_kv_heads, groups * q_len,
                                                                         kv_len)
    out_BxKxGLxD = jnp.einsum("bkls,bksd->bkld", probs_BxKxGLxS, value_BxKxSxD)
    return (out_BxKxGLxD.reshape(batch, num_kv_heads, groups, q_len, head_dim)
            .transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim))


def reference_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, causal: bool = False,
                        segment_ids_q_BxL=None, segment_ids_kv_BxS=None, q_offset=0, kv_offset=0,
                        sm_scale=None):
    """(out [B, L, H, D], lse [B, H, L]) in float32, or float64 given float64 inputs; tests only."""
    batch, q_len, num_heads, head_dim = query_BxLxHxD.shape
    kv_len, num_kv_heads = key_BxSxKxD.shape[1], key_BxSxKxD.shape[2]
    groups = num_heads // num_kv_heads
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    dtype = jnp.promote_types(query_BxLxHxD.dtype, jnp.float32)
    query_BxLxKxGxD = query_BxLxHxD.astype(dtype).reshape(batch, q_len, num_kv_heads, groups, head_dim)
    scores_BxKxGxLxS = jnp.einsum("blkgd,bskd->bkgls", query_BxLxKxGxD, key_BxSxKxD.astype(dtype),
                                  precision=jax.lax.Precision.HIGHEST) * sm_scale
    visible = visible_BxLxS(q_len, kv_len, causal=causal, segment_ids_q_BxL=segment_ids_q_BxL,
                            segment_ids_kv_BxS=segment_ids_kv_BxS, q_offset=q_offset,
                            kv_offset=kv_offset)[:, None, None]
    # Double `where` so masked entries never produce inf/NaN, in the value or in its gradient.
    row_max = jax.lax.stop_gradient(jnp.where(visible, scores_BxKxGxLxS, -jnp.inf).max(-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    exp_scores = jnp.where(visible, jnp.exp(jnp.where(visible, scores_BxKxGxLxS, 0.0) - row_max), 0.0)
    row_sum = exp_scores.sum(-1, keepdims=True)
    nonempty = row_sum > 0
    probs = exp_scores / jnp.where(nonempty, row_sum, 1.0)
    out_BxLxKxGxD = jnp.einsum("bkgls,bskd->blkgd", probs, value_BxSxKxD.astype(dtype),
                               precision=jax.lax.Precision.HIGHEST)
    lse_BxKxGxL = jnp.where(nonempty, row_max + jnp.log(jnp.where(nonempty, row_sum, 1.0)),
                            EMPTY_ROW_LSE)[..., 0]
    out = out_BxLxKxGxD.reshape(batch, q_len, num_heads, head_dim).astype(query_BxLxHxD.dtype)
    return out, lse_BxKxGxL.reshape(batch, num_heads, q_len)
