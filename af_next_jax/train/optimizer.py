"""AdamW with warmup + cosine, global-norm clipping, per-module learning rates and stage freezing.

The model's top-level parameter groups are `encoder`, `projector` and `decoder`. A training stage
names the groups it trains (STAGES); every other group is frozen, and so are the fixed tables of
`FROZEN_PARAMETERS` (the encoder's sinusoidal position table) in every stage. Frozen parameters go
through `optax.set_to_zero` inside `optax.multi_transform`, which holds **no optimizer state** for
them: stage 1 at 7B keeps Adam moments for the 40M projector weights only, not for 8B.

    labels = parameter_labels(params, stage="projector")
    optimizer, schedule = make_optimizer(config.optimizer, labels, config.total_steps)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from af_next_jax.model.af_next import FROZEN_PARAMETERS

PARAMETER_GROUPS = ("encoder", "projector", "decoder")
FROZEN = "frozen"
# Curriculum stages -> trained groups (AF3 / AF-Next recipe, ../shared/REFERENCE.md).
STAGES = {
    "projector": ("projector",),                          # align the adaptor; encoder and LLM frozen
    "encoder_projector": ("encoder", "projector"),        # train the encoder; LLM frozen
    "full": ("encoder", "projector", "decoder"),          # mid-training / fine-tuning
    "long_context": ("encoder", "projector", "decoder"),  # everything, at up to 128K tokens
}
# Leaves that get no weight decay: biases and norm scales (decay would pull scales towards 0).
NO_DECAY_NAMES = ("bias", "scale")


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def parameter_labels(params, stage: str):
    """A tree like `params` whose leaves name the optimizer group: `encoder`, ..., or `frozen`."""
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; valid stages: {sorted(STAGES)}")
    trained = STAGES[stage]

    def label(path, _):
        names = _path_names(path)
        names = names[1:] if names and names[0] == "params" else names
        if any(names[:len(frozen)] == frozen for frozen in FROZEN_PARAMETERS):
            return FROZEN
        if names[0] not in PARAMETER_GROUPS:
            raise ValueError(f"parameter {'/'.join(names)} is in no group of {PARAMETER_GROUPS}")
        return names[0] if names[0] in trained else FROZEN

    return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(labels):
    return jax.tree.map(lambda label: label != FROZEN, labels)


def learning_rate_schedule(optimizer_config, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine to `final_lr_fraction x learning_rate`."""
    c = optimizer_config
    decay_steps = max(total_steps, c.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps, decay_steps=decay_steps,
        end_value=c.learning_rate * c.final_lr_fraction)


def _decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: _path_names(path)[-1] not in NO_DECAY_NAMES, params)


def make_optimizer(optimizer_config, labels, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain for `labels` (from `parameter_labels`) and the base learning-rate schedule.

    Order: clip the global norm of all gradients (frozen ones are zero, so they do not count), then
    per group Adam -> decoupled weight decay -> -lr(step) x the group's `lr_multipliers` entry.
    """
    c = optimizer_config
    schedule = learning_rate_schedule(c, total_steps)
    multipliers = dict(c.lr_multipliers)
    unknown = set(multipliers) - set(PARAMETER_GROUPS)
    if unknown:
        raise ValueError(f"lr_multipliers has unknown groups {sorted(unknown)}; valid: {PARAMETER_GROUPS}")
    used = sorted(set(jax.tree.leaves(labels)))
    transforms = {}
    for group in used:
        if group == FROZEN:
            transforms[group] = optax.set_to_zero()
            continue
        multiplier = float(multipliers.get(group, 1.0))
        transforms[group] = optax.chain(
            optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps),
            optax.add_decayed_weights(c.weight_decay, mask=_decay_mask),
            optax.scale_by_learning_rate(lambda step, m=multiplier: m * schedule(step)),
        )
    chain = [optax.clip_by_global_norm(c.grad_clip_norm)] if c.grad_clip_norm else []
    chain.append(optax.multi_transform(transforms, labels))
    return optax.chain(*chain), schedule


def count_state_elements(opt_state) -> int:
    """Number of array elements in an optimizer state (step counters included)."""
    return sum(int(jnp.size(leaf)) for leaf in jax.tree.leaves(opt_state))
