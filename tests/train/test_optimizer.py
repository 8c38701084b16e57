"""Stage freezing, per-module learning rates and the schedule (af_next_jax/train/optimizer.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from af_next_jax.train.optimizer import (FROZEN, STAGES, count_state_elements, learning_rate_schedule,
                                         make_optimizer, parameter_labels)


def _optimizer_config(**changes):
    values = dict(learning_rate=1e-2, warmup_steps=0, final_lr_fraction=0.1, b1=0.9, b2=0.95, eps=1e-8,
                  weight_decay=0.0, grad_clip_norm=0.0, lr_multipliers={})
    values.update(changes)
    return ml_collections.ConfigDict(values)


def _size(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_trains_exactly_its_groups_and_never_the_position_table(tiny_setup, stage):
    labels = parameter_labels(tiny_setup["params"], stage)["params"]
    for group in ("encoder", "projector", "decoder"):
        expected = {group} if group in STAGES[stage] else {FROZEN}
        if group == "encoder" and group in STAGES[stage]:
            expected = {"encoder", FROZEN}  # the fixed position table stays frozen
        assert set(jax.tree.leaves(labels[group])) == expected, group
    assert labels["encoder"]["embed_positions"] == FROZEN


def test_frozen_parameters_get_no_optimizer_state(tiny_setup):
    params = tiny_setup["params"]
    optimizer, _ = make_optimizer(_optimizer_config(), parameter_labels(params, "projector"), total_steps=10)
    state = optimizer.init(params)
    projector = _size(params["params"]["projector"])
    # Adam's two moments for the projector only, plus a few scalar step counters.
    assert 2 * projector <= count_state_elements(state) <= 2 * projector + 8
    assert count_state_elements(state) < _size(params) // 10


def test_per_module_learning_rate_multiplier_scales_that_groups_updates(tiny_setup):
    params = tiny_setup["params"]
    labels = parameter_labels(params, "full")
    optimizer, _ = make_optimizer(_optimizer_config(lr_multipliers={"encoder": 0.1}), labels, total_steps=10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # Adam's first update of a constant gradient is lr x 1 per element.
    np.testing.assert_allclose(updates["params"]["decoder"]["lm_head"], -1e-2, rtol=1e-4)
    np.testing.assert_allclose(updates["params"]["encoder"]["conv1"]["kernel"], -1e-3, rtol=1e-4)
    np.testing.assert_array_equal(updates["params"]["encoder"]["embed_positions"], 0.0)


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_final_fraction():
    schedule = learning_rate_schedule(_optimizer_config(warmup_steps=10), total_steps=110)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-3, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(10)), 1e-2, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(60)), 1e-3 + 0.5 * 9e-3, rtol=1e-4)  # half way down the cosine
    np.testing.assert_allclose(float(schedule(110)), 1e-3, rtol=1e-5)


def test_unknown_stage_and_group_are_errors_that_list_the_valid_names(tiny_setup):
    with pytest.raises(ValueError, match="valid stages"):
        parameter_labels(tiny_setup["params"], "everything")
    with pytest.raises(ValueError, match="valid"):
        make_optimizer(_optimizer_config(lr_multipliers={"llm": 0.5}),
                       parameter_labels(tiny_setup["params"], "full"), total_steps=10)


def _leaf_names(params):
    return {jax.tree_util.keystr(path): path[-1].key for path, _ in jax.tree_util.tree_leaves_with_path(params)}


def test_weight_decay_skips_biases_and_norm_scales(tiny_setup):
    """With a zero gradient Adam's step is 0, so the update is the decay alone: -lr x wd x p on matrices and
    embeddings, exactly 0 on every bias and norm scale (decay would pull scales towards 0)."""
    params = tiny_setup["params"]
    optimizer, _ = make_optimizer(_optimizer_config(weight_decay=0.1), parameter_labels(params, "full"),
                                  total_steps=10)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    names = _leaf_names(params)
    flat_params = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(params))
    flat_updates = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(updates))
    exempt = [key for key, name in names.items() if name in ("bias", "scale")]
    decayed = [key for key, name in names.items() if name not in ("bias", "scale") and "embed_positions" not in key]
    # The tiny model has both kinds in every group: norm scales and biases in the encoder, the projector's
    # biases, the decoder's RMSNorm scales and attention biases.
    for group in ("encoder", "projector", "decoder"):
        assert any(f"'{group}'" in key for key in exempt) and any(f"'{group}'" in key for key in decayed), group
    assert any(names[key] == "scale" for key in exempt) and any(names[key] == "bias" for key in exempt)
    for key in exempt:
        np.testing.assert_array_equal(flat_updates[key], 0.0, err_msg=key)
    for key in decayed:
        np.testing.assert_allclose(flat_updates[key], -1e-2 * 0.1 * flat_params[key], rtol=1e-5, atol=1e-12,
                                   err_msg=key)


def test_gradients_are_clipped_by_their_global_norm_before_adam(tiny_setup):
    """Clipping at norm c equals the unclipped optimizer fed g x min(1, c / ||g||), ||g|| over all leaves.

    Two steps: a large gradient (clipped) then a small one (left alone). Adam's first step is scale-free,
    so the second step is where the clipped first moment shows."""
    params = tiny_setup["params"]
    labels = parameter_labels(params, "full")
    clipped, _ = make_optimizer(_optimizer_config(grad_clip_norm=1.0), labels, total_steps=10)
    plain, _ = make_optimizer(_optimizer_config(grad_clip_norm=0.0), labels, total_steps=10)
    rng = np.random.default_rng(0)
    trained = jax.tree.map(lambda label: label != FROZEN, labels)
    large = jax.tree.map(lambda p, t: jnp.asarray(rng.standard_normal(p.shape), jnp.float32) * t, params, trained)
    small = jax.tree.map(lambda g: 1e-3 * jnp.roll(g, 1), large)
    norm_large, norm_small = float(optax.tree.norm(large)), float(optax.tree.norm(small))
    assert norm_large > 10 and norm_small < 1.0
    # A per-leaf clip would scale each leaf by its own norm: make the leaves' norms differ widely.
    large["params"]["decoder"]["lm_head"] = 30 * large["params"]["decoder"]["lm_head"]
    norm_large = float(optax.tree.norm(large))

    def two_steps(optimizer, first, second):
        state = optimizer.init(params)
        _, state = optimizer.update(first, state, params)
        updates, _ = optimizer.update(second, state, params)
        return updates

    actual = two_steps(clipped, large, small)
    expected = two_steps(plain, jax.tree.map(lambda g: g / norm_large, large), small)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-12, err_msg=jax.tree_util.keystr(path))
    unclipped = two_steps(plain, large, small)
    assert not np.allclose(unclipped["params"]["decoder"]["lm_head"], actual["params"]["decoder"]["lm_head"])
