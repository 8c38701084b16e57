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


def _ring_step_forward(block_kernel, step, rank, ring_degree, causal, query, key, value, seg_q, seg_kv):
    """(out [B, L, H, D], lse [B, H, L]) of local queries against the K/V block held at `step`."""
    def full(q, k, v, sq, skv, is_causal=False):
        return block_kernel.forward(q, k, v, causal=is_causal, segment_ids_q_BxL=sq, segment_ids_kv_BxS=skv)

    if not causal:
        return full(query, key, value, seg_q, seg_kv)
    q_e, q_l = _halves(query)
    k_e, k_l = _halves(key)
    v_e, v_l = _halves(value)
    sq_e, sq_l = _halves(seg_q)
    skv_e, skv_l = _halves(seg_kv)
    if step == 0:
        out_e, lse_e = full(q_e, k_e, v_e, sq_e, skv_e, True)
        out_l, lse_l = merge_partials(*full(q_l, k_e, v_e, sq_l, skv_e), *full(q_l, k_l, v_l, sq_l, skv_l, True))
        return jnp.concatenate([out_e, out_l], axis=1), jnp.concatenate([lse_e, lse_l], axis=2)

    def from_earlier_rank():
        return full(query, k_e, v_e, seg_q, skv_e)

    def from_later_rank():
        out_l, lse_l = full(q_l, key, value, sq_l, seg_kv)
        out_e, lse_e = empty_partial(out_l, lse_l)  # the early half sees nothing of a later rank
        return jnp.concatenate([out_e, out_l], axis=1), jnp.concatenate([lse_e, lse_l], axis=2)

    return jax.lax.cond(_source_is_earlier(rank, step, ring_degree), from_earlier_rank, from_later_rank)


def _ring_step_backward(block_kernel, step, rank, ring_degree, causal, query, key, value, seg_q, seg_kv, dout, lse,
                        delta):
    """(dq, dk, dv) float32 of local queries against the K/V block held at `step`."""
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
    if step == 0:
        dq_ee, dk_ee, dv_ee = full(q_e, k_e, v_e, sq_e, skv_e, do_e, lse_e, delta_e, True)
        dq_le, dk_le, dv_le = full(q_l, k_e, v_e, sq_l, skv_e, do_l, lse_l, delta_l)
        dq_ll, dk_ll, dv_ll = full(q_l, k_l, v_l, sq_l, skv_l, do_l, lse_l, delta_l, True)
        return (jnp.concatenate([dq_ee, dq_le + dq_ll], axis=1),
                jnp.concatenate([dk_ee + dk_le, dk_ll], axis=1),
                jnp.concatenate([dv_ee + dv_le, dv_ll], axis=1))

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
    out, lse = None, None
    held = (key, value, seg_kv)
    # Unrolled on purpose: R is small and static, and every ppermute stays visible to XLA's scheduler
    # (and to the communication count in benchmarks/sequence_parallel_comm.py).
    for step in range(ring_degree):
        incoming = _shift(held, axis_name, ring_degree) if step < ring_degree - 1 else None
        out_step, lse_step = _ring_step_forward(block_kernel, step, rank, ring_degree, causal, query,
                                                 *held[:2], seg_q, held[2])
        out, lse = (out_step, lse_step) if out is None else merge_partials(out, lse, out_step, lse_step)
        held = incoming
    return out, lse


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
    # This K/V tour repeats the forward's shifts exactly; when forward and backward share a jit XLA
    # CSEs them (R-1 fewer shifts) and keeps the R-1 received blocks alive instead. With GQA those are
    # small: an optimization_barrier forcing the resend left the measured temp memory unchanged
    # (benchmarks/sequence_parallel_memory.py), so the cheaper communication is kept.
    rank = jax.lax.axis_index(axis_name)
    delta = attention_delta(out, dout)
    dquery = jnp.zeros(query.shape, jnp.float32)
    dkey, dvalue = jnp.zeros(key.shape, jnp.float32), jnp.zeros(value.shape, jnp.float32)
    held = (key, value, seg_kv)
    for step in range(ring_degree):
        incoming = _shift(held, axis_name, ring_degree) if step < ring_degree - 1 else None
        dq_step, dk_step, dv_step = _ring_step_backward(block_kernel, step, rank, ring_degree, causal, query,
                                                        *held[:2], seg_q, held[2], dout, lse, delta)
        dquery = dquery + dq_step
        # The dK/dV accumulators belong to the held block: they travel with it, R hops bring them home.
        dkey, dvalue = _shift((dkey + dk_step, dvalue + dv_step), axis_name, ring_degree)
        held = incoming
    return dquery.astype(query.dtype), dkey.astype(key.dtype), dvalue.astype(value.dtype), None, None


ring_attention.defvjp(_ring_fwd, _ring_bwd)
