"""Flash attention kernel (interpret mode on the CPU) against the float64 plain-JAX reference.

Each case checks the forward output, the lse, and dQ/dK/dV (for random cotangents on both the
output and the lse) in one jitted call; kernel outputs are NaN-poisoned, so an unwritten block fails.
Tolerances: relative (norm-wise) error <= 1e-5 for float32 inputs, <= 2e-2 for bfloat16.
GQA ratios: 1 (2 heads / 2 KV heads), 4 (the ragged-length and bfloat16 cases), 7 (both kernels).
"backend='interpret'" runs the GPU (Triton) kernel on the CPU; "tpu" with interpret=True the TPU one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from af_next_kernels import flash_attention_gpu, flash_attention_tpu
from af_next_kernels.flash_attention import (EMPTY_ROW_LSE, flash_attention, flash_attention_backward,
                                             reference_attention)
from af_next_kernels.flash_common import KernelConfig

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seed), 5)
    query = jax.random.normal(keys[0], (batch, q_len, num_heads, head_dim), jnp.float32).astype(dtype)
    key = jax.random.normal(keys[1], (batch, kv_len, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    value = jax.random.normal(keys[2], (batch, kv_len, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    dout = jax.random.normal(keys[3], query.shape, jnp.float32).astype(dtype)
    dlse = jax.random.normal(keys[4], (batch, num_heads, q_len), jnp.float32)
    return query, key, value, dout, dlse


def _out_lse_grads(attention, query, key, value, dout, dlse):
    (out, lse), vjp = jax.vjp(attention, query, key, value)
    return (out, lse, *vjp((dout, dlse)))


def _kernel_out_lse_grads(query, key, value, dout, dlse, seg_q, seg_kv, q_offset, kv_offset, *, causal,
                          block_q, block_kv, backend):
    attention = functools.partial(
        flash_attention, causal=causal, segment_ids_q_BxL=seg_q, segment_ids_kv_BxS=seg_kv,
        q_offset=q_offset, kv_offset=kv_offset, block_q=block_q, block_kv=block_kv, backend=backend,
        interpret=True, return_lse=True, poison_outputs=True)
    return _out_lse_grads(attention, query, key, value, dout, dlse)


# Compiling the interpreted kernels dominates this file's run time: segment ids and offsets are traced
# arguments so cases that differ only in them share one compile, and XLA's backend optimisations
# (worth nothing for a few-millisecond run) are off.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
_kernel_out_lse_grads_jit = jax.jit(_kernel_out_lse_grads, static_argnames=("causal", "block_q", "block_kv", "backend"),
                                    compiler_options=FAST_COMPILE)


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30)


def _check_against_reference(*, seed=0, batch=1, q_len=40, kv_len=None, num_heads=2, num_kv_heads=2,
                             head_dim=64, dtype=jnp.float32, block_q=16, block_kv=16, causal=False,
                             segment_ids_q_BxL=None, segment_ids_kv_BxS=None, q_offset=0, kv_offset=0,
                             backend="interpret"):
    kv_len = q_len if kv_len is None else kv_len
    inputs = _inputs(seed, batch, q_len, kv_len, num_heads, num_kv_heads, head_dim, dtype)
    actual = _kernel_out_lse_grads_jit(*inputs, segment_ids_q_BxL, segment_ids_kv_BxS,
                                       jnp.int32(q_offset), jnp.int32(kv_offset), causal=causal,
                                       block_q=block_q, block_kv=block_kv, backend=backend)
    with jax.enable_x64(True):
        as64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
        reference = functools.partial(reference_attention, causal=causal, q_offset=q_offset,
                                      kv_offset=kv_offset, segment_ids_q_BxL=segment_ids_q_BxL,
                                      segment_ids_kv_BxS=segment_ids_kv_BxS)
        expected = jax.jit(functools.partial(_out_lse_grads, reference))(*map(as64, inputs))
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), actual, expected):
        assert np.all(np.isfinite(np.asarray(a, np.float32))), f"{name} has non-finite entries"
        error = _relative_error(a, e)
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e} > {TOLERANCE[dtype]}"
    return actual


def _segments(*lengths):
    return jnp.asarray(np.repeat(np.arange(1, len(lengths) + 1), lengths)[None], jnp.int32)


def test_full_attention_with_segments_matches_reference():
    segments = jnp.concatenate([_segments(5, 30, 5), _segments(25, 15)])
    _check_against_reference(batch=2, causal=False, segment_ids_q_BxL=segments,
                             segment_ids_kv_BxS=segments)


def test_causal_attention_with_a_segment_shorter_than_a_block():
    segments = jnp.concatenate([_segments(11, 3, 20, 6), _segments(40)])  # 3 tokens inside one 16-block
    _check_against_reference(batch=2, causal=True, segment_ids_q_BxL=segments,
                             segment_ids_kv_BxS=segments)


def test_lengths_not_a_multiple_of_the_block_head_dim_128():
    _check_against_reference(q_len=37, kv_len=45, head_dim=128, num_heads=4, num_kv_heads=1,
                             block_q=32, block_kv=16, causal=False)


def test_shifted_causal_offset_for_a_ring_step():
    # Queries 20..43 against keys 16..55 (query blocks of 16, key blocks of 8): the first query block
    # (20..35) sees key blocks 16..39 in part and must skip 40..55; the second sees all but 48..55.
    blocks = dict(q_len=24, kv_len=40, causal=True, block_q=16, block_kv=8)
    _check_against_reference(q_offset=20, kv_offset=16, **blocks)
    # Keys after every query: every row is empty.
    out, lse, *_ = _check_against_reference(q_offset=0, kv_offset=30, **blocks)
    assert np.all(np.asarray(out) == 0) and np.all(np.asarray(lse) == np.float32(EMPTY_ROW_LSE))


def test_fully_masked_rows_give_zero_output_and_empty_lse():
    # Encoder padding: queries all segment 1, keys carry validity; window 1 is fully padded.
    validity = jnp.asarray([[1] * 30 + [0] * 10, [0] * 40], jnp.int32)
    out, lse, dq, dk, dv = _check_against_reference(
        batch=2, causal=False, segment_ids_q_BxL=jnp.ones_like(validity), segment_ids_kv_BxS=validity)
    assert np.all(np.asarray(out[1]) == 0)
    np.testing.assert_array_equal(np.asarray(lse[1]), np.float32(EMPTY_ROW_LSE))
    assert np.all(np.asarray(dq[1]) == 0) and np.all(np.asarray(dk[1]) == 0)


def test_bfloat16_inputs():
    segments = _segments(9, 31)
    _check_against_reference(dtype=jnp.bfloat16, num_heads=4, num_kv_heads=1, head_dim=128, causal=True,
                             segment_ids_q_BxL=segments, segment_ids_kv_BxS=segments)


@pytest.mark.parametrize("backend", ["interpret", "tpu"])
def test_seven_heads_per_kv_head_with_shift_ragged_segments_and_an_empty_row(backend):
    """GQA 7 for both kernels ("interpret": the GPU kernel; "tpu": the Mosaic kernel, with its
    grid-sequential key loop and scratch accumulators), combined with a shifted causal mask, ragged
    segments, a ragged key length and a row that sees no key."""
    seg_q = jnp.asarray([[1] * 11 + [2] * 3 + [3] * 26, [1] * 40], jnp.int32)
    seg_kv = jnp.asarray([[1] * 16 + [2] * 3 + [3] * 26, [0] * 45], jnp.int32)  # row 1: no valid key
    out, lse, *_ = _check_against_reference(
        backend=backend, batch=2, q_len=40, kv_len=45, num_heads=7, num_kv_heads=1, causal=True,
        q_offset=5, segment_ids_q_BxL=seg_q, segment_ids_kv_BxS=seg_kv, block_q=16, block_kv=32)
    assert np.all(np.asarray(out[1]) == 0) and np.all(np.asarray(lse[1]) == np.float32(EMPTY_ROW_LSE))


def test_backward_kernels_with_final_lse_give_ring_gradients():
    """A two-step "ring": keys split in halves at offsets 0 and 24. Forwards merged by lse, then
    `flash_attention_backward` per half with the final lse/delta: dq summed, dk/dv concatenated,
    must equal the gradients of attention over all keys."""
    query, key, value, dout, _ = _inputs(2, 1, 48, 48, 4, 2, 64, jnp.float32)
    segments = _segments(10, 30, 8)
    halves = [dict(kv_offset=offset, segment_ids_kv_BxS=segments[:, offset:offset + 24])
              for offset in (0, 24)]
    common = dict(causal=True, segment_ids_q_BxL=segments, block_q=16, block_kv=16, backend="interpret")

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def ring_out_and_grads(query, key, value, dout):
        parts = [flash_attention(query, key[:, h["kv_offset"]:][:, :24], value[:, h["kv_offset"]:][:, :24],
                                 return_lse=True, **common, **h) for h in halves]
        (out_a, lse_a), (out_b, lse_b) = parts
        lse = jnp.logaddexp(lse_a, lse_b)
        weight = lambda part_lse: jnp.exp(part_lse - lse).transpose(0, 2, 1)[..., None]
        out = weight(lse_a) * out_a + weight(lse_b) * out_b
        delta = jnp.einsum("blhd,blhd->bhl", out, dout)
        grads = [flash_attention_backward(query, key[:, h["kv_offset"]:][:, :24],
                                          value[:, h["kv_offset"]:][:, :24], dout, lse, delta,
                                          poison_outputs=True, **common, **h) for h in halves]
        return (out, grads[0][0] + grads[1][0], jnp.concatenate([grads[0][1], grads[1][1]], axis=1),
                jnp.concatenate([grads[0][2], grads[1][2]], axis=1))

    actual = ring_out_and_grads(query, key, value, dout)
    reference = functools.partial(reference_attention, causal=True, segment_ids_q_BxL=segments,
                                  segment_ids_kv_BxS=segments)
    out, vjp = jax.vjp(lambda q, k, v: reference(q, k, v)[0], query, key, value)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, (out, *vjp(dout))):
        error = _relative_error(a, e)
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


def test_masked_key_blocks_are_skipped_not_computed():
    """NaN keys/values in blocks no query may see must not reach any output or gradient
    (0 * NaN = NaN, so a block computed and then masked would leak)."""
    query, key, value, dout, dlse = _inputs(1, 1, 32, 64, 2, 1, 64, jnp.float32)
    # Key block 1 is padding (segment 0, no query has it); blocks 2 and 3 come after every query.
    seg_q = jnp.ones((1, 32), jnp.int32)
    seg_kv = jnp.asarray([[1] * 16 + [0] * 16 + [1] * 32], jnp.int32)
    key, value = (x.at[:, 16:].set(jnp.nan) for x in (key, value))
    kernel = functools.partial(flash_attention, causal=True, segment_ids_q_BxL=seg_q,
                               segment_ids_kv_BxS=seg_kv, block_q=16, block_kv=16, backend="interpret",
                               return_lse=True)
    results = jax.jit(functools.partial(_out_lse_grads, kernel), compiler_options=FAST_COMPILE)(
        query, key, value, dout, dlse)
    for name, x in zip(("out", "lse", "dq", "dk", "dv"), results):
        assert np.all(np.isfinite(np.asarray(x))), f"{name}: a fully masked key block was computed"


def test_poisoned_outputs_expose_an_unwritten_block_gpu_call():
    """The poisoning the tests rely on works: a kernel that skips a block leaves NaN there."""
    cfg = KernelConfig(causal=False, has_segments=False, sm_scale=1.0, block_q=8, block_kv=8, kv_len=8,
                       backend="gpu", interpret=True, poison_outputs=True)

    def writes_only_the_first_block(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((8,), lambda i: (i,))
    [out] = flash_attention_gpu._call(writes_only_the_first_block, cfg, (2,), [spec], [jnp.ones(16)],
                                      [spec], [jax.ShapeDtypeStruct((16,), jnp.float32)], 8, "poison")
    assert np.all(np.asarray(out[:8]) == 1) and np.all(np.isnan(np.asarray(out[8:])))


def test_poisoned_outputs_expose_an_unwritten_block_tpu_call():
    cfg = KernelConfig(causal=False, has_segments=False, sm_scale=1.0, block_q=8, block_kv=8, kv_len=8,
                       backend="tpu", interpret=True, poison_outputs=True)

    def writes_only_the_first_block(scale_ref, x_ref, o_ref, scratch_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...] * scale_ref[0]

    spec = pl.BlockSpec((8, 128), lambda i, *_: (i, 0))
    [out] = flash_attention_tpu._call(
        writes_only_the_first_block, cfg, (2,), [spec], [jnp.ones((16, 128))], [spec],
        [jax.ShapeDtypeStruct((16, 128), jnp.float32)], [pltpu.VMEM((8, 128), jnp.float32)],
        ("arbitrary",), [jnp.ones((1,), jnp.float32)], "poison")
    assert np.all(np.asarray(out[:8]) == 1) and np.all(np.isnan(np.asarray(out[8:])))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["interpret", "tpu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 1), (7, 1)])
def test_sweep(backend, causal, dtype, head_dim, num_heads, num_kv_heads):
    """Heavy sweep (run with -m slow): every feature combination on both kernels."""
    rng = np.random.default_rng(head_dim + num_heads)
    segments = jnp.asarray(np.sort(rng.integers(0, 4, (2, 70))), jnp.int32)
    _check_against_reference(backend=backend, batch=2, q_len=70, num_heads=num_heads,
                             num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype, causal=causal,
                             q_offset=3 if causal else 0, segment_ids_q_BxL=segments,
                             segment_ids_kv_BxS=segments, block_q=32, block_kv=16)
