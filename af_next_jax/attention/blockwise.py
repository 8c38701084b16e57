"""Attention of one block of queries against one block of keys, in plain JAX, with its LSE.

The unit ring and Ulysses are built from on the reference/CPU path (`block_kernels.py` picks it or
the Pallas kernel). `block_forward` has the Pallas kernel's block signature: a `lax.scan` over key
chunks with the online softmax of `masking.py`, so memory is O(L x chunk), never O(L x S).
`block_backward` is the matching flash backward given the *final* LSE and delta = rowsum(dO * O):
the ring calls it once per visiting K/V block, which is why it takes them as inputs.
`merge_partials` combines results over disjoint key sets. All follow masking.py's convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from af_next_jax.attention.masking import (EMPTY_ROW_LSE, MASK_SCORE, backward_lse, finish_softmax,
                                           online_softmax_update, visible_BxLxS)

DEFAULT_KV_CHUNK = 512


def _kv_chunk(kv_len: int, target: int) -> int:
    """Largest divisor of kv_len not above target (keeps shapes static without padding)."""
    for size in range(min(target, kv_len), 0, -1):
        if kv_len % size == 0:
            return size
    return kv_len


def _chunked(x, chunk: int, axis: int = 1):
    """[B, S, ...] -> [S/chunk, B, chunk, ...] for lax.scan."""
    x = x.reshape(x.shape[:axis] + (x.shape[axis] // chunk, chunk) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _masked_scores(query_BxLxKxGxD, key_BxCxKxD, visible_BxLxC, sm_scale):
    scores_BxKxGxLxC = jnp.einsum("blkgd,bckd->bkglc", query_BxLxKxGxD, key_BxCxKxD,
                                  preferred_element_type=jnp.float32) * sm_scale
    return jnp.where(visible_BxLxC[:, None, None], scores_BxKxGxLxC, MASK_SCORE)


def _default_segments(segment_ids, batch, length):
    return jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids


def block_forward(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, causal: bool, segment_ids_q_BxL=None,
                  segment_ids_kv_BxS=None, q_offset=0, kv_offset=0, return_lse: bool = True,
                  kv_chunk: int = DEFAULT_KV_CHUNK):
    """(out [B, L, H, D] float32, lse [B, H, L] float32); causal compares q_offset+i >= kv_offset+j."""
    batch, q_len, num_heads, head_dim = query_BxLxHxD.shape
    kv_len, num_kv_heads = key_BxSxKxD.shape[1], key_BxSxKxD.shape[2]
    groups = num_heads // num_kv_heads
    sm_scale = head_dim ** -0.5
    segment_ids_q_BxL = _default_segments(segment_ids_q_BxL, batch, q_len)
    segment_ids_kv_BxS = _default_segments(segment_ids_kv_BxS, batch, kv_len)
    query_BxLxKxGxD = query_BxLxHxD.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    chunk = _kv_chunk(kv_len, kv_chunk)

    def step(state, chunk_inputs):
        index, key_BxCxKxD, value_BxCxKxD, segment_ids_kv_BxC = chunk_inputs
        visible_BxLxC = visible_BxLxS(q_len, chunk, causal=causal, segment_ids_q_BxL=segment_ids_q_BxL,
                                      segment_ids_kv_BxS=segment_ids_kv_BxC, q_offset=q_offset,
                                      kv_offset=kv_offset + index * chunk)
        scores_BxKxGxLxC = _masked_scores(query_BxLxKxGxD, key_BxCxKxD, visible_BxLxC, sm_scale)
        probs_times_values = lambda probs_BxKxGxLxC: jnp.einsum(
            "bkglc,bckd->bkgld", probs_BxKxGxLxC.astype(value_BxCxKxD.dtype), value_BxCxKxD,
            preferred_element_type=jnp.float32)
        return online_softmax_update(*state, scores_BxKxGxLxC, probs_times_values), None

    init = (jnp.full((batch, num_kv_heads, groups, q_len), MASK_SCORE, jnp.float32),
            jnp.zeros((batch, num_kv_heads, groups, q_len), jnp.float32),
            jnp.zeros((batch, num_kv_heads, groups, q_len, head_dim), jnp.float32))
    chunks = (jnp.arange(kv_len // chunk), _chunked(key_BxSxKxD, chunk), _chunked(value_BxSxKxD, chunk),
              _chunked(segment_ids_kv_BxS, chunk))
    (max_BxKxGxL, sum_BxKxGxL, acc_BxKxGxLxD), _ = jax.lax.scan(step, init, chunks)
    scale_BxKxGxL, lse_BxKxGxL = finish_softmax(max_BxKxGxL, sum_BxKxGxL)
    out_BxLxHxD = (acc_BxKxGxLxD * scale_BxKxGxL[..., None]).transpose(0, 3, 1, 2, 4).reshape(
        batch, q_len, num_heads, head_dim)
    lse_BxHxL = lse_BxKxGxL.reshape(batch, num_heads, q_len)
    return (out_BxLxHxD, lse_BxHxL) if return_lse else out_BxLxHxD


def block_backward(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, dout_BxLxHxD, lse_BxHxL, delta_BxHxL, *,
                   causal: bool, segment_ids_q_BxL=None, segment_ids_kv_BxS=None, q_offset=0, kv_offset=0,
                   kv_chunk: int = DEFAULT_KV_CHUNK):
    """Flash-attention backward of one block: (dq, dk, dv) in float32.

    P = exp(S - lse) with the final lse of the query rows; dS = P * (dO V^T - delta).
    """
    batch, q_len, num_heads, head_dim = query_BxLxHxD.shape
    kv_len, num_kv_heads = key_BxSxKxD.shape[1], key_BxSxKxD.shape[2]
    groups = num_heads // num_kv_heads
    sm_scale = head_dim ** -0.5
    segment_ids_q_BxL = _default_segments(segment_ids_q_BxL, batch, q_len)
    segment_ids_kv_BxS = _default_segments(segment_ids_kv_BxS, batch, kv_len)
    query_BxLxKxGxD = query_BxLxHxD.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    dout_BxLxKxGxD = dout_BxLxHxD.reshape(batch, q_len, num_kv_heads, groups, head_dim)
    lse_BxKxGxL = backward_lse(lse_BxHxL.reshape(batch, num_kv_heads, groups, q_len))
    delta_BxKxGxL = delta_BxHxL.reshape(batch, num_kv_heads, groups, q_len)
    chunk = _kv_chunk(kv_len, kv_chunk)

    def step(dquery_BxLxKxGxD, chunk_inputs):
        index, key_BxCxKxD, value_BxCxKxD, segment_ids_kv_BxC = chunk_inputs
        visible_BxLxC = visible_BxLxS(q_len, chunk, causal=causal, segment_ids_q_BxL=segment_ids_q_BxL,
                                      segment_ids_kv_BxS=segment_ids_kv_BxC, q_offset=q_offset,
                                      kv_offset=kv_offset + index * chunk)
        scores_BxKxGxLxC = _masked_scores(query_BxLxKxGxD, key_BxCxKxD, visible_BxLxC, sm_scale)
        probs_BxKxGxLxC = jnp.exp(scores_BxKxGxLxC - lse_BxKxGxL[..., None])
        dvalue_BxCxKxD = jnp.einsum("bkglc,blkgd->bckd", probs_BxKxGxLxC, dout_BxLxKxGxD,
                                    preferred_element_type=jnp.float32)
        dprobs_BxKxGxLxC = jnp.einsum("blkgd,bckd->bkglc", dout_BxLxKxGxD, value_BxCxKxD,
                                      preferred_element_type=jnp.float32)
        dscores_BxKxGxLxC = probs_BxKxGxLxC * (dprobs_BxKxGxLxC - delta_BxKxGxL[..., None]) * sm_scale
        dquery_BxLxKxGxD = dquery_BxLxKxGxD + jnp.einsum("bkglc,bckd->blkgd", dscores_BxKxGxLxC, key_BxCxKxD,
                                                         preferred_element_type=jnp.float32)
        dkey_BxCxKxD = jnp.einsum("bkglc,blkgd->bckd", dscores_BxKxGxLxC, query_BxLxKxGxD,
                                  preferred_element_type=jnp.float32)
        return dquery_BxLxKxGxD, (dkey_BxCxKxD, dvalue_BxCxKxD)

    chunks = (jnp.arange(kv_len // chunk), _chunked(key_BxSxKxD, chunk), _chunked(value_BxSxKxD, chunk),
              _chunked(segment_ids_kv_BxS, chunk))
    init = jnp.zeros((batch, q_len, num_kv_heads, groups, head_dim), jnp.float32)
    dquery_BxLxKxGxD, (dkey_NxBxCxKxD, dvalue_NxBxCxKxD) = jax.lax.scan(step, init, chunks)

    def unchunk(x_NxBxCxKxD):
        return jnp.moveaxis(x_NxBxCxKxD, 0, 1).reshape(batch, kv_len, num_kv_heads, head_dim)

    return (dquery_BxLxKxGxD.reshape(batch, q_len, num_heads, head_dim), unchunk(dkey_NxBxCxKxD),
            unchunk(dvalue_NxBxCxKxD))


def attention_delta(out_BxLxHxD, dout_BxLxHxD):
    """rowsum(dO * O) as [B, H, L] float32: the softmax-backward correction term."""
    return jnp.einsum("blhd,blhd->bhl", out_BxLxHxD.astype(jnp.float32), dout_BxLxHxD.astype(jnp.float32))


def empty_partial(out_like_BxLxHxD, lse_like_BxHxL):
    """The partial result of a key set a row cannot see: (0, EMPTY_ROW_LSE), merge's identity."""
    return jnp.zeros_like(out_like_BxLxHxD), jnp.full_like(lse_like_BxHxL, EMPTY_ROW_LSE)


def merge_partials(out_a_BxLxHxD, lse_a_BxHxL, out_b_BxLxHxD, lse_b_BxHxL):
    """Combine two partial softmax results over disjoint key sets by their LSEs.

    lse = logaddexp(lse_a, lse_b); out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b. An empty
    part (EMPTY_ROW_LSE) gets weight 0 next to a real one; two empty parts stay empty (out 0, lse
    EMPTY_ROW_LSE up to log 2, which float32 cannot represent at 1e30).
    """
    lse_max = jnp.maximum(lse_a_BxHxL, lse_b_BxHxL)
    weight_a, weight_b = jnp.exp(lse_a_BxHxL - lse_max), jnp.exp(lse_b_BxHxL - lse_max)
    total = weight_a + weight_b
    scale_a = jnp.moveaxis(weight_a / total, 1, 2)[..., None]
    return out_a_BxLxHxD * scale_a + out_b_BxLxHxD * (1.0 - scale_a), lse_max + jnp.log(total)
