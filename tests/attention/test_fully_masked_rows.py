"""A fully masked row (a query that sees no key) behaves the same in every attention path.

The convention (af_next_jax/attention/masking.py): output exactly 0, lse EMPTY_ROW_LSE, gradient 0,
and no contribution to any key's gradient. Checked for the XLA kernel (the materialising reference and
the training path that recomputes the scores), the float ground truth, the
plain-JAX block, the Pallas kernel (interpreted), and ring / Ulysses with both block kernels, on
the two shapes that produce such rows: queries whose segment id no key has (packing) and an encoder
padding window (every key invalid). Everything else must equal the ground truth.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af_next_jax.attention.blockwise import attention_delta, block_backward, block_forward
from af_next_jax.attention.dispatch import dot_product_attention
from af_next_jax.attention.masking import EMPTY_ROW_LSE
from af_next_jax.attention.reference import reference_attention, xla_attention
from af_next_jax.attention.sequence_parallel import sequence_parallel_attention
from af_next_kernels.flash_attention import flash_attention
from af_next_jax.parallel import MeshConfig, make_mesh
from tests.attention.helpers import assert_close, output_and_grads, random_inputs

LENGTH = 32
# Batch row 0: queries 3 and 20 carry a segment id (9) no key has. Row 1: an encoder padding window,
# every query segment 1 and every key invalid (0), so all of its rows are empty.
SEGMENT_IDS_Q = np.ones((2, LENGTH), np.int32)
SEGMENT_IDS_Q[0, [3, 20]] = 9
SEGMENT_IDS_KV = np.ones((2, LENGTH), np.int32)
SEGMENT_IDS_KV[1] = 0
EMPTY_ROWS = np.zeros((2, LENGTH), bool)
EMPTY_ROWS[0, [3, 20]] = True
EMPTY_ROWS[1] = True
MASKS = dict(causal=False, segment_ids_q_BxL=jnp.asarray(SEGMENT_IDS_Q), segment_ids_kv_BxS=jnp.asarray(SEGMENT_IDS_KV))


def _blockwise(q, k, v):
    @jax.custom_vjp
    def attention(q, k, v):
        return block_forward(q, k, v, kv_chunk=8, **MASKS)[0]

    def forward(q, k, v):
        out, lse = block_forward(q, k, v, kv_chunk=8, **MASKS)
        return out, (q, k, v, out, lse)

    def backward(residuals, dout):
        q, k, v, out, lse = residuals
        return block_backward(q, k, v, dout, lse, attention_delta(out, dout), kv_chunk=8, **MASKS)

    attention.defvjp(forward, backward)
    return attention(q, k, v)


def _sequence_parallel(strategy, block_kernel):
    def attention(q, k, v):
        return sequence_parallel_attention(q, k, v, implementation=strategy, block_implementation=block_kernel,
                                           **MASKS)
    return attention


PATHS = {
    "xla": lambda q, k, v: xla_attention(q, k, v, **MASKS),
    "xla_training": lambda q, k, v: dot_product_attention(q, k, v, implementation="xla", **MASKS),
    "ground_truth": lambda q, k, v: reference_attention(q, k, v, **MASKS)[0],
    "blockwise": _blockwise,
    "pallas": lambda q, k, v: dot_product_attention(q, k, v, implementation="pallas", **MASKS),
    "ring_xla": _sequence_parallel("ring", "xla"),
    "ring_pallas": _sequence_parallel("ring", "pallas"),
    "ulysses_xla": _sequence_parallel("ulysses", "xla"),
    "ulysses_pallas": _sequence_parallel("ulysses", "pallas"),
}
MESHES = {"ring": MeshConfig(data=2, fsdp=1, ring=4), "ulysses": MeshConfig(data=2, fsdp=1, ulysses=4)}


@pytest.fixture(scope="module")
def inputs():
    return random_inputs(2, LENGTH, 4, 2, 8, seed=11)


@pytest.fixture(scope="module")
def expected(inputs):
    """Ground truth on the rows that see keys; the convention's zeros on the empty ones."""
    query, key, value, dout = inputs
    with jax.enable_x64():
        as64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in inputs]
        out, *grads = output_and_grads(lambda q, k, v: reference_attention(q, k, v, **MASKS)[0], *as64[:3], as64[3])
        return [jnp.asarray(np.asarray(x), jnp.float32) for x in (out, *grads)]


@pytest.mark.parametrize("path", list(PATHS))
def test_fully_masked_rows_give_zero_output_and_zero_gradients(path, inputs, expected):
    attention = PATHS[path]
    strategy = path.split("_")[0]
    if strategy in MESHES:
        with jax.set_mesh(make_mesh(MESHES[strategy])):
            actual = jax.jit(lambda *a: output_and_grads(attention, *a))(*inputs)
    else:
        actual = jax.jit(lambda *a: output_and_grads(attention, *a))(*inputs)
    out, dquery, dkey, dvalue = (np.asarray(x) for x in actual)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dquery))
    np.testing.assert_array_equal(out[EMPTY_ROWS], 0.0, err_msg=f"{path}: an empty row's output is not 0")
    np.testing.assert_array_equal(dquery[EMPTY_ROWS], 0.0, err_msg=f"{path}: an empty row has a gradient")
    # The padding window's keys are seen by no query: their gradients are exactly 0 as well.
    np.testing.assert_array_equal(dkey[1], 0.0, err_msg=f"{path}: keys nobody sees got a gradient")
    np.testing.assert_array_equal(dvalue[1], 0.0, err_msg=f"{path}: values nobody sees got a gradient")
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, f"{path} {name}")


@pytest.mark.parametrize("path", ["ground_truth", "blockwise", "pallas"])
def test_fully_masked_rows_have_the_empty_row_lse(path, inputs):
    query, key, value, _ = inputs
    if path == "ground_truth":
        _, lse = reference_attention(query, key, value, **MASKS)
    elif path == "blockwise":
        _, lse = jax.jit(lambda q, k, v: block_forward(q, k, v, kv_chunk=8, **MASKS))(query, key, value)
    else:
        _, lse = jax.jit(lambda q, k, v: flash_attention(q, k, v, return_lse=True, **MASKS))(query, key, value)
    lse_BxLxH = np.moveaxis(np.asarray(lse), 1, 2)
    np.testing.assert_array_equal(lse_BxLxH[EMPTY_ROWS], np.float32(EMPTY_ROW_LSE))
    assert np.all(lse_BxLxH[~EMPTY_ROWS] > 0.5 * EMPTY_ROW_LSE)
