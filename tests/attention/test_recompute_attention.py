"""The "xla" kernel in training (attention/recompute.py): equal to the float64 ground truth in output and
gradients with either backward (plain dots, or XLA:CPU's layouts with `cpu_layouts`), it keeps no [L, S]
tensor for the backward pass, and only `cpu_layouts` puts optimization barriers into it.

Reference: `reference_attention` in float64 (the same ground truth the Pallas kernels are held to), at
the same relative tolerance (1e-5 of the largest entry). The masking convention's fully masked rows are
checked with every other path in test_fully_masked_rows.py ("xla_training").
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af_next_jax.attention import recompute
from af_next_jax.attention.dispatch import dot_product_attention
from af_next_jax.attention.reference import reference_attention
from tests.attention.helpers import assert_close, output_and_grads, random_inputs

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 48, 4, 2, 8


def _packed_segments():
    """Row 0: three packed examples; row 1: one example then 8 padding tokens (segment 0)."""
    segment_ids = np.ones((BATCH, LENGTH), np.int32)
    segment_ids[0, 16:30], segment_ids[0, 30:] = 2, 3
    segment_ids[1, 40:] = 0
    return jnp.asarray(segment_ids)


def _encoder_masks():
    """Every query segment 1; keys valid (1) up to a per-window length, as the encoder passes them."""
    valid = (np.arange(LENGTH)[None, :] < np.array([[LENGTH], [29]])).astype(np.int32)
    return dict(causal=False, segment_ids_q_BxL=jnp.ones((BATCH, LENGTH), jnp.int32),
                segment_ids_kv_BxS=jnp.asarray(valid))


MASKS = {
    "decoder_causal_packed": lambda: dict(causal=True, segment_ids_q_BxL=_packed_segments(),
                                          segment_ids_kv_BxS=_packed_segments()),
    "causal_no_segments": lambda: dict(causal=True),
    "encoder_key_validity": _encoder_masks,
}


def _ground_truth(inputs, masks):
    with jax.enable_x64():
        as64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in inputs]
        out, *grads = output_and_grads(lambda q, k, v: reference_attention(q, k, v, **masks)[0], *as64[:3], as64[3])
        return [jnp.asarray(np.asarray(x), jnp.float32) for x in (out, *grads)]


# Which code path runs: at LENGTH 48 the defaults give one block of whole rows; lowering the minimum
# block size splits causal rows into CAUSAL_ROW_BLOCKS blocks; lowering the key limit runs the
# key-chunked block kernel.
PATHS = {"whole_rows": {}, "causal_row_blocks": {"MIN_ROWS_PER_BLOCK": 4}, "key_chunked": {"WHOLE_ROW_MAX_KEYS": 16}}


@pytest.mark.parametrize("cpu_layouts", [False, True], ids=["plain", "cpu_layouts"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_training_attention_equals_the_float64_ground_truth(mask_name, path, cpu_layouts, monkeypatch):
    for name, value in PATHS[path].items():
        monkeypatch.setattr(recompute, name, value)
    masks = MASKS[mask_name]()
    inputs = random_inputs(BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM, seed=5)
    actual = jax.jit(lambda *a: output_and_grads(
        lambda q, k, v: dot_product_attention(q, k, v, implementation="xla", cpu_layouts=cpu_layouts, **masks),
        *a))(*inputs)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, _ground_truth(inputs, masks)):
        assert_close(a, e, f"{mask_name} {path} {name}")


@pytest.mark.parametrize("cpu_layouts", [False, True])
def test_only_cpu_layouts_put_optimization_barriers_in_the_backward(cpu_layouts):
    query, key, value, dout = random_inputs(BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM, seed=2)
    masks = MASKS["decoder_causal_packed"]()
    jaxpr = jax.make_jaxpr(lambda *a: output_and_grads(
        lambda q, k, v: dot_product_attention(q, k, v, implementation="xla", cpu_layouts=cpu_layouts, **masks),
        *a))(query, key, value, dout)
    assert ("optimization_barrier" in str(jaxpr)) == cpu_layouts


def test_causal_row_blocks_skip_the_keys_after_each_block():
    assert recompute._row_blocks(512, 512, causal=True) == [(0, 128, 128), (128, 256, 256), (256, 384, 384),
                                                             (384, 512, 512)]
    assert recompute._row_blocks(512, 512, causal=False) == [(0, 512, 512)]
    assert recompute._row_blocks(100, 100, causal=True) == [(0, 100, 100)]  # blocks would be under 64 rows


def test_the_backward_pass_keeps_no_scores():
    """The vjp's residuals are q, k, v, out, lse and the segment ids: none is [.., L, S]-sized."""
    query, key, value, _ = random_inputs(BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM, seed=1)
    masks = MASKS["decoder_causal_packed"]()
    _, backward = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla", **masks),
                          query, key, value)
    residual_sizes = [leaf.size for leaf in jax.tree.leaves(backward)]
    scores_size = BATCH * HEADS * LENGTH * LENGTH
    assert residual_sizes and max(residual_sizes) <= query.size < scores_size, (
        f"a residual of {max(residual_sizes)} elements: the backward keeps the [L, S] scores ({scores_size})")
