"""The pure training and evaluation steps: `train_step(state, batch) -> (state, metrics)`.

A training batch is the af_next_jax/batch.py dict with one extra leading axis of
`grad_accum_steps` micro-batches: every field is [A, ...]. Gradients of the summed token losses
are accumulated over the A micro-batches in float32 and divided by the total number of trained
tokens, so the loss is the exact token mean of the whole global batch whatever A is.

Parameters are float32 master weights; the model computes in `ModelConfig.compute_dtype` (bf16 on
accelerators) and its remat policy comes from the same config.

A non-finite loss or gradient norm keeps the previous parameters and optimizer state (the update
is skipped) and bumps `nonfinite_streak` / `nonfinite_total`; the loop stops after N in a row.
Given `max_nonfinite_streak`, a step that starts from a state whose streak already reached it is
halted: it returns that state unchanged (step counter included). The loop reads each step's scalars
one step late, so the step after the stopping one is already running when the loop sees the streak;
halting it lets the loop save exactly the stopping step's state.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from af_next_jax.model.af_next import AFNextModel
from af_next_jax.train.loss import chunked_cross_entropy


@flax.struct.dataclass
class TrainState:
    step: jax.Array               # int32, steps taken (skipped non-finite steps included)
    params: Any                   # {"params": {...}} float32
    opt_state: Any
    rng: jax.Array                # raw uint32 key; folded with the step for any per-step randomness
    nonfinite_streak: jax.Array   # int32, consecutive skipped steps
    nonfinite_total: jax.Array    # int32, all skipped steps

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, values: dict) -> "TrainState":
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})


def new_train_state(params, optimizer: optax.GradientTransformation, rng) -> TrainState:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731 -- distinct buffers, so the state can be donated
    return TrainState(step=zero(), params=params, opt_state=optimizer.init(params), rng=rng,
                      nonfinite_streak=zero(), nonfinite_total=zero())


def model_loss_sums(model: AFNextModel, params, batch, *, loss_chunk_length: int):
    """(summed loss, correct predictions, trained tokens) of one [B, L] batch."""
    hidden_BxLxD = model.apply(params, batch, return_hidden=True)
    lm_head_DxV = model.apply(params, method=AFNextModel.output_projection)
    # The lm_head is outside the layer stacks (no remat policy): it runs the model's numerics as given.
    return chunked_cross_entropy(hidden_BxLxD, lm_head_DxV, batch["target_ids"], batch["loss_mask"],
                                 chunk_length=loss_chunk_length, compute_dtype=jnp.dtype(model.config.compute_dtype),
                                 numerics=model.numerics)


def make_train_step(model: AFNextModel, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    trainable, *, loss_chunk_length: int, max_nonfinite_streak: int | None = None):
    """Build `train_step(state, batch) -> (state, metrics)`; `trainable` is a bool tree like params.

    Frozen parameters enter the loss through `stop_gradient`, so XLA never computes their weight
    gradients (their cotangents are constant zeros and the matmuls producing them are removed).
    """

    def loss_fn(params, micro_batch):
        params = jax.tree.map(lambda p, train: p if train else jax.lax.stop_gradient(p), params, trainable)
        loss_sum, correct, tokens = model_loss_sums(model, params, micro_batch, loss_chunk_length=loss_chunk_length)
        return loss_sum, (correct, tokens)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(params, batch):
        micro_batches = jax.tree.leaves(batch)[0].shape[0]
        if micro_batches == 1:
            (loss_sum, (correct, tokens)), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
            return loss_sum, correct, tokens, grads

        def body(carry, micro_batch):
            (loss_sum, (correct, tokens)), grads = grad_fn(params, micro_batch)
            totals = (carry[0] + loss_sum, carry[1] + correct, carry[2] + tokens)
            return totals + (jax.tree.map(jnp.add, carry[3], grads),), None

        zero = jnp.zeros((), jnp.float32)
        init = (zero, zero, zero, jax.tree.map(jnp.zeros_like, params))
        (loss_sum, correct, tokens, grads), _ = jax.lax.scan(body, init, batch)
        return loss_sum, correct, tokens, grads

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict]:
        loss_sum, correct, tokens, grads = accumulate(state.params, batch)
        denominator = jnp.maximum(tokens, 1.0)
        loss = loss_sum / denominator
        grads = jax.tree.map(lambda g: g / denominator, grads)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # A halted step (see the module docstring) changes nothing; a non-finite one only its counters.
        halted = (state.nonfinite_streak >= max_nonfinite_streak if max_nonfinite_streak is not None
                  else jnp.zeros((), bool))
        apply_update = finite & ~halted
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply_update, n, o), new, old)
        streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
        total = state.nonfinite_total + (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + (~halted).astype(jnp.int32), params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            nonfinite_streak=jnp.where(halted, state.nonfinite_streak, streak),
            nonfinite_total=jnp.where(halted, state.nonfinite_total, total))
        applied_updates = state.step - state.nonfinite_total  # the schedule's step for this update
        metrics = {"loss": loss, "accuracy": correct / denominator, "tokens": tokens, "grad_norm": grad_norm,
                   "learning_rate": schedule(applied_updates), "finite": finite.astype(jnp.float32),
                   "nonfinite_streak": streak, "nonfinite_total": total}
        if max_nonfinite_streak is not None:
            metrics["halted"] = halted.astype(jnp.float32)
        return new_state, metrics

    return train_step


def make_eval_step(model: AFNextModel, *, loss_chunk_length: int):
    """`eval_step(params, batch) -> {loss_sum, correct, tokens}` for one [B, L] batch."""

    def eval_step(params, batch):
        loss_sum, correct, tokens = model_loss_sums(model, params, batch, loss_chunk_length=loss_chunk_length)
        return {"loss_sum": loss_sum, "correct": correct, "tokens": tokens}

    return eval_step
