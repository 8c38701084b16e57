"""Ring attention (Liu et al. 2023) over one mesh axis, for use inside `shard_map`.

Kernel-agnostic: every block forward and backward is the `BlockKernel` it is given
(block_kernels.py), so with Pallas both directions run the fused kernels.

Each of the R ring ranks holds L/R queries and the matching K/V. At step s rank r attends its queries
to the K/V block of rank j = (r - s) mod R, merges the result into its running (out, lse), and
passes the K/V block to rank r + 1 with `ppermute`; XLA overlaps that transfer with the next block's
compute. The backward (a `custom_vjp`, so nothing but q, k, v, out and lse is saved: memory is
O(L/R)) makes the same tour: dQ accumulates locally while dK/dV accumulators travel with their
K/V block and arrive home after R hops.

Causal load balancing: tokens arrive in the zigzag layout (parallel/layout.py): rank r holds chunks
(r, 2R-1-r) of C = L/(2R) tokens each, called its early and late half. In original order,
  step 0 (own block): early->early causal, late->early full, late->late causal (3 C x C blocks);
  j < r:  both halves see only j's early half, fully (one 2C x C block);
  j > r:  only the late half sees j's whole block, fully (one C x 2C block);
so every rank does 2 C x C blocks per step after the first: the same work on every device, half
of the unbalanced ring's. The two off-diagonal cases are a `lax.cond` on the rank (equal shapes).
Without `causal` the layout is irrelevant and each step is one full block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from af_next_jax.attention.blockwise import attention_delta, empty_partial, merge_partials


def _halves(x, axis=1):
    half = x.shape[axis] // 2
    return jax.lax.slice_in_dim(x, 0, half, axis=axis), jax.lax.slice_in_dim(x, half, 2 * half, axis=axis)


def _source_is_earlier(rank, step, ring_degree):
    return (rank - step) % ring_degree < rank


def _own_block_forward(block_kernel, causal, query, key, value, seg_q, seg_kv):
    """(out [B, L, H, D], lse [B, H, L]) of local queries against this rank's own K/V block (step 0)."""
    def full(q, k, v, sq, skv, is_causal=False):
        return block_kernel.forward(q, k, v, causal=is_causal, segment_ids_q_BxL=sq, segment_ids_kv_BxS=skv)

    if not causal:
        return full(query, key, value, seg_q, seg_kv)
    q_e, q_l = _halves(query)
    k_e, k_l = _halves(key)
    v_e, v_l = _halves(value)
    sq_e, sq_l = _halves(seg_q)
    skv_e, skv_l = _halves(seg_kv)
    out_e, lse_e = full(q_e, k_e, v_e, sq_e, skv_e, True)
    out_l, lse_l = merge_partials(*full(q_l, k_e, v_e, sq_l, skv_e), *full(q_l, k_l, v_l, sq_l, skv_l, True))
    return jnp.concatenate([out_e, out_l], axis=1), jnp.concatenate([lse_e, lse_l], axis=2)


def _ring_step_forward(block_kernel, step, rank, ring_degree, causal, query, key, value, seg_q, seg_kv):
    """(out [B, L, H, D], lse [B, H, L]) of local queries against the K/V block held at `step` >= 1 (traced)."""
    def full(q, k, v, sq, skv):
        return block_kernel.forward(q, k, v, causal=False, segment_ids_q_BxL=sq, segment_ids_kv_BxS=skv)

    if not causal:
        return full(query, key, value, seg_q, seg_kv)
    q_e, q_l = _halves(query)
    k_e, _ = _halves(key)
    v_e, _ = _halves(value)
    _, sq_l = _halves(seg_q)
    skv_e, _ = _halves(seg_kv)

    def from_earlier_rank():
        return full(query, k_e, v_e, seg_q, skv_e)

    def from_later_rank():
        out_l, lse_l = full(q_l, key, value, sq_l, seg_kv)
        out_e, lse_e = empty_partial(out_l, lse_l)  # the early half sees nothing of a later rank
        return jnp.concatenate([out_e, out_l], axis=1), jnp.concatenate([lse_e, lse_l], axis=2)

    return jax.lax.cond(_source_is_earlier(rank, step, ring_degree), from_earlier_rank, from_later_rank)


