"""The analytic FLOP count (train/flops.py) against XLA's cost_analysis() of the tiny model.

XLA counts every floating-point op (norms, softmax, GELU, the loss) while the formula counts the
matmuls and attention products only, so the formula must come out a little below XLA: between
85% and 100% of it, for the forward pass and for forward + backward. Layers are unrolled
(`scan_layers=False`) because cost analysis counts a while-loop body once.
"""

import jax
import pytest

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.train.flops import forward_flops_by_part, train_step_flops
from af_next_jax.train.state import unbox
from af_next_jax.train.train_step import model_loss_sums
from trainer_helpers import NUM_WINDOWS, SEQ_LEN, micro_batch


def _xla_flops(function, *args) -> float:
    analysis = jax.jit(function).lower(*args).compile().cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


@pytest.fixture(scope="module")
def measured():
    config = tiny(scan_layers=False)
    model = AFNextModel(config)
    batch = micro_batch(0, config)
    params = unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch))
    loss = lambda p, b: model_loss_sums(model, p, b, loss_chunk_length=SEQ_LEN)[0]  # noqa: E731
    return config, batch, _xla_flops(loss, params, batch), _xla_flops(jax.grad(loss), params, batch)


def test_analytic_forward_flops_match_xla_cost_analysis(measured):
    config, batch, xla_forward, _ = measured
    parts = forward_flops_by_part(config, batch_size=batch["token_ids"].shape[0], seq_len=SEQ_LEN,
                                  num_windows=NUM_WINDOWS, causal=False)  # `xla` attention computes all L x L
    ratio = sum(part.forward for part in parts.values()) / xla_forward
    assert 0.85 <= ratio <= 1.0, ratio


def test_analytic_training_flops_match_xla_cost_analysis_of_the_gradient(measured):
    config, batch, _, xla_train = measured
    analytic = train_step_flops(config, batch_size=batch["token_ids"].shape[0], seq_len=SEQ_LEN,
                                num_windows=NUM_WINDOWS, causal=False)
    ratio = analytic / xla_train
    assert 0.85 <= ratio <= 1.0, ratio
