"""dtype policy, remat policies, logical axes and scan: properties the trainer and sharding rely on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from af_next_jax.config import REMAT_POLICIES, tiny
from af_next_jax.model import axes
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import synthetic_batch


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(tiny(), audio_frames_per_example=[[700], []], seq_len=256, num_windows=3)


@pytest.fixture(scope="module")
def params(batch):
    return jax.jit(AFNextModel(tiny()).init)(jax.random.key(0), batch)


def loss_fn(config, params, batch):
    hidden = AFNextModel(config).apply(params, batch, return_hidden=True)
    return jnp.mean(jnp.square(hidden.astype(jnp.float32)))


def test_parameters_are_float32_and_bfloat16_compute_is_bfloat16(params, batch):
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype(jnp.float32)}
    logits = jax.jit(AFNextModel(tiny(compute_dtype="bfloat16")).apply)(params, batch)
    reference = jax.jit(AFNextModel(tiny()).apply)(params, batch)
    assert logits.dtype == jnp.bfloat16
    valid = batch["segment_ids"] > 0
    error = np.abs(np.asarray(logits, np.float32) - np.asarray(reference))[valid].max()
    assert error < 0.05 * np.abs(np.asarray(reference)[valid]).max()


@pytest.fixture(scope="module")
def reference_gradients(params, batch):
    return jax.jit(jax.grad(lambda p: loss_fn(tiny(), p, batch)))(params)


# Two policies in CI (nothing saved; names saved); the dots policies in the slow sweep.
@pytest.mark.parametrize("policy", [pytest.param(p, marks=pytest.mark.slow) if p.startswith("dots") else p
                                    for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_give_the_same_gradients(params, batch, reference_gradients, policy):
    reference = reference_gradients
    remat = jax.jit(jax.grad(lambda p: loss_fn(tiny(remat_policy=policy), p, batch)))(params)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


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
    wider = synthetic_batch(config, audio_frames_per_example=[[700], []], seq_len=320, num_windows=5)
    narrow_logits = np.asarray(AFNextModel(config).apply(params, batch))
    wide_logits = np.asarray(AFNextModel(config).apply(params, wider))
    valid = batch["segment_ids"] > 0
    np.testing.assert_allclose(wide_logits[:, :256][valid], narrow_logits[valid], rtol=1e-5, atol=1e-5)
    assert np.isfinite(wide_logits).all()
