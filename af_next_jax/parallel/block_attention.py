"""Attention on one block of queries against one block of keys, returning the log-sum-exp.

The unit the ring and Ulysses paths are built from. `block_forward` has the signature of the Pallas
kernel (`af_next_kernels.flash_attention.flash_attention(..., return_lse=True)`) and is its plain-JAX
fallback: a `lax.scan` over key chunks with an online softmax, so memory is O(L x chunk), never
O(L x S). `block_backward` is the matching flash backward given the *final* LSE and
delta = rowsum(dO * O): the ring calls it once per visiting K/V block (ring.py), which is why it takes
them as inputs instead of recomputing them.

Masking matches model/attention.py `xla_attention` exactly: masked scores are set to the finite
MASK_VALUE (not -inf), so a fully masked row averages the values uniformly instead of giving NaN,
and LSEs of blocks still merge exactly (a masked block's weight is exp(MASK_VALUE - lse) = 0).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from af_next_jax.model.attention import MASK_VALUE

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


def _visible_BxLxC(segment_ids_q_BxL, segment_ids_kv_BxC, causal, q_offset, kv_start):
    q_len, chunk = segment_ids_q_BxL.shape[1], segment_ids_kv_BxC.shape[1]
    visible_BxLxC = segment_ids_q_BxL[:, :, None] == segment_ids_kv_BxC[:, None, :]
    if causal:
        q_positions = q_offset + jnp.arange(q_len)
        kv_positions = kv_start + jnp.arange(chunk)
        visible_BxLxC = visible_BxLxC & (q_positions[:, None] >= kv_positions[None, :])[None]
    return visible_BxLxC


def _masked_scores(query_BxLxKxGxD, key_BxCxKxD, visible_BxLxC, sm_scale):
    scores_BxKxGxLxC = jnp.einsum("blkgd,bckd->bkglc", query_BxLxKxGxD, key_BxCxKxD,
                                  preferred_element_type=jnp.float32) * sm_scale
    return jnp.where(visible_BxLxC[:, None, None], scores_BxKxGxLxC, MASK_VALUE)


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

    def step(carry, chunk_inputs):
        max_BxKxGxL, sum_BxKxGxL, acc_BxLxKxGxD = carry
        index, key_BxCxKxD, value_BxCxKxD, segment_ids_kv_BxC = chunk_inputs
        visible_BxLxC = _visible_BxLxC(segment_ids_q_BxL, segment_ids_kv_BxC, causal, q_offset,
                                       kv_offset + index * chunk)
        scores_BxKxGxLxC = _masked_scores(query_BxLxKxGxD, key_BxCxKxD, visible_BxLxC, sm_scale)
        new_max_BxKxGxL = jnp.maximum(max_BxKxGxL, scores_BxKxGxLxC.max(axis=-1))
        probs_BxKxGxLxC = jnp.exp(scores_BxKxGxLxC - new_max_BxKxGxL[..., None])
        rescale_BxKxGxL = jnp.exp(max_BxKxGxL - new_max_BxKxGxL)
        sum_BxKxGxL = sum_BxKxGxL * rescale_BxKxGxL + probs_BxKxGxLxC.sum(axis=-1)
        update_BxLxKxGxD = jnp.einsum("bkglc,bckd->blkgd", probs_BxKxGxLxC.astype(value_BxCxKxD.dtype),
                                      value_BxCxKxD, preferred_element_type=jnp.float32)
        acc_BxLxKxGxD = acc_BxLxKxGxD * jnp.moveaxis(rescale_BxKxGxL, 3, 1)[..., None] + update_BxLxKxGxD
        return (new_max_BxKxGxL, sum_BxKxGxL, acc_BxLxKxGxD), None

    init = (jnp.full((batch, num_kv_heads, groups, q_len), -jnp.inf, jnp.float32),
            jnp.zeros((batch, num_kv_heads, groups, q_len), jnp.float32),
            jnp.zeros((batch, q_len, num_kv_heads, groups, head_dim), jnp.float32))
    chunks = (jnp.arange(kv_len // chunk), _chunked(key_BxSxKxD, chunk), _chunked(value_BxSxKxD, chunk),
              _chunked(segment_ids_kv_BxS, chunk))
    (max_BxKxGxL, sum_BxKxGxL, acc_BxLxKxGxD), _ = jax.lax.scan(step, init, chunks)
    out_BxLxHxD = (acc_BxLxKxGxD / jnp.moveaxis(sum_BxKxGxL, 3, 1)[..., None]).reshape(
        batch, q_len, num_heads, head_dim)
    lse_BxHxL = (max_BxKxGxL + jnp.log(sum_BxKxGxL)).reshape(batch, num_heads, q_len)
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
    lse_BxKxGxL = lse_BxHxL.reshape(batch, num_kv_heads, groups, q_len)
    delta_BxKxGxL = delta_BxHxL.reshape(batch, num_kv_heads, groups, q_len)
    chunk = _kv_chunk(kv_len, kv_chunk)

    def step(dquery_BxLxKxGxD, chunk_inputs):
        index, key_BxCxKxD, value_BxCxKxD, segment_ids_kv_BxC = chunk_inputs
        visible_BxLxC = _visible_BxLxC(segment_ids_q_BxL, segment_ids_kv_BxC, causal, q_offset,
                                       kv_offset + index * chunk)
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


def merge_blocks(out_a_BxLxHxD, lse_a_BxHxL, out_b_BxLxHxD, lse_b_BxHxL):
    """Combine two partial softmax results over disjoint key sets by their LSEs (-inf = empty)."""
    lse_max = jnp.maximum(lse_a_BxHxL, lse_b_BxHxL)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    weight_a, weight_b = jnp.exp(lse_a_BxHxL - lse_max), jnp.exp(lse_b_BxHxL - lse_max)
    total = weight_a + weight_b
    lse_BxHxL = lse_max + jnp.log(total)
    scale_a = jnp.moveaxis(weight_a / jnp.where(total > 0, total, 1.0), 1, 2)[..., None]
    return out_a_BxLxHxD * scale_a + out_b_BxLxHxD * (1.0 - scale_a), lse_BxHxL


def pallas_block_forward_available() -> bool:
    """The Pallas kernel is used for block forwards when importable and not on the CPU."""
    if jax.default_backend() == "cpu":
        return False
    try:
        from af_next_kernels.flash_attention import flash_attention  # noqa: F401
    except ImportError:
        return False
    return True


def select_block_forward(block_implementation: str):
    """'xla' -> block_forward; 'pallas' -> the kernel; 'auto' -> pallas when available."""
    if block_implementation == "auto":
        block_implementation = "pallas" if pallas_block_forward_available() else "xla"
    if block_implementation == "xla":
        return block_forward
    if block_implementation == "pallas":
        from af_next_kernels.flash_attention import flash_attention

        def pallas_forward(query, key, value, **kwargs):
            kwargs.pop("kv_chunk", None)
            out, lse = flash_attention(query, key, value, return_lse=True, **kwargs)
            return out.astype(jnp.float32), lse
        return pallas_forward
    raise ValueError(f"block_implementation must be 'auto', 'xla' or 'pallas', got {block_implementation!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def local_flash_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, segment_ids_q_BxL, segment_ids_kv_BxS,
                          causal, block_forward_fn):
    """Memory-efficient attention on one device (used by Ulysses after its all-to-all)."""
    out, _ = block_forward_fn(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, causal=causal,
                              segment_ids_q_BxL=segment_ids_q_BxL, segment_ids_kv_BxS=segment_ids_kv_BxS)
    return out.astype(query_BxLxHxD.dtype)


def _local_forward(query, key, value, segment_ids_q, segment_ids_kv, causal, block_forward_fn):
    out, lse = block_forward_fn(query, key, value, causal=causal, segment_ids_q_BxL=segment_ids_q,
                                segment_ids_kv_BxS=segment_ids_kv)
    out = out.astype(query.dtype)
    return out, (query, key, value, segment_ids_q, segment_ids_kv, out, lse)


def _local_backward(causal, block_forward_fn, residuals, dout):
    query, key, value, segment_ids_q, segment_ids_kv, out, lse = residuals
    dquery, dkey, dvalue = block_backward(query, key, value, dout, lse, attention_delta(out, dout), causal=causal,
                                          segment_ids_q_BxL=segment_ids_q, segment_ids_kv_BxS=segment_ids_kv)
    return (dquery.astype(query.dtype), dkey.astype(key.dtype), dvalue.astype(value.dtype), None, None)


local_flash_attention.defvjp(_local_forward, _local_backward)
