"""Flash attention for Pallas TPU (Mosaic); same math and semantics as `flash_attention_gpu.py`.

TPU kernels cannot keep a whole K/V sequence in VMEM and loop over it as the GPU kernel does
(128K tokens x 128 x bf16 = 32 MiB per tensor), so the key loop is the innermost grid dimension
("arbitrary": sequential on one core) and the running max / sum / accumulator live in VMEM scratch
across it; Pallas double-buffers the K/V block DMAs. Block skipping: the block's work is under
`pl.when`, and for causal masks the K/V index map clamps past-the-diagonal steps to the last
visible block, so a skipped step issues no new DMA either. Segment id ranges per block and the
causal shift are scalar-prefetched into SMEM, where both the index maps and the kernels read them.

Rows (max, sum, lse, delta) are [block, 1] columns and segment ids arrive as [block_q, 1] and
[1, block_kv] so that every mask is a broadcast compare, the layout Mosaic handles natively.
Lowering to Mosaic is checked from the CPU in tests/kernels/test_lowering.py; it has never run on
a TPU (none was available), so treat block defaults and performance as unmeasured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from af_next_kernels.flash_common import (MASK_SCORE, KernelConfig, causal_kv_block_end, causal_q_block_start,
                                          dot_precision, finish_softmax, matmul, online_softmax_update,
                                          poisoned_outputs, recomputed_probs, segment_ranges_overlap,
                                          visible_mask)

NUM_SCALARS = 5  # causal shift, q block min/max segment id, kv block min/max segment id


def _call(kernel, cfg, grid, in_specs, inputs, out_specs, out_shapes, scratch, semantics, scalars, name):
    """pallas_call with scalar prefetch (and the shared NaN-poisoned outputs testing aid)."""
    aliases = {}
    if cfg.poison_outputs:
        kernel, inputs, in_specs, aliases = poisoned_outputs(kernel, inputs, in_specs, out_specs, out_shapes,
                                                             num_leading_refs=len(scalars))
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(scalars), grid=grid,
                                             in_specs=in_specs, out_specs=out_specs,
                                             scratch_shapes=scratch)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shapes, input_output_aliases=aliases,
        interpret=cfg.interpret, name=name,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))(*scalars, *inputs)


def _column(x_BxHxL):
    return x_BxHxL[..., None]


def _block_visible(cfg, shift_ref, q_min_ref, q_max_ref, kv_min_ref, kv_max_ref, b, q_block, kv_block,
                   num_q_blocks, num_kv_blocks):
    visible = jnp.bool_(True)
    if cfg.causal:
        end = causal_kv_block_end(shift_ref[0], q_block, cfg.block_q, cfg.block_kv, num_kv_blocks)
        visible = jnp.logical_and(visible, kv_block < end)
    if cfg.has_segments:
        visible = jnp.logical_and(visible, segment_ranges_overlap(
            q_min_ref[b, q_block], q_max_ref[b, q_block], kv_min_ref[b, kv_block], kv_max_ref[b, kv_block]))
    return visible


def _visible_kv_block(cfg, shift_ref, q_block, kv_block, num_kv_blocks):
    """Index-map helper: past the causal diagonal, repeat the last visible block (no new DMA)."""
    if not cfg.causal:
        return kv_block
    end = causal_kv_block_end(shift_ref[0], q_block, cfg.block_q, cfg.block_kv, num_kv_blocks)
    return jnp.minimum(kv_block, jnp.maximum(end - 1, 0))


def _visible_q_block(cfg, shift_ref, kv_block, q_block, num_q_blocks):
    if not cfg.causal:
        return q_block
    start = causal_q_block_start(shift_ref[0], kv_block, cfg.block_q, cfg.block_kv, num_q_blocks)
    return jnp.maximum(q_block, jnp.minimum(start, num_q_blocks - 1))


# ----------------------------------------------------------------------------------------- forward

def _forward_kernel(shift_ref, q_min_ref, q_max_ref, kv_min_ref, kv_max_ref, q_ref, k_ref, v_ref,
                    seg_q_ref, seg_kv_ref, out_ref, lse_ref, max_ref, sum_ref, acc_ref, *, cfg,
                    num_q_blocks, num_kv_blocks, kv_padded):
    b, q_block, kv_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        max_ref[...] = jnp.full(max_ref.shape, MASK_SCORE, jnp.float32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(_block_visible(cfg, shift_ref, q_min_ref, q_max_ref, kv_min_ref, kv_max_ref, b, q_block,
                            kv_block, num_q_blocks, num_kv_blocks))
    def _visit():
        query_QxD, key_KxD, value_KxD = q_ref[...], k_ref[...], v_ref[...]
        precision = dot_precision(query_QxD.dtype)
        scores_QxK = matmul(query_QxD, key_KxD, 1, 1, precision) * cfg.sm_scale
        mask = visible_mask(cfg, shift_ref[0], q_block * cfg.block_q, kv_block * cfg.block_kv,
                            seg_q_ref[...], seg_kv_ref[...], cfg.block_q, cfg.block_kv, kv_padded)
        if mask is not None:
            scores_QxK = jnp.where(mask, scores_QxK, MASK_SCORE)
        max_ref[...], sum_ref[...], acc_ref[...] = online_softmax_update(
            max_ref[...], sum_ref[...], acc_ref[...], scores_QxK,
            lambda probs_QxK: matmul(probs_QxK.astype(value_KxD.dtype), value_KxD, 1, 0, precision),
            rows_as_columns=True)

    @pl.when(kv_block == num_kv_blocks - 1)
    def _finish():
        scale_Qx1, lse_Qx1 = finish_softmax(max_ref[...], sum_ref[...])
        out_ref[...] = (acc_ref[...] * scale_Qx1).astype(out_ref.dtype)
        lse_ref[...] = lse_Qx1


def forward(query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, seg_q_BxL, seg_kv_BxS, q_ranges, kv_ranges,
            shift_1, cfg: KernelConfig):
    """Returns (out [B, H, L, D] in the query dtype, lse [B, H, L] float32); inputs are padded."""
    batch, num_heads, q_len, head_dim = query_BxHxLxD.shape
    num_kv_heads, kv_len = key_BxKxSxD.shape[1], key_BxKxSxD.shape[2]
    groups = num_heads // num_kv_heads
    num_q_blocks, num_kv_blocks = q_len // cfg.block_q, kv_len // cfg.block_kv
    bq, bkv = cfg.block_q, cfg.block_kv

    def kv_index(b, h, i, j, shift_ref, *_):
        return (b, h // groups, _visible_kv_block(cfg, shift_ref, i, j, num_kv_blocks), 0)

    def seg_kv_index(b, h, i, j, shift_ref, *_):
        return (b, 0, _visible_kv_block(cfg, shift_ref, i, j, num_kv_blocks))

    in_specs = [pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
                pl.BlockSpec((None, None, bkv, head_dim), kv_index),
                pl.BlockSpec((None, None, bkv, head_dim), kv_index),
                pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *_: (b, i, 0)),
                pl.BlockSpec((None, 1, bkv), seg_kv_index)]
    out_specs = [pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0)),
                 pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))]
    out_shapes = [jax.ShapeDtypeStruct(query_BxHxLxD.shape, query_BxHxLxD.dtype),
                  jax.ShapeDtypeStruct((batch, num_heads, q_len, 1), jnp.float32)]
    scratch = [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
               pltpu.VMEM((bq, head_dim), jnp.float32)]
    kernel = functools.partial(_forward_kernel, cfg=cfg, num_q_blocks=num_q_blocks,
                               num_kv_blocks=num_kv_blocks, kv_padded=kv_len != cfg.kv_len)
    inputs = [query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, seg_q_BxL[:, :, None], seg_kv_BxS[:, None, :]]
    out, lse = _call(kernel, cfg, (batch, num_heads, num_q_blocks, num_kv_blocks), in_specs, inputs,
                     out_specs, out_shapes, scratch, ("parallel", "parallel", "parallel", "arbitrary"),
                     [shift_1, *q_ranges, *kv_ranges], "flash_attention_forward")
    return out, lse[..., 0]


# ---------------------------------------------------------------------------------------- backward

def _dq_kernel(shift_ref, q_min_ref, q_max_ref, kv_min_ref, kv_max_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, seg_q_ref, seg_kv_ref, dq_ref, dq_acc_ref, *, cfg, num_q_blocks,
               num_kv_blocks, kv_padded):
    b, q_block, kv_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

    @pl.when(_block_visible(cfg, shift_ref, q_min_ref, q_max_ref, kv_min_ref, kv_max_ref, b, q_block,
                            kv_block, num_q_blocks, num_kv_blocks))
    def _visit():
        key_KxD, value_KxD, dout_QxD = k_ref[...], v_ref[...], do_ref[...]
        precision = dot_precision(key_KxD.dtype)
        probs_QxK = recomputed_probs(cfg, shift_ref[0], q_ref[...], key_KxD, lse_ref[...], q_block * cfg.block_q,
                                     kv_block * cfg.block_kv, seg_q_ref[...], seg_kv_ref[...], kv_padded)
        dprobs_QxK = matmul(dout_QxD, value_KxD, 1, 1, precision)
        dscores_QxK = probs_QxK * (dprobs_QxK - delta_ref[...])
        dq_acc_ref[...] += matmul(dscores_QxK.astype(key_KxD.dtype), key_KxD, 1, 0, precision)

    @pl.when(kv_block == num_kv_blocks - 1)
    def _finish():
        dq_ref[...] = (dq_acc_ref[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(shift_ref, q_min_ref, q_max_ref, kv_min_ref, kv_max_ref, q_ref, k_ref, v_ref, do_ref,
                lse_ref, delta_ref, seg_q_ref, seg_kv_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, *, cfg,
                groups, num_q_blocks, num_kv_blocks, kv_padded):
    b, kv_block, group, q_block = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when(jnp.logical_and(group == 0, q_block == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    @pl.when(_block_visible(cfg, shift_ref, q_min_ref, q_max_ref, kv_min_ref, kv_max_ref, b, q_block,
                            kv_block, num_q_blocks, num_kv_blocks))
    def _visit():
        query_QxD, value_KxD, dout_QxD = q_ref[...], v_ref[...], do_ref[...]
        precision = dot_precision(query_QxD.dtype)
        probs_QxK = recomputed_probs(cfg, shift_ref[0], query_QxD, k_ref[...], lse_ref[...], q_block * cfg.block_q,
                                     kv_block * cfg.block_kv, seg_q_ref[...], seg_kv_ref[...], kv_padded)
        dv_acc_ref[...] += matmul(probs_QxK.astype(dout_QxD.dtype), dout_QxD, 0, 0, precision)
        dprobs_QxK = matmul(dout_QxD, value_KxD, 1, 1, precision)
        dscores_QxK = probs_QxK * (dprobs_QxK - delta_ref[...])
        dk_acc_ref[...] += matmul(dscores_QxK.astype(query_QxD.dtype), query_QxD, 0, 0, precision)

    @pl.when(jnp.logical_and(group == groups - 1, q_block == num_q_blocks - 1))
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, dout_BxHxLxD, lse_BxHxL, delta_BxHxL,
             seg_q_BxL, seg_kv_BxS, q_ranges, kv_ranges, shift_1, cfg: KernelConfig, grad_dtype=None):
    """Returns (dq, dk, dv) in the input dtypes (or grad_dtype); `delta` = rowsum(out * dout) - dlse."""
    batch, num_heads, q_len, head_dim = query_BxHxLxD.shape
    num_kv_heads, kv_len = key_BxKxSxD.shape[1], key_BxKxSxD.shape[2]
    groups = num_heads // num_kv_heads
    num_q_blocks, num_kv_blocks = q_len // cfg.block_q, kv_len // cfg.block_kv
    bq, bkv = cfg.block_q, cfg.block_kv
    kv_padded = kv_len != cfg.kv_len
    scalars = [shift_1, *q_ranges, *kv_ranges]
    inputs = [query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, dout_BxHxLxD, _column(lse_BxHxL),
              _column(delta_BxHxL), seg_q_BxL[:, :, None], seg_kv_BxS[:, None, :]]
    statics = dict(cfg=cfg, num_q_blocks=num_q_blocks, num_kv_blocks=num_kv_blocks, kv_padded=kv_padded)

    # dQ: grid (b, h, q block, kv block), kv innermost.
    def kv_index(b, h, i, j, shift_ref, *_):
        return (b, h // groups, _visible_kv_block(cfg, shift_ref, i, j, num_kv_blocks), 0)

    q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    [dq] = _call(
        functools.partial(_dq_kernel, **statics), cfg, (batch, num_heads, num_q_blocks, num_kv_blocks),
        [q_spec, pl.BlockSpec((None, None, bkv, head_dim), kv_index),
         pl.BlockSpec((None, None, bkv, head_dim), kv_index), q_spec, row_spec, row_spec,
         pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *_: (b, i, 0)),
         pl.BlockSpec((None, 1, bkv), lambda b, h, i, j, shift_ref, *_: (
             b, 0, _visible_kv_block(cfg, shift_ref, i, j, num_kv_blocks)))],
        inputs, [q_spec], [jax.ShapeDtypeStruct(query_BxHxLxD.shape, grad_dtype or query_BxHxLxD.dtype)],
        [pltpu.VMEM((bq, head_dim), jnp.float32)], ("parallel", "parallel", "parallel", "arbitrary"),
        scalars, "flash_attention_dq")

    # dK/dV: grid (b, kv head, kv block, query head of the group, q block); the last two accumulate.
    def q_index(b, k, j, g, i, shift_ref, *_):
        return (b, k * groups + g, _visible_q_block(cfg, shift_ref, j, i, num_q_blocks), 0)

    def seg_q_index(b, k, j, g, i, shift_ref, *_):
        return (b, _visible_q_block(cfg, shift_ref, j, i, num_q_blocks), 0)

    kv_spec = pl.BlockSpec((None, None, bkv, head_dim), lambda b, k, j, g, i, *_: (b, k, j, 0))
    q_group_spec = pl.BlockSpec((None, None, bq, head_dim), q_index)
    row_group_spec = pl.BlockSpec((None, None, bq, 1), q_index)
    dk, dv = _call(
        functools.partial(_dkv_kernel, groups=groups, **statics), cfg,
        (batch, num_kv_heads, num_kv_blocks, groups, num_q_blocks),
        [q_group_spec, kv_spec, kv_spec, q_group_spec, row_group_spec, row_group_spec,
         pl.BlockSpec((None, bq, 1), seg_q_index),
         pl.BlockSpec((None, 1, bkv), lambda b, k, j, g, i, *_: (b, 0, j))],
        inputs, [kv_spec, kv_spec],
        [jax.ShapeDtypeStruct(key_BxKxSxD.shape, grad_dtype or key_BxKxSxD.dtype),
         jax.ShapeDtypeStruct(value_BxKxSxD.shape, grad_dtype or value_BxKxSxD.dtype)],
        [pltpu.VMEM((bkv, head_dim), jnp.float32), pltpu.VMEM((bkv, head_dim), jnp.float32)],
        ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), scalars, "flash_attention_dkv")
    return dq, dk, dv