def _own_block_backward(block_kernel, causal, query, key, value, seg_q, seg_kv, dout, lse, delta):
    """(dq, dk, dv) float32 of local queries against this rank's own K/V block (step 0)."""
    def full(q, k, v, sq, skv, do, l, d, is_causal=False):
        return block_kernel.backward(q, k, v, do, l, d, causal=is_causal, segment_ids_q_BxL=sq, segment_ids_kv_BxS=skv)

    if not causal:
        return full(query, key, value, seg_q, seg_kv, dout, lse, delta)
    q_e, q_l = _halves(query)
    k_e, k_l = _halves(key)
    v_e, v_l = _halves(value)
    sq_e, sq_l = _halves(seg_q)
    skv_e, skv_l = _halves(seg_kv)
    do_e, do_l = _halves(dout)
    lse_e, lse_l = _halves(lse, axis=2)
    delta_e, delta_l = _halves(delta, axis=2)
    dq_ee, dk_ee, dv_ee = full(q_e, k_e, v_e, sq_e, skv_e, do_e, lse_e, delta_e, True)
    dq_le, dk_le, dv_le = full(q_l, k_e, v_e, sq_l, skv_e, do_l, lse_l, delta_l)
    dq_ll, dk_ll, dv_ll = full(q_l, k_l, v_l, sq_l, skv_l, do_l, lse_l, delta_l, True)
    return (jnp.concatenate([dq_ee, dq_le + dq_ll], axis=1),
            jnp.concatenate([dk_ee + dk_le, dk_ll], axis=1),
            jnp.concatenate([dv_ee + dv_le, dv_ll], axis=1))


def _ring_step_backward(block_kernel, step, rank, ring_degree, causal, query, key, value, seg_q, seg_kv, dout, lse,
                        delta):
    """(dq, dk, dv) float32 of local queries against the K/V block held at `step` >= 1 (traced)."""
    def full(q, k, v, sq, skv, do, l, d):
        return block_kernel.backward(q, k, v, do, l, d, causal=False, segment_ids_q_BxL=sq, segment_ids_kv_BxS=skv)

    if not causal:
        return full(query, key, value, seg_q, seg_kv, dout, lse, delta)
    _, q_l = _halves(query)
    k_e, _ = _halves(key)
    v_e, _ = _halves(value)
    _, sq_l = _halves(seg_q)
    skv_e, _ = _halves(seg_kv)
    _, do_l = _halves(dout)
    _, lse_l = _halves(lse, axis=2)
    _, delta_l = _halves(delta, axis=2)

    def from_earlier_rank():
        dq, dk_e, dv_e = full(query, k_e, v_e, seg_q, skv_e, dout, lse, delta)
        return (dq, jnp.concatenate([dk_e, jnp.zeros_like(dk_e)], axis=1),
                jnp.concatenate([dv_e, jnp.zeros_like(dv_e)], axis=1))

    def from_later_rank():
        dq_l, dk, dv = full(q_l, key, value, sq_l, seg_kv, do_l, lse_l, delta_l)
        return jnp.concatenate([jnp.zeros_like(dq_l), dq_l], axis=1), dk, dv

    return jax.lax.cond(_source_is_earlier(rank, step, ring_degree), from_earlier_rank, from_later_rank)


def _shift(x, axis_name, ring_degree):
    return jax.lax.ppermute(x, axis_name, perm=[(i, (i + 1) % ring_degree) for i in range(ring_degree)])


