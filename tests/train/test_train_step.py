"""The jitted train and eval steps: learning, exact accumulation, frozen tables, NaN skips, eval sums,
bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from scipy.special import logsumexp

from af_next_jax.model.af_next import AFNextModel
from af_next_jax.train.optimizer import trainable_mask
from af_next_jax.train.train_step import make_eval_step, make_train_step, model_loss_sums
from trainer_helpers import micro_batch, stack


def test_loss_falls_when_training_on_one_batch(compiled_step, initial_state):
    batch = stack(micro_batch(1), micro_batch(2))
    state, losses = initial_state, []
    for _ in range(8):
        state, metrics = compiled_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    assert int(state.step) == 8 and int(state.nonfinite_total) == 0


def test_accumulated_step_uses_the_token_mean_over_all_micro_batches(compiled_step, initial_state, tiny_setup):
    model, params = tiny_setup["model"], initial_state.params
    first, second = micro_batch(3), micro_batch(4)
    second["loss_mask"][:, ::2] = 0  # unequal token counts: a mean of means would differ
    _, metrics = compiled_step(initial_state, stack(first, second))

    def loss_and_sums(p, batch):
        loss, correct, tokens = model_loss_sums(model, p, batch, loss_chunk_length=64)
        return loss, (loss, tokens)

    grad_fn = jax.jit(jax.grad(loss_and_sums, has_aux=True))
    grads_1, (loss_1, tokens_1) = grad_fn(params, first)
    grads_2, (loss_2, tokens_2) = grad_fn(params, second)
    tokens = tokens_1 + tokens_2
    np.testing.assert_allclose(float(metrics["loss"]), float((loss_1 + loss_2) / tokens), rtol=1e-5)
    mean_grads = jax.tree.map(lambda a, b: (a + b) / tokens, grads_1, grads_2)
    # The position table is frozen in every stage: the train step never sees its gradient.
    mean_grads["params"]["encoder"]["embed_positions"] = jnp.zeros_like(params["params"]["encoder"]["embed_positions"])
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(mean_grads)), rtol=1e-4)
    assert float(metrics["tokens"]) == float(tokens)


def test_frozen_position_table_is_unchanged_by_a_full_fine_tuning_step(compiled_step, initial_state):
    state = initial_state
    for _ in range(2):  # the warmup's first learning rate is 0
        state, _ = compiled_step(state, stack(micro_batch(5), micro_batch(6)))
    before = initial_state.params["params"]["encoder"]
    after = state.params["params"]["encoder"]
    np.testing.assert_array_equal(after["embed_positions"], before["embed_positions"])
    assert not np.array_equal(after["conv1"]["kernel"], before["conv1"]["kernel"])


def test_non_finite_loss_skips_the_update_and_is_counted(compiled_step, initial_state):
    poisoned = micro_batch(7)
    poisoned["mel_windows"][0, 0, 0] = np.nan
    state, metrics = compiled_step(initial_state, stack(micro_batch(8), poisoned))
    assert float(metrics["finite"]) == 0.0
    assert (int(state.step), int(state.nonfinite_streak), int(state.nonfinite_total)) == (1, 1, 1)
    for before, after in zip(jax.tree.leaves((initial_state.params, initial_state.opt_state)),
                             jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(before, after)
    state, metrics = compiled_step(state, stack(micro_batch(8), micro_batch(9)))
    assert (int(state.nonfinite_streak), int(state.nonfinite_total), float(metrics["finite"])) == (0, 1, 1.0)


def test_a_step_after_the_streak_limit_is_halted_and_changes_nothing(compiled_step, initial_state):
    """The loop reads scalars one step late, so the step after the stopping one runs before the loop
    stops: it must leave the stopping step's state exactly as it was (step counter included)."""
    poisoned = [micro_batch(seed) for seed in (10, 11, 12, 13)]
    for batch in poisoned:
        batch["mel_windows"][0, 0, 0] = np.nan
    state, _ = compiled_step(initial_state, stack(*poisoned[:2]))
    state, metrics = compiled_step(state, stack(*poisoned[2:]))
    assert (int(state.nonfinite_streak), float(metrics["halted"])) == (2, 0.0)  # the limit is reached here
    after, metrics = compiled_step(state, stack(micro_batch(14), micro_batch(15)))  # finite, but too late
    assert float(metrics["halted"]) == 1.0
    for before_leaf, after_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
        np.testing.assert_array_equal(before_leaf, after_leaf)


def test_eval_step_reports_masked_loss_and_accuracy_of_the_full_logits(tiny_setup, initial_state):
    """Reference: the model's full logits, log-softmax, and argmax over the loss-masked tokens."""
    model, params, batch = tiny_setup["model"], initial_state.params, micro_batch(3)
    sums = jax.jit(make_eval_step(model, loss_chunk_length=64))(params, batch)
    logits = np.asarray(model.apply(params, batch), np.float64)
    log_probs = logits - logsumexp(logits, axis=-1, keepdims=True)
    mask = batch["loss_mask"]
    target_log_probs = np.take_along_axis(log_probs, batch["target_ids"][..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(float(sums["loss_sum"]), -(target_log_probs * mask).sum(), rtol=1e-5)
    assert float(sums["tokens"]) == mask.sum()
    assert float(sums["correct"]) == ((logits.argmax(-1) == batch["target_ids"]) * mask).sum()


def test_bfloat16_training_step_tracks_the_float32_loss(tiny_setup, compiled_step, initial_state):
    """Six steps on one batch from the same state, computing in bfloat16 and in float32. With float32
    master weights, float32 accumulation and a float32 loss, bf16 compute perturbs the loss only
    through logits that stay within a few bf16 roundings (test_numerics), averaged over the tokens:
    each step's loss stays within one bf16 unit roundoff (2^-8) of the float32 loss (measured at
    most 0.18 of it), while the loss falls by ~40 of them."""
    s = tiny_setup
    bfloat16_model = AFNextModel(s["config"].replace(compute_dtype="bfloat16"))
    bfloat16_step = jax.jit(make_train_step(bfloat16_model, s["optimizer"], s["schedule"],
                                            trainable_mask(s["labels"]), loss_chunk_length=64))
    batch = stack(micro_batch(1), micro_batch(2))
    float32_state = bfloat16_state = initial_state
    float32_losses, bfloat16_losses = [], []
    for _ in range(6):
        float32_state, float32_metrics = compiled_step(float32_state, batch)
        bfloat16_state, bfloat16_metrics = bfloat16_step(bfloat16_state, batch)
        float32_losses.append(float(float32_metrics["loss"]))
        bfloat16_losses.append(float(bfloat16_metrics["loss"]))
    for step, (float32_loss, bfloat16_loss) in enumerate(zip(float32_losses, bfloat16_losses)):
        assert abs(bfloat16_loss - float32_loss) <= 2.0 ** -8 * float32_loss, (step, float32_losses, bfloat16_losses)
    assert bfloat16_losses[-1] < bfloat16_losses[0] - 1.0 and int(bfloat16_state.nonfinite_total) == 0
