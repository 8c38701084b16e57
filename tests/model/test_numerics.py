"""dtype policy, remat memory, logical axes and scan: properties the trainer and sharding rely on."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from af_next_jax.config import REMAT_POLICIES, tiny
from af_next_jax.model import axes
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.numerics import Numerics, numerics_for_platform
from af_next_jax.model.synthetic import synthetic_batch


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(tiny(), audio_frames_per_example=[[700], []], seq_len=256, num_windows=4)


@pytest.fixture(scope="module")
def params(batch):
    return jax.jit(AFNextModel(tiny()).init)(jax.random.key(0), batch)


def loss_fn(config, params, batch, numerics=Numerics()):
    hidden = AFNextModel(config, numerics=numerics).apply(params, batch, return_hidden=True)
    return jnp.mean(jnp.square(hidden.astype(jnp.float32)))


# bfloat16 keeps 8 significant bits: unit roundoff 2^-8 of a value.
BF16_ROUNDOFF = 2.0 ** -8


def relative_rms(error, reference):
    return float(np.sqrt(np.mean(np.square(error))) / np.sqrt(np.mean(np.square(reference))))


def test_parameters_are_float32_and_bfloat16_compute_is_bfloat16(params, batch):
    """bfloat16 logits stay within a few bf16 roundings of the float32 ones (measured 0.83% of the
    logit scale, about two roundings: the bound is four), and their error is that of bf16 arithmetic
    throughout the model, well above the one rounding of float32 logits cast at the end (measured
    4.6x in RMS; the bound is 2x): a float32 model that only casts its output fails here."""
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype(jnp.float32)}
    logits = jax.jit(AFNextModel(tiny(compute_dtype="bfloat16")).apply)(params, batch)
    reference = np.asarray(jax.jit(AFNextModel(tiny()).apply)(params, batch))
    assert logits.dtype == jnp.bfloat16
    valid = batch["segment_ids"] > 0
    logits, reference = np.asarray(logits, np.float32)[valid], reference[valid]
    error = np.abs(logits - reference).max() / np.abs(reference).max()
    assert error < 4 * BF16_ROUNDOFF, f"bf16 logits differ by {error:.3%} of the logit scale"
    rounded_reference = np.asarray(jnp.asarray(reference).astype(jnp.bfloat16), np.float32)
    compute_error = relative_rms(logits - reference, reference)
    rounding_error = relative_rms(rounded_reference - reference, reference)
    assert compute_error > 2 * rounding_error, (compute_error, rounding_error)


# What each remat policy keeps for the backward pass, as sets that nest. none: every intermediate
# outside the attention, and the attention's own residuals (q, k, v, out, LSE: its custom VJP,
# attention/recompute.py); dots: every matmul output, including the score / value products inside the
# attention's forward, which remat re-runs; dots_with_no_batch_dims: only the weight matmuls (the
# attention products have batch dims); save_attention_out: only the attention output; full: nothing
# but each layer's input. Pairs (more, less) whose saved sets differ. (none and dots do not nest: no
# remat never keeps the scores, dots does.)
REMAT_SAVES_MORE_THAN = [("none", "dots_with_no_batch_dims"), ("dots", "dots_with_no_batch_dims"),
                         ("dots_with_no_batch_dims", "full"), ("none", "save_attention_out"),
                         ("save_attention_out", "full")]
# Remat acts per layer. With scan the saved residuals are stacked over the layers while the backward
# pass works on one layer at a time, so at this depth the residuals dominate XLA's temp allocation.
REMAT_DEPTH = 16


@pytest.fixture(scope="module")
def remat_temp_bytes():
    """Compiled temp memory of the decoder's loss gradient, per policy (text only: the encoder stacks
    its layers with the same `stack_layers`; compiling it too would double the time), with the CPU's
    numerics: their custom VJPs would hide the dots from a policy if a remat'd stack kept them."""
    config = tiny(decoder=dataclasses.replace(tiny().decoder, num_layers=REMAT_DEPTH))
    full_batch = synthetic_batch(config, audio_frames_per_example=[[], []], seq_len=256)
    text_batch = {name: full_batch[name] for name in ("token_ids", "positions", "segment_ids")}
    abstract_params = nn.unbox(jax.eval_shape(AFNextModel(config).init, jax.random.key(0), text_batch))
    temp_bytes = {}
    for policy in REMAT_POLICIES:
        gradient = jax.jit(jax.grad(lambda p, b, c=config.replace(remat_policy=policy): loss_fn(
            c, p, b, numerics_for_platform("cpu"))))
        temp_bytes[policy] = gradient.lower(abstract_params, text_batch).compile().memory_analysis().temp_size_in_bytes
    return temp_bytes


def test_remat_policies_order_the_compiled_temp_memory(remat_temp_bytes):
    """Remat never changes gradients; what it changes is memory. A policy that saves more must
    compile to strictly more temp memory (the 7B configs use dots_with_no_batch_dims and full)."""
    assert {policy for pair in REMAT_SAVES_MORE_THAN for policy in pair} == set(REMAT_POLICIES)
    megabytes = {policy: round(size / 2**20, 2) for policy, size in remat_temp_bytes.items()}
    for more, less in REMAT_SAVES_MORE_THAN:
        assert remat_temp_bytes[more] > remat_temp_bytes[less], f"{more} <= {less}: {megabytes} MiB"


def test_every_parameter_has_known_logical_axes(params):
    specs = nn.get_partition_spec(params)
    values = nn.unbox(params)
    for spec, value in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree.leaves(values)):
        assert len(spec) == value.ndim, (spec, value.shape)
        assert all(name is None or name in axes.ALL_LOGICAL_AXES for name in spec), spec


def test_scanned_and_unrolled_layers_compute_the_same_function(params, batch):
    """The unrolled stack holds layer i's parameters under layer_i; logits must not change."""
    unrolled = jax.tree.map(lambda x: x, nn.unbox(params))
    for part in ("encoder", "decoder"):
        stacked = unrolled["params"][part].pop("layers")
        unrolled["params"][part]["layers"] = {
            f"layer_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(jax.tree.leaves(stacked)[0].shape[0])}
    reference = AFNextModel(tiny()).apply(params, batch)
    logits = AFNextModel(tiny(scan_layers=False)).apply(unrolled, batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(reference), rtol=1e-5, atol=1e-5)


def test_padding_windows_and_padding_tokens_leave_valid_logits_unchanged(params, batch):
    """More padding windows and a longer padded row must not change any valid position."""
    config = tiny()
    wider = synthetic_batch(config, audio_frames_per_example=[[700], []], seq_len=320, num_windows=6)
    narrow_logits = np.asarray(AFNextModel(config).apply(params, batch))
    wide_logits = np.asarray(AFNextModel(config).apply(params, wider))
    valid = batch["segment_ids"] > 0
    np.testing.assert_allclose(wide_logits[:, :256][valid], narrow_logits[valid], rtol=1e-5, atol=1e-5)
    assert np.isfinite(wide_logits).all()