def _ring_forward_pass(axis_name, ring_degree, causal, block_kernel, query, key, value, seg_q, seg_kv):
    rank = jax.lax.axis_index(axis_name)
    held = (key, value, seg_kv)
    incoming = _shift(held, axis_name, ring_degree) if ring_degree > 1 else held
    out, lse = _own_block_forward(block_kernel, causal, query, *held[:2], seg_q, held[2])

    def visit(step, carry, send=True):  # while block `step` is attended to, block `step + 1` is on its way
        held, out, lse = carry
        incoming = _shift(held, axis_name, ring_degree) if send else held
        out_step, lse_step = _ring_step_forward(block_kernel, step, rank, ring_degree, causal, query, *held[:2],
                                                seg_q, held[2])
        return (incoming, *merge_partials(out, lse, out_step, lse_step))

    # Steps 1 .. R-2 as a loop, not unrolled, so their buffers are reused and memory stays flat as the ring
    # grows; the last step is peeled off because it sends nothing. A while loop (the array bound), not a
    # scan: under a remat policy jax splits a scan and keeps values of every step, stacked.
    carry = (incoming, out, lse)
    if ring_degree > 2:
        carry = jax.lax.fori_loop(1, jnp.int32(ring_degree - 1), visit, carry)
    if ring_degree > 1:
        carry = visit(ring_degree - 1, carry, send=False)
    return carry[1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def ring_attention(axis_name, ring_degree, causal, block_kernel, query_BxLxHxD, key_BxLxKxD, value_BxLxKxD,
                   segment_ids_q_BxL, segment_ids_kv_BxL):
    """Per-shard ring attention over `axis_name` (call inside shard_map); zigzag layout when causal."""
    out, _ = _ring_forward_pass(axis_name, ring_degree, causal, block_kernel, query_BxLxHxD, key_BxLxKxD,
                                value_BxLxKxD, segment_ids_q_BxL, segment_ids_kv_BxL)
    return out.astype(query_BxLxHxD.dtype)


def _ring_fwd(axis_name, ring_degree, causal, block_kernel, query, key, value, seg_q, seg_kv):
    out, lse = _ring_forward_pass(axis_name, ring_degree, causal, block_kernel, query, key, value, seg_q, seg_kv)
    out = out.astype(query.dtype)
    return out, (query, key, value, seg_q, seg_kv, out, lse)


def _ring_bwd(axis_name, ring_degree, causal, block_kernel, residuals, dout):
    query, key, value, seg_q, seg_kv, out, lse = residuals
    # This K/V tour repeats the forward's shifts. Both tours are loops, so XLA cannot merge them and keep
    # the R-1 received blocks alive between the passes (the unrolled version let it: fewer shifts, memory
    # growing with R); the blocks are sent again.
    rank = jax.lax.axis_index(axis_name)
    delta = attention_delta(out, dout)
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    held = (key, value, seg_kv)
    incoming = _shift(held, axis_name, ring_degree) if ring_degree > 1 else held
    dq, dk, dv = _own_block_backward(block_kernel, causal, query, *held[:2], seg_q, held[2], dout, lse, delta)
    # The dK/dV accumulators belong to the held block: they travel with it, R hops bring them home.
    dquery = zeros(query) + dq
    dkey, dvalue = _shift((zeros(key) + dk, zeros(value) + dv), axis_name, ring_degree)

    def visit(step, carry, send=True):
        held, dquery, dkey, dvalue = carry
        incoming = _shift(held, axis_name, ring_degree) if send else held
        dq, dk, dv = _ring_step_backward(block_kernel, step, rank, ring_degree, causal, query, *held[:2], seg_q,
                                         held[2], dout, lse, delta)
        return (incoming, dquery + dq, *_shift((dkey + dk, dvalue + dv), axis_name, ring_degree))

    carry = (incoming, dquery, dkey, dvalue)
    if ring_degree > 2:
        carry = jax.lax.fori_loop(1, jnp.int32(ring_degree - 1), visit, carry)  # a while loop, as above
    if ring_degree > 1:
        carry = visit(ring_degree - 1, carry, send=False)
    _, dquery, dkey, dvalue = carry
    return dquery.astype(query.dtype), dkey.astype(key.dtype), dvalue.astype(value.dtype), None, None


ring_attention.defvjp(_ring_fwd, _ring_bwd)
