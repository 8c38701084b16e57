"""Flash attention for Pallas GPU (Triton lowering), also the kernel CI runs with `interpret=True`.

Why Triton and not Mosaic GPU (a deliberate choice, to revisit once a GPU is lent to this project):
  * Testability. This kernel is plain Pallas (block loads, `dot_general`, loops), so the same source
    runs under `interpret=True` on the CPU and CI tests exactly the code the GPU runs. A fast Mosaic
    GPU attention is written against warpgroups, TMA, barriers and `wgmma` (`plgpu.*`); JAX 0.12 has
    an experimental Mosaic GPU interpreter (`InterpretGPUParams`), but we have not checked that it
    covers those primitives, and nothing in this project can check the result on a real Hopper.
  * Coverage. Runs on Ampere and Hopper (Mosaic GPU: sm_90+). Causal + segment ids + GQA + offsets
    and a backward pass are a few loops here; JAX's own Mosaic GPU attention has no causal backward
    and no segment ids, so that route meant writing all of it blind on an untestable backend.
  * Cost. Triton on Hopper uses wgmma/TMA less well than hand-pipelined Mosaic GPU, so the forward
    will likely land below the 0.9x-cuDNN target. If `benchmarks/attention.py` shows that, port the
    forward first to Mosaic GPU behind the same `flash_attention` signature; the tests stay the spec.
  * Risk. The Pallas Triton backend is deprecated since JAX 0.11 (a DeprecationWarning on lowering)
    and will be removed; pin JAX or migrate before upgrading past the last release that has it.

Structure (one program per (batch, head, block)): the forward and dQ programs own a query block and
loop over key blocks; the dK/dV program owns a key block of one KV head and loops over the query
heads of its GQA group and their query blocks, so dK/dV are accumulated over the group in registers
and K/V are never repeated. Key blocks a query block cannot see are skipped: past the causal bound
by the loop range, across segments by a `lax.cond` on the blocks' segment id ranges.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from af_next_kernels.flash_common import (MASK_SCORE, KernelConfig, causal_kv_block_end, causal_q_block_start,
                                          dot_precision, finish_softmax, matmul, online_softmax_update,
                                          poisoned_outputs, recomputed_probs, segment_ranges_overlap,
                                          visible_mask)


def _compiler_params(cfg: KernelConfig, head_dim: int):
    if cfg.interpret:
        return None
    return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _call(kernel, cfg, grid, in_specs, inputs, out_specs, out_shapes, head_dim, name):
    aliases = {}
    if cfg.poison_outputs:
        kernel, inputs, in_specs, aliases = poisoned_outputs(kernel, inputs, in_specs, out_specs, out_shapes)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes,
        input_output_aliases=aliases, interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg, head_dim), name=name)(*inputs)


# ----------------------------------------------------------------------------------------- forward

def _forward_kernel(shift_ref, q_ref, k_ref, v_ref, seg_q_ref, seg_kv_ref, q_min_ref, q_max_ref,
                    kv_min_ref, kv_max_ref, out_ref, lse_ref, *, cfg: KernelConfig, num_kv_blocks: int,
                    kv_padded: bool):
    block_q, block_kv = cfg.block_q, cfg.block_kv
    q_block = pl.program_id(2)
    causal_shift = shift_ref[0]
    query_QxD = q_ref[...]
    precision = dot_precision(query_QxD.dtype)
    seg_q_Qx1 = seg_q_ref[...][:, None] if cfg.has_segments else None
    head_dim = query_QxD.shape[-1]

    def visit(kv_block, carry):
        max_Q, sum_Q, acc_QxD = carry
        kv_slice = pl.ds(kv_block * block_kv, block_kv)
        key_KxD, value_KxD = k_ref[kv_slice, :], v_ref[kv_slice, :]
        scores_QxK = matmul(query_QxD, key_KxD, 1, 1, precision) * cfg.sm_scale
        mask = visible_mask(cfg, causal_shift, q_block * block_q, kv_block * block_kv, seg_q_Qx1,
                            seg_kv_ref[kv_slice][None, :] if cfg.has_segments else None, block_q,
                            block_kv, kv_padded)
        if mask is not None:
            scores_QxK = jnp.where(mask, scores_QxK, MASK_SCORE)
        return online_softmax_update(max_Q, sum_Q, acc_QxD, scores_QxK, lambda probs_QxK: matmul(
            probs_QxK.astype(value_KxD.dtype), value_KxD, 1, 0, precision))

    def body(kv_block, carry):
        if not cfg.has_segments:
            return visit(kv_block, carry)
        overlap = segment_ranges_overlap(q_min_ref[q_block], q_max_ref[q_block],
                                         kv_min_ref[kv_block], kv_max_ref[kv_block])
        return jax.lax.cond(overlap, visit, lambda _, c: c, kv_block, carry)

    end = num_kv_blocks
    if cfg.causal:
        end = causal_kv_block_end(causal_shift, q_block, block_q, block_kv, num_kv_blocks)
    init = (jnp.full((block_q,), MASK_SCORE, jnp.float32), jnp.zeros((block_q,), jnp.float32),
            jnp.zeros((block_q, head_dim), jnp.float32))
    max_Q, sum_Q, acc_QxD = jax.lax.fori_loop(0, end, body, init)
    scale_Q, lse_Q = finish_softmax(max_Q, sum_Q)
    out_ref[...] = (acc_QxD * scale_Q[:, None]).astype(out_ref.dtype)
    lse_ref[...] = lse_Q


def forward(query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, seg_q_BxL, seg_kv_BxS, q_ranges, kv_ranges,
            shift_1, cfg: KernelConfig):
    """Returns (out [B, H, L, D] in the query dtype, lse [B, H, L] float32); inputs are padded."""
    batch, num_heads, q_len, head_dim = query_BxHxLxD.shape
    num_kv_heads, kv_len = key_BxKxSxD.shape[1], key_BxKxSxD.shape[2]
    groups = num_heads // num_kv_heads
    num_q_blocks, num_kv_blocks = q_len // cfg.block_q, kv_len // cfg.block_kv
    kernel = functools.partial(_forward_kernel, cfg=cfg, num_kv_blocks=num_kv_blocks,
                               kv_padded=kv_len != cfg.kv_len)
    whole = lambda b, h, i: (0,)
    in_specs = [
        pl.BlockSpec((1,), whole),
        pl.BlockSpec((None, None, cfg.block_q, head_dim), lambda b, h, i: (b, h, i, 0)),
        pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, h // groups, 0, 0)),
        pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, h // groups, 0, 0)),
        pl.BlockSpec((None, cfg.block_q), lambda b, h, i: (b, i)),
        pl.BlockSpec((None, kv_len), lambda b, h, i: (b, 0)),
        pl.BlockSpec((None, num_q_blocks), lambda b, h, i: (b, 0)),
        pl.BlockSpec((None, num_q_blocks), lambda b, h, i: (b, 0)),
        pl.BlockSpec((None, num_kv_blocks), lambda b, h, i: (b, 0)),
        pl.BlockSpec((None, num_kv_blocks), lambda b, h, i: (b, 0)),
    ]
    out_specs = [pl.BlockSpec((None, None, cfg.block_q, head_dim), lambda b, h, i: (b, h, i, 0)),
                 pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i))]
    out_shapes = [jax.ShapeDtypeStruct(query_BxHxLxD.shape, query_BxHxLxD.dtype),
                  jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)]
    inputs = [shift_1, query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, seg_q_BxL, seg_kv_BxS, *q_ranges,
              *kv_ranges]
    out, lse = _call(kernel, cfg, (batch, num_heads, num_q_blocks), in_specs, inputs, out_specs,
                     out_shapes, head_dim, "flash_attention_forward")
    return out, lse


# ---------------------------------------------------------------------------------------- backward

def _dq_kernel(shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref, seg_kv_ref,
               q_min_ref, q_max_ref, kv_min_ref, kv_max_ref, dq_ref, *, cfg, num_kv_blocks, kv_padded):
    block_q, block_kv = cfg.block_q, cfg.block_kv
    q_block = pl.program_id(2)
    causal_shift = shift_ref[0]
    query_QxD, dout_QxD = q_ref[...], do_ref[...]
    lse_Q, delta_Q = lse_ref[...], delta_ref[...]
    precision = dot_precision(query_QxD.dtype)
    seg_q_Qx1 = seg_q_ref[...][:, None] if cfg.has_segments else None

    def visit(kv_block, dq_QxD):
        kv_slice = pl.ds(kv_block * block_kv, block_kv)
        key_KxD, value_KxD = k_ref[kv_slice, :], v_ref[kv_slice, :]
        probs_QxK = recomputed_probs(cfg, causal_shift, query_QxD, key_KxD, lse_Q, q_block * block_q,
                                     kv_block * block_kv, seg_q_Qx1,
                                     seg_kv_ref[kv_slice][None, :] if cfg.has_segments else None, kv_padded)
        dprobs_QxK = matmul(dout_QxD, value_KxD, 1, 1, precision)
        dscores_QxK = probs_QxK * (dprobs_QxK - delta_Q[:, None])
        return dq_QxD + matmul(dscores_QxK.astype(key_KxD.dtype), key_KxD, 1, 0, precision)

    def body(kv_block, dq_QxD):
        if not cfg.has_segments:
            return visit(kv_block, dq_QxD)
        overlap = segment_ranges_overlap(q_min_ref[q_block], q_max_ref[q_block],
                                         kv_min_ref[kv_block], kv_max_ref[kv_block])
        return jax.lax.cond(overlap, visit, lambda _, c: c, kv_block, dq_QxD)

    end = num_kv_blocks
    if cfg.causal:
        end = causal_kv_block_end(causal_shift, q_block, block_q, block_kv, num_kv_blocks)
    dq_QxD = jax.lax.fori_loop(0, end, body, jnp.zeros(query_QxD.shape, jnp.float32))
    dq_ref[...] = (dq_QxD * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(shift_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, seg_q_ref, seg_kv_ref,
                q_min_ref, q_max_ref, kv_min_ref, kv_max_ref, dk_ref, dv_ref, *, cfg, groups,
                num_q_blocks, kv_padded):
    block_q, block_kv = cfg.block_q, cfg.block_kv
    kv_block = pl.program_id(2)
    causal_shift = shift_ref[0]
    key_KxD, value_KxD = k_ref[...], v_ref[...]
    precision = dot_precision(key_KxD.dtype)
    seg_kv_1xK = seg_kv_ref[...][None, :] if cfg.has_segments else None

    def visit(q_block, carry, group):
        dk_KxD, dv_KxD = carry
        q_slice = pl.ds(q_block * block_q, block_q)
        query_QxD, dout_QxD = q_ref[group, q_slice, :], do_ref[group, q_slice, :]
        lse_Q, delta_Q = lse_ref[group, q_slice], delta_ref[group, q_slice]
        probs_QxK = recomputed_probs(cfg, causal_shift, query_QxD, key_KxD, lse_Q, q_block * block_q,
                                     kv_block * block_kv, seg_q_ref[q_slice][:, None] if cfg.has_segments else None,
                                     seg_kv_1xK, kv_padded)
        dv_KxD = dv_KxD + matmul(probs_QxK.astype(dout_QxD.dtype), dout_QxD, 0, 0, precision)
        dprobs_QxK = matmul(dout_QxD, value_KxD, 1, 1, precision)
        dscores_QxK = probs_QxK * (dprobs_QxK - delta_Q[:, None])
        dk_KxD = dk_KxD + matmul(dscores_QxK.astype(query_QxD.dtype), query_QxD, 0, 0, precision)
        return dk_KxD, dv_KxD

    def body(q_block, carry, group):
        if not cfg.has_segments:
            return visit(q_block, carry, group)
        overlap = segment_ranges_overlap(q_min_ref[q_block], q_max_ref[q_block],
                                         kv_min_ref[kv_block], kv_max_ref[kv_block])
        return jax.lax.cond(overlap, functools.partial(visit, group=group), lambda _, c: c, q_block, carry)

    start = 0
    if cfg.causal:
        start = causal_q_block_start(causal_shift, kv_block, block_q, block_kv, num_q_blocks)

    def over_group(group, carry):
        return jax.lax.fori_loop(start, num_q_blocks, functools.partial(body, group=group), carry)

    zeros = jnp.zeros(key_KxD.shape, jnp.float32)
    dk_KxD, dv_KxD = jax.lax.fori_loop(0, groups, over_group, (zeros, zeros))
    dk_ref[...] = (dk_KxD * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_KxD.astype(dv_ref.dtype)


def backward(query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, dout_BxHxLxD, lse_BxHxL, delta_BxHxL,
             seg_q_BxL, seg_kv_BxS, q_ranges, kv_ranges, shift_1, cfg: KernelConfig, grad_dtype=None):
    """Returns (dq, dk, dv) in the input dtypes (or grad_dtype); `delta` = rowsum(out * dout) - dlse."""
    batch, num_heads, q_len, head_dim = query_BxHxLxD.shape
    num_kv_heads, kv_len = key_BxKxSxD.shape[1], key_BxKxSxD.shape[2]
    groups = num_heads // num_kv_heads
    num_q_blocks, num_kv_blocks = q_len // cfg.block_q, kv_len // cfg.block_kv
    kv_padded = kv_len != cfg.kv_len
    whole = lambda b, h, i: (0,)
    range_specs = [pl.BlockSpec((None, num_q_blocks), lambda b, h, i: (b, 0))] * 2 + \
                  [pl.BlockSpec((None, num_kv_blocks), lambda b, h, i: (b, 0))] * 2
    ranges = [*q_ranges, *kv_ranges]

    q_block_spec = pl.BlockSpec((None, None, cfg.block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_whole_spec = pl.BlockSpec((None, None, kv_len, head_dim), lambda b, h, i: (b, h // groups, 0, 0))
    row_spec = pl.BlockSpec((None, None, cfg.block_q), lambda b, h, i: (b, h, i))
    dq = _call(
        functools.partial(_dq_kernel, cfg=cfg, num_kv_blocks=num_kv_blocks, kv_padded=kv_padded),
        cfg, (batch, num_heads, num_q_blocks),
        [pl.BlockSpec((1,), whole), q_block_spec, kv_whole_spec, kv_whole_spec, q_block_spec, row_spec,
         row_spec, pl.BlockSpec((None, cfg.block_q), lambda b, h, i: (b, i)),
         pl.BlockSpec((None, kv_len), lambda b, h, i: (b, 0)), *range_specs],
        [shift_1, query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, dout_BxHxLxD, lse_BxHxL, delta_BxHxL,
         seg_q_BxL, seg_kv_BxS, *ranges],
        [q_block_spec], [jax.ShapeDtypeStruct(query_BxHxLxD.shape, grad_dtype or query_BxHxLxD.dtype)],
        head_dim, "flash_attention_dq")[0]

    # Query-side tensors viewed as [B, K, G, ...] (a free reshape): one dK/dV program reads the whole
    # group of query heads that share its KV head.
    grouped = lambda x: x.reshape(batch, num_kv_heads, groups, *x.shape[2:])
    q_group_spec = pl.BlockSpec((None, None, groups, q_len, head_dim), lambda b, k, j: (b, k, 0, 0, 0))
    row_group_spec = pl.BlockSpec((None, None, groups, q_len), lambda b, k, j: (b, k, 0, 0))
    kv_block_spec = pl.BlockSpec((None, None, cfg.block_kv, head_dim), lambda b, k, j: (b, k, j, 0))
    dk, dv = _call(
        functools.partial(_dkv_kernel, cfg=cfg, groups=groups, num_q_blocks=num_q_blocks,
                          kv_padded=kv_padded),
        cfg, (batch, num_kv_heads, num_kv_blocks),
        [pl.BlockSpec((1,), whole), q_group_spec, kv_block_spec, kv_block_spec, q_group_spec,
         row_group_spec, row_group_spec, pl.BlockSpec((None, q_len), lambda b, k, j: (b, 0)),
         pl.BlockSpec((None, cfg.block_kv), lambda b, k, j: (b, j)), *range_specs],
        [shift_1, grouped(query_BxHxLxD), key_BxKxSxD, value_BxKxSxD, grouped(dout_BxHxLxD),
         grouped(lse_BxHxL), grouped(delta_BxHxL), seg_q_BxL, seg_kv_BxS, *ranges],
        [kv_block_spec, kv_block_spec],
        [jax.ShapeDtypeStruct(key_BxKxSxD.shape, grad_dtype or key_BxKxSxD.dtype),
         jax.ShapeDtypeStruct(value_BxKxSxD.shape, grad_dtype or value_BxKxSxD.dtype)], head_dim,
        "flash_attention_dkv")
    return dq, dk, dv
