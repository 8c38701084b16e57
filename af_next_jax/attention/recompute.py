"""The "xla" kernel for training shapes: plain-JAX attention whose backward recomputes the scores.

Autodiff of `reference.xla_attention` keeps every layer's [B, H, L, S] probabilities alive until the
backward pass (and the layer scan stacks them). This is flash attention's recurrence on one key block
instead: the `custom_vjp` saves q, k, v, the output and the LSE (O(L) per row) and the backward
recomputes P = exp(S - lse), with dS = P * (dP - rowsum(dO * O)). Beyond WHOLE_ROW_MAX_KEYS keys it
runs the key-chunked `blockwise.py` kernel (what ring/Ulysses run); causal self-attention is cut into
CAUSAL_ROW_BLOCKS blocks of query rows, which skips the tiles above the diagonal.

Layout: GQA without repeating K/V, the G = H/K query heads of a K/V head stacked along the query
axis, so every matmul is a plain batched [B, K] matmul. The backward has two variants, chosen by the
caller's `cpu_layouts` (the program's `Numerics`, model/numerics.py): `_block_backward`, plain dots
that XLA lays out (TPU, GPU), and `_block_backward_cpu_layouts`, the same math on the transposed
scores with transposes held by optimization barriers, the layouts XLA:CPU runs fast. Measurements:
docs/PERFORMANCE.md, "Second pass: backward layouts for XLA:CPU". Masks follow masking.py's
convention: a row that sees no key gets output 0, lse EMPTY_ROW_LSE and zero gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from af_next_jax.attention.block_kernels import XLA_BLOCKS
from af_next_jax.attention.masking import MASK_SCORE, backward_lse, finish_softmax, visible_BxLxS
from af_next_jax.attention.sequence_parallel import local_flash_attention

# Up to this many keys a row's scores are computed in one block ([B, H, L, S] float32 transient,
# never saved); beyond it the key-chunked block kernel keeps them O(L x 512).
WHOLE_ROW_MAX_KEYS = 4096
# Causal self-attention in this many blocks of query rows, each against the keys up to its last row;
# blocks of fewer rows than MIN_ROWS_PER_BLOCK cost more in kernel launches than the skipped tiles save.
CAUSAL_ROW_BLOCKS = 4
MIN_ROWS_PER_BLOCK = 64


def _group_major(x_BxLxHxD, num_kv_heads):
    """[B, L, H, D] -> [B, K, G, L, D]: the G query heads of each K/V head next to each other."""
    batch, length, num_heads, head_dim = x_BxLxHxD.shape
    return x_BxLxHxD.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 2, 3, 1, 4)


def _heads_last(x_BxKxGxLxD):
    """[B, K, G, L, D] -> [B, L, H, D], the inverse of `_group_major`."""
    batch, num_kv_heads, groups, length, head_dim = x_BxKxGxLxD.shape
    return x_BxKxGxLxD.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_kv_heads * groups, head_dim)


def _row_blocks(q_len: int, kv_len: int, causal: bool):
    """[(first row, end row, end key)]: causal self-attention skips the keys after a block's last row
    (with 4 blocks, 10 of 16 query x key tiles are computed); otherwise one block of whole rows."""
    blocks = CAUSAL_ROW_BLOCKS
    if not causal or q_len != kv_len or q_len % blocks or q_len // blocks < MIN_ROWS_PER_BLOCK:
        return [(0, q_len, kv_len)]
    size = q_len // blocks
    return [(index * size, (index + 1) * size, (index + 1) * size) for index in range(blocks)]


def _stack_rows(x_BxKxGxLxD):
    """[B, K, G, L, D] -> [B, K, G*L, D]: the G heads stacked along the rows, so every matmul is a plain
    batched [B, K] matmul (XLA:CPU runs a dot with several free dimensions ~4x slower)."""
    batch, num_kv_heads, groups, length, head_dim = x_BxKxGxLxD.shape
    return x_BxKxGxLxD.reshape(batch, num_kv_heads, groups * length, head_dim)


def _masked_scores(scaled_query_BxKxGxLxD, key_BxKxSxD, visible_BxLxS):
    """QK^T (the query already scaled) with masked entries at MASK_SCORE, as [B, K, G, L, S] float32."""
    batch, num_kv_heads, groups, q_len, _ = scaled_query_BxKxGxLxD.shape
    kv_len = key_BxKxSxD.shape[2]
    scores_BxKxGLxS = jnp.einsum("bkld,bksd->bkls", _stack_rows(scaled_query_BxKxGxLxD), key_BxKxSxD,
                                 preferred_element_type=jnp.float32)
    scores_BxKxGxLxS = scores_BxKxGLxS.reshape(batch, num_kv_heads, groups, q_len, kv_len)
    # An additive [B, L, S] bias rather than a select: XLA:CPU materialised the select's broadcast
    # MASK_SCORE operand at the full [B, K, G, L, S] shape. Exact: s + 0 = s, and s + MASK_SCORE rounds
    # to MASK_SCORE in float32 for any real score (|s| < 1e22).
    mask_bias_BxLxS = jnp.where(visible_BxLxS, 0.0, MASK_SCORE).astype(jnp.float32)
    return scores_BxKxGxLxS + mask_bias_BxLxS[:, None, None]


def _block_forward(scaled_query_BxKxGxLxD, key_BxKxSxD, value_BxKxSxD, visible_BxLxS):
    """(out [B, K, G, L, D] in the value dtype, lse [B, K, G, L] float32) of one block of rows."""
    batch, num_kv_heads, groups, q_len, head_dim = scaled_query_BxKxGxLxD.shape
    scores_BxKxGxLxS = _masked_scores(scaled_query_BxKxGxLxD, key_BxKxSxD, visible_BxLxS)
    max_BxKxGxL = scores_BxKxGxLxS.max(axis=-1)
    probs_BxKxGxLxS = jnp.exp(scores_BxKxGxLxS - max_BxKxGxL[..., None])  # unnormalised
    scale_BxKxGxL, lse_BxKxGxL = finish_softmax(max_BxKxGxL, probs_BxKxGxLxS.sum(axis=-1))
    probs_BxKxGLxS = probs_BxKxGxLxS.reshape(batch, num_kv_heads, groups * q_len, -1).astype(value_BxKxSxD.dtype)
    out_BxKxGLxD = jnp.einsum("bkls,bksd->bkld", probs_BxKxGLxS, value_BxKxSxD, preferred_element_type=jnp.float32)
    # Normalise the [L, D] output instead of the [L, S] probabilities: S / D times fewer multiplies.
    out_BxKxGxLxD = out_BxKxGLxD.reshape(batch, num_kv_heads, groups, q_len, head_dim) * scale_BxKxGxL[..., None]
    return out_BxKxGxLxD.astype(value_BxKxSxD.dtype), lse_BxKxGxL


def _block_backward(scaled_query_BxKxGxLxD, key_BxKxSxD, value_BxKxSxD, dout_BxKxGxLxD, lse_BxKxGxL,
                    delta_BxKxGxL, visible_BxLxS, sm_scale):
    """(dq [B, K, G, L, D] of the unscaled query, dk, dv [B, K, S, D]) float32 of one block of rows, given
    its final LSE: the scores in the forward's [G*L, S] layout and every dot as written, XLA choosing
    the layouts. The softmax scale multiplies K (small), never an [L, S] array."""
    batch, num_kv_heads, groups, q_len, head_dim = scaled_query_BxKxGxLxD.shape
    query_BxKxGLxD, dout_BxKxGLxD = _stack_rows(scaled_query_BxKxGxLxD), _stack_rows(dout_BxKxGxLxD)
    scores_BxKxGxLxS = _masked_scores(scaled_query_BxKxGxLxD, key_BxKxSxD, visible_BxLxS)
    # +inf lse for empty rows: their probabilities, hence every gradient through them, are exactly 0.
    probs_BxKxGLxS = jnp.exp(scores_BxKxGxLxS - backward_lse(lse_BxKxGxL)[..., None]).reshape(
        batch, num_kv_heads, groups * q_len, -1)
    dvalue_BxKxSxD = jnp.einsum("bkls,bkld->bksd", probs_BxKxGLxS.astype(dout_BxKxGLxD.dtype), dout_BxKxGLxD,
                                preferred_element_type=jnp.float32)
    dprobs_BxKxGLxS = jnp.einsum("bkld,bksd->bkls", dout_BxKxGLxD, value_BxKxSxD, preferred_element_type=jnp.float32)
    delta_BxKxGL = delta_BxKxGxL.reshape(batch, num_kv_heads, groups * q_len)
    dscores_BxKxGLxS = (probs_BxKxGLxS * (dprobs_BxKxGLxS - delta_BxKxGL[..., None])).astype(query_BxKxGLxD.dtype)
    dkey_BxKxSxD = jnp.einsum("bkls,bkld->bksd", dscores_BxKxGLxS, query_BxKxGLxD, preferred_element_type=jnp.float32)
    dquery_BxKxGLxD = jnp.einsum("bkls,bksd->bkld", dscores_BxKxGLxS, key_BxKxSxD * sm_scale,
                                 preferred_element_type=jnp.float32)
    return (dquery_BxKxGLxD.reshape(batch, num_kv_heads, groups, q_len, head_dim), dkey_BxKxSxD,
            dvalue_BxKxSxD)


def _block_backward_cpu_layouts(scaled_query_BxKxGxLxD, key_BxKxSxD, value_BxKxSxD, dout_BxKxGxLxD, lse_BxKxGxL,
                                delta_BxKxGxL, visible_BxLxS, sm_scale):
    """`_block_backward` in the layouts XLA:CPU runs fast. XLA:CPU runs a dot that contracts its large
    operand's major axis ("TN": [L, S] x [L, D] -> [S, D]) several times slower, so the scores are
    transposed ([S, G*L], keys as rows: dV = P^T dO and dK = dS^T Q contract their minor axis) and dQ
    is computed as dQ^T = K^T dS^T; the optimization barriers keep XLA from folding the transposes
    back into the dots (it does fold them otherwise)."""
    batch, num_kv_heads, groups, q_len, head_dim = scaled_query_BxKxGxLxD.shape
    kv_len = key_BxKxSxD.shape[2]
    query_BxKxGLxD, dout_BxKxGLxD = _stack_rows(scaled_query_BxKxGxLxD), _stack_rows(dout_BxKxGxLxD)
    scores_BxKxSxGL = jnp.einsum("bksd,bkld->bksl", key_BxKxSxD, query_BxKxGLxD, preferred_element_type=jnp.float32)
    mask_bias_BxSxL = jnp.where(jnp.swapaxes(visible_BxLxS, 1, 2), 0.0, MASK_SCORE).astype(jnp.float32)
    scores_BxKxSxGxL = (scores_BxKxSxGL.reshape(batch, num_kv_heads, kv_len, groups, q_len)
                        + mask_bias_BxSxL[:, None, :, None, :])
    # +inf lse for empty rows: their probabilities, hence every gradient through them, are exactly 0.
    probs_BxKxSxGL = jnp.exp(scores_BxKxSxGxL - backward_lse(lse_BxKxGxL)[:, :, None]).reshape(
        batch, num_kv_heads, kv_len, groups * q_len)
    dvalue_BxKxSxD = jnp.einsum("bksl,bkld->bksd", probs_BxKxSxGL.astype(dout_BxKxGLxD.dtype), dout_BxKxGLxD,
                                preferred_element_type=jnp.float32)
    dprobs_BxKxSxGL = jnp.einsum("bksd,bkld->bksl", value_BxKxSxD, dout_BxKxGLxD, preferred_element_type=jnp.float32)
    delta_BxKxGL = delta_BxKxGxL.reshape(batch, num_kv_heads, groups * q_len)
    dscores_BxKxSxGL = (probs_BxKxSxGL * (dprobs_BxKxSxGL - delta_BxKxGL[:, :, None])).astype(
        query_BxKxGLxD.dtype)
    dkey_BxKxSxD = jnp.einsum("bksl,bkld->bksd", dscores_BxKxSxGL, query_BxKxGLxD, preferred_element_type=jnp.float32)
    scaled_key_BxKxDxS = jax.lax.optimization_barrier(jnp.swapaxes(key_BxKxSxD, 2, 3) * sm_scale)
    dquery_BxKxDxGL = jax.lax.optimization_barrier(
        jnp.einsum("bkds,bksl->bkdl", scaled_key_BxKxDxS, dscores_BxKxSxGL, preferred_element_type=jnp.float32))
    dquery_BxKxGxLxD = jnp.swapaxes(dquery_BxKxDxGL, 2, 3).reshape(batch, num_kv_heads, groups, q_len, head_dim)
    return dquery_BxKxGxLxD, dkey_BxKxSxD, dvalue_BxKxSxD


def _visible(causal, segment_ids_q_BxL, segment_ids_kv_BxS, q_len, kv_len):
    return visible_BxLxS(q_len, kv_len, causal=causal, segment_ids_q_BxL=segment_ids_q_BxL,
                         segment_ids_kv_BxS=segment_ids_kv_BxS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _whole_row_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, segment_ids_q_BxL, segment_ids_kv_BxS, causal,
                         cpu_layouts):
    out, _ = _whole_row_forward(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, segment_ids_q_BxL, segment_ids_kv_BxS,
                                causal, cpu_layouts)
    return out


def _whole_row_forward(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, segment_ids_q_BxL, segment_ids_kv_BxS, causal,
                       cpu_layouts):
    del cpu_layouts  # the forward is the same dots on every platform
    q_len, kv_len, head_dim = query_BxLxHxD.shape[1], key_BxSxKxD.shape[1], query_BxLxHxD.shape[3]
    sm_scale = head_dim ** -0.5
    scaled_query_BxKxGxLxD = (_group_major(query_BxLxHxD, key_BxSxKxD.shape[2]) * sm_scale).astype(query_BxLxHxD.dtype)
    key_BxKxSxD, value_BxKxSxD = key_BxSxKxD.transpose(0, 2, 1, 3), value_BxSxKxD.transpose(0, 2, 1, 3)
    visible = _visible(causal, segment_ids_q_BxL, segment_ids_kv_BxS, q_len, kv_len)
    outs, lses = zip(*[
        _block_forward(scaled_query_BxKxGxLxD[:, :, :, first:end], key_BxKxSxD[:, :, :key_end],
                       value_BxKxSxD[:, :, :key_end], visible[:, first:end, :key_end])
        for first, end, key_end in _row_blocks(q_len, kv_len, causal)])
    lse_BxKxGxL = jnp.concatenate(lses, axis=3)
    out_BxLxHxD = _heads_last(jnp.concatenate(outs, axis=3)).astype(query_BxLxHxD.dtype)
    # The output is saved in the layout it is returned in: the same array the next layer's projection
    # keeps for its own backward, so the layer scan stacks it once, not once per layout.
    residuals = (scaled_query_BxKxGxLxD, key_BxKxSxD, value_BxKxSxD, segment_ids_q_BxL, segment_ids_kv_BxS, out_BxLxHxD,
                 lse_BxKxGxL)
    return out_BxLxHxD, residuals


def _whole_row_backward(causal, cpu_layouts, residuals, dout_BxLxHxD):
    (scaled_query_BxKxGxLxD, key_BxKxSxD, value_BxKxSxD, segment_ids_q_BxL, segment_ids_kv_BxS, out_BxLxHxD,
     lse_BxKxGxL) = residuals
    q_len, kv_len, head_dim = scaled_query_BxKxGxLxD.shape[3], key_BxKxSxD.shape[2], scaled_query_BxKxGxLxD.shape[4]
    num_kv_heads = key_BxKxSxD.shape[1]
    dout_BxKxGxLxD = _group_major(dout_BxLxHxD, num_kv_heads)
    delta_BxLxH = jnp.sum(out_BxLxHxD.astype(jnp.float32) * dout_BxLxHxD.astype(jnp.float32), axis=-1)
    delta_BxKxGxL = _group_major(delta_BxLxH[..., None], num_kv_heads)[..., 0]
    visible = _visible(causal, segment_ids_q_BxL, segment_ids_kv_BxS, q_len, kv_len)
    dquery_blocks = []
    dkey_BxKxSxD = jnp.zeros(key_BxKxSxD.shape, jnp.float32)
    dvalue_BxKxSxD = jnp.zeros(value_BxKxSxD.shape, jnp.float32)
    block_backward = _block_backward_cpu_layouts if cpu_layouts else _block_backward
    for first, end, key_end in _row_blocks(q_len, kv_len, causal):
        rows = slice(first, end)
        dquery, dkey, dvalue = block_backward(
            scaled_query_BxKxGxLxD[:, :, :, rows], key_BxKxSxD[:, :, :key_end], value_BxKxSxD[:, :, :key_end],
            dout_BxKxGxLxD[:, :, :, rows], lse_BxKxGxL[..., rows], delta_BxKxGxL[..., rows],
            visible[:, rows, :key_end], head_dim ** -0.5)
        dquery_blocks.append(dquery)
        dkey_BxKxSxD = dkey_BxKxSxD.at[:, :, :key_end].add(dkey)
        dvalue_BxKxSxD = dvalue_BxKxSxD.at[:, :, :key_end].add(dvalue)
    return (_heads_last(jnp.concatenate(dquery_blocks, axis=3)).astype(dout_BxLxHxD.dtype),
            dkey_BxKxSxD.transpose(0, 2, 1, 3).astype(key_BxKxSxD.dtype),
            dvalue_BxKxSxD.transpose(0, 2, 1, 3).astype(value_BxKxSxD.dtype), None, None)


_whole_row_attention.defvjp(_whole_row_forward, _whole_row_backward)


def recompute_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, causal: bool, segment_ids_q_BxL=None,
                        segment_ids_kv_BxS=None, cpu_layouts: bool = False):
    """Attention equal to `reference.xla_attention` (forward and gradients) without O(L x S) residuals;
    `cpu_layouts` picks XLA:CPU's backward layouts (the module docstring)."""
    batch, q_len = query_BxLxHxD.shape[:2]
    kv_len = key_BxSxKxD.shape[1]
    if segment_ids_q_BxL is None:
        segment_ids_q_BxL = jnp.ones((batch, q_len), jnp.int32)
        segment_ids_kv_BxS = jnp.ones((batch, kv_len), jnp.int32)
    if kv_len <= WHOLE_ROW_MAX_KEYS:
        return _whole_row_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, segment_ids_q_BxL, segment_ids_kv_BxS,
                                    causal, cpu_layouts)
    return local_flash_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, segment_ids_q_BxL, segment_ids_kv_BxS,
                                 causal, XLA_BLOCKS)
