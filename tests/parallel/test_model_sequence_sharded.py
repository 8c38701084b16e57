"""The whole AF-Next model on a sequence-sharded 8-device mesh equals the unsharded model.

Reference: the tiny model with attention_implementation="xla" on one device (no mesh). Checked: the
masked next-token loss and the gradient of every parameter, float32, for ring, Ulysses and hybrid
sequence parallelism (the model zigzag-permutes the decoder sequence for ring and hybrid itself).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import synthetic_batch
from af_next_jax.parallel import MeshConfig, batch_shardings, logical_axis_rules, make_mesh, param_shardings

SEQ_LEN = 256


def masked_next_token_loss(model, params, batch):
    logits_BxLxV = model.apply(params, batch).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    token_log_probs_BxL = jnp.take_along_axis(log_probs, batch["target_ids"][..., None], axis=-1)[..., 0]
    return -(token_log_probs_BxL * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def random_params(abstract_params, seed=0):
    """Host-side random parameters of the right shapes: skips compiling `init` (slow on 2 CPU cores)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), abstract_params)


@pytest.fixture(scope="module")
def reference():
    config = tiny()
    batch = synthetic_batch(config, audio_frames_per_example=[[400], [300, 200]], seq_len=SEQ_LEN, seed=0)
    model = AFNextModel(config)
    params = random_params(nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch)))
    loss, grads = jax.jit(jax.value_and_grad(lambda p: masked_next_token_loss(model, p, batch)))(params)
    return config, batch, params, loss, grads


@pytest.mark.parametrize("implementation,mesh_config", [
    # ~1.5 min each to compile on 2 shared cores: CI runs the hybrid (ring + all-to-all + zigzag).
    pytest.param("ring", MeshConfig(data=1, fsdp=2, ring=4), marks=pytest.mark.slow),
    pytest.param("ulysses", MeshConfig(data=1, fsdp=2, ulysses=4), marks=pytest.mark.slow),  # K/V heads x2
    ("hybrid", MeshConfig(data=1, fsdp=2, ring=2, ulysses=2)),
])
def test_sequence_sharded_model_loss_and_gradients_equal_unsharded(reference, implementation, mesh_config):
    config, batch, params, expected_loss, expected_grads = reference
    model = AFNextModel(config.replace(attention_implementation=implementation))
    mesh = make_mesh(mesh_config)
    rules = logical_axis_rules(mesh_config)
    # As the trainer runs it: the mesh (sequence-parallel attention reads it) and the rules scope.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
        sharded_params = jax.device_put(params, param_shardings(abstract, mesh, rules))
        sharded_batch = jax.device_put(batch, batch_shardings(batch, mesh, rules))
        loss, grads = jax.jit(jax.value_and_grad(lambda p, b: masked_next_token_loss(model, p, b)))(
            sharded_params, sharded_batch)
    # The decoder sequence really is sharded: each device holds SEQ_LEN / (ring x ulysses) tokens.
    assert sharded_batch["token_ids"].addressable_shards[0].data.shape[1] == SEQ_LEN // (
        mesh_config.ring * mesh_config.ulysses)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
    for path, actual, expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                                      jax.tree.leaves(expected_grads)):
        scale = float(jnp.abs(expected).max()) or 1.0
        error = float(jnp.abs(actual - expected).max()) / scale
        assert error <= 1e-4, f"{jax.tree_util.keystr(path[0])}: relative error {error:.2e}"


def full_sequence_gathers(hlo_text, batch_size, width):
    """All-gathers whose result is a whole [B, SEQ_LEN, width] activation."""
    shape = f"[{batch_size},{SEQ_LEN},{width}]"
    return [line.strip() for line in hlo_text.splitlines()
            if " all-gather(" in line and shape in line.split(" all-gather(")[0]]


def test_decoder_activations_are_never_gathered_to_full_length(reference):
    """Under the rules scope no device ever holds the whole decoder sequence of hidden states."""
    config, batch, params, _, _ = reference
    mesh_config = MeshConfig(data=1, fsdp=2, ring=4)
    model = AFNextModel(config.replace(attention_implementation="ring"))
    mesh, rules = make_mesh(mesh_config), logical_axis_rules(mesh_config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
        sharded_params = jax.device_put(params, param_shardings(abstract, mesh, rules))
        sharded_batch = jax.device_put(batch, batch_shardings(batch, mesh, rules))
        hlo = jax.jit(lambda p, b: model.apply(p, b, return_hidden=True)).lower(
            sharded_params, sharded_batch).compile().as_text()
    assert not full_sequence_gathers(hlo, batch["token_ids"].shape[0], config.decoder.hidden_size)
