"""The whole AF-Next model on a sequence-sharded 8-device mesh: equal to the unsharded model, and no device
ever gathers a decoder activation to the full sequence length.

Reference: the tiny model with attention_kernel="xla" on one device (no mesh). Checked: the
masked next-token loss and the gradient of every parameter, float32, for ring, Ulysses and hybrid
sequence parallelism (the model zigzag-permutes the decoder sequence for ring and hybrid itself), and
the compiled program of that same loss and gradient for full-length gathers.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import synthetic_batch
from af_next_jax.parallel import MeshConfig, batch_shardings, logical_axis_rules, make_mesh, param_shardings

SEQ_LEN = 256
MESHES = {
    "ring": MeshConfig(data=1, fsdp=2, ring=4),
    "ulysses": MeshConfig(data=1, fsdp=2, ulysses=4),  # K/V heads x2
    "hybrid": MeshConfig(data=1, fsdp=2, ring=2, ulysses=2),
}
# ~1.5 min each to compile on 2 shared cores: CI runs the hybrid (ring + all-to-all + zigzag).
IMPLEMENTATIONS = [pytest.param("ring", marks=pytest.mark.slow), pytest.param("ulysses", marks=pytest.mark.slow),
                   "hybrid"]


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


@pytest.fixture(scope="module")
def sharded_loss_and_gradient(reference):
    """implementation -> (compiled loss-and-gradient, sharded params, sharded batch), compiled once
    per implementation for both tests below."""
    config, batch, params, _, _ = reference
    compiled = {}

    def get(implementation):
        if implementation not in compiled:
            mesh_config = MESHES[implementation]
            model = AFNextModel(config.replace(sequence_parallelism=implementation))
            mesh, rules = make_mesh(mesh_config), logical_axis_rules(mesh_config)
            # As the trainer runs it: the mesh (sequence-parallel attention reads it) and the rules scope.
            with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
                abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
                sharded_params = jax.device_put(params, param_shardings(abstract, mesh, rules))
                sharded_batch = jax.device_put(batch, batch_shardings(batch, mesh, rules))
                step = jax.jit(jax.value_and_grad(lambda p, b: masked_next_token_loss(model, p, b)))
                compiled[implementation] = (step.lower(sharded_params, sharded_batch).compile(),
                                            sharded_params, sharded_batch)
        return compiled[implementation]

    return get


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sequence_sharded_model_loss_and_gradients_equal_unsharded(reference, sharded_loss_and_gradient,
                                                                   implementation):
    _, _, _, expected_loss, expected_grads = reference
    mesh_config = MESHES[implementation]
    step, sharded_params, sharded_batch = sharded_loss_and_gradient(implementation)
    loss, grads = step(sharded_params, sharded_batch)
    # The decoder sequence really is sharded: each device holds SEQ_LEN / (ring x ulysses) tokens.
    assert sharded_batch["token_ids"].addressable_shards[0].data.shape[1] == SEQ_LEN // (
        mesh_config.ring * mesh_config.ulysses)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
    for path, actual, expected in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                                      jax.tree.leaves(expected_grads)):
        scale = float(jnp.abs(expected).max()) or 1.0
        error = float(jnp.abs(actual - expected).max()) / scale
        assert error <= 1e-4, f"{jax.tree_util.keystr(path[0])}: relative error {error:.2e}"


# A collective in compiled (per-device) HLO: `%name = f32[1,256,64]{2,0,1} all-gather(%x), ...`.
# All-reduce counts too: XLA may gather by all-reducing a zero-padded buffer. All-to-all does not:
# Ulysses trades the sequence for heads on purpose, and its result holds L / ring tokens.
GATHERING_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%\S+ = (?P<result>.+?) (?:all-gather|all-reduce)(?:-start)?\(")
FLOAT_SHAPE = re.compile(r"\b(?:bf16|f16|f32|f64)\[([\d,]*)\]")


def full_length_gathers(compiled_hlo: str, seq_len: int) -> list[str]:
    """Floating-point all-gathers / all-reduces of the compiled program whose per-device result has a
    dimension of the whole sequence (`seq_len`), whatever the width of the activation."""
    found = []
    for line in compiled_hlo.splitlines():
        match = GATHERING_COLLECTIVE.match(line)
        shapes = FLOAT_SHAPE.findall(match.group("result")) if match else []
        if any(seq_len in [int(size) for size in dims.split(",") if size] for dims in shapes):
            found.append(line.strip()[:240])
    return found


def activation_widths(config):
    """The trailing shape of every [B, L, ...] activation of the decoder."""
    decoder = config.decoder
    return {"hidden": (decoder.hidden_size,), "q_heads": (decoder.num_heads, decoder.head_dim),
            "kv_heads": (decoder.num_kv_heads, decoder.head_dim), "mlp": (decoder.intermediate_size,),
            "vocab": (decoder.vocab_size,)}


@pytest.mark.parametrize("width", sorted(activation_widths(tiny())))
def test_gather_detector_finds_a_full_length_gather_of_every_activation_width(width):
    """The detector against a program that certainly gathers: a sequence-sharded [B, L, width]
    activation made replicated; the same program keeping the sharding must not be flagged."""
    mesh = make_mesh(MESHES["ring"])
    shape = (2, SEQ_LEN) + activation_widths(tiny())[width]
    sharded = NamedSharding(mesh, P("fsdp", ("ring", "ulysses")))
    x = jax.device_put(np.ones(shape, np.float32), sharded)
    for out_sharding, gathers in ((NamedSharding(mesh, P()), True), (sharded, False)):
        hlo = jax.jit(lambda a: 2 * a, out_shardings=out_sharding).lower(x).compile().as_text()
        assert bool(full_length_gathers(hlo, SEQ_LEN)) == gathers, hlo


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_decoder_activations_are_never_gathered_to_full_length(reference, sharded_loss_and_gradient,
                                                               implementation):
    """Under the rules scope no device ever holds the whole decoder sequence of any activation
    (hidden states, queries, keys / values, MLP, logits), forward or backward."""
    _, _, params, _, _ = reference
    # No parameter has a dimension of SEQ_LEN, so a flagged collective can only be an activation.
    assert all(SEQ_LEN not in leaf.shape for leaf in jax.tree.leaves(params))
    step = sharded_loss_and_gradient(implementation)[0]
    gathers = full_length_gathers(step.as_text(), SEQ_LEN)
    assert not gathers, "\n".join(gathers)
