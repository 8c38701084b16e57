"""The scaled-down long-context experiment on 8 fake CPU devices: hybrid sequence parallelism
(Ulysses 2 x ring 2) + FSDP 2, full remat, the `long_context` stage, through `train()`.

The first step's loss must equal the plain single-device (`xla` attention) loss of the same
parameters and batch. The batches turn non-finite from the third step on: the run must skip those
updates, stop after `max_nonfinite_streak` in a row, and leave the offending step saved.
"""

import json
import os

import jax
import numpy as np
import pytest

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.experiment import load_config
from af_next_jax.train.loop import NonFiniteLossError, train
from af_next_jax.train.metrics import read_metrics
from af_next_jax.batch import zeros_batch
from af_next_jax.experiment import unbox
from af_next_jax.train.train_step import model_loss_sums
from trainer_helpers import REPO, SEQ_LEN, SyntheticBatches, micro_batch

STREAK = 2
NUM_WINDOWS = 8  # the window axis splits over the 8 devices (the trainer refuses a replicated one)


class ObservedBatches(SyntheticBatches):
    """Records how many batches the loop had taken each time it read a step's scalars (the loop asks
    for the pipeline's metrics while reporting a step)."""

    def __init__(self, poison_from=None):
        super().__init__(poison_from=poison_from, num_windows=NUM_WINDOWS)
        self.taken_at_report: list[int] = []

    def metrics(self) -> dict:
        self.taken_at_report.append(self.index)
        return super().metrics()


def long_context_config(total_steps: int):
    return load_config(os.path.join(REPO, "experiments", "long_context_debug.py"), [
        f"--config.data.seq_len={SEQ_LEN}", f"--config.data.max_windows_per_batch={NUM_WINDOWS}",
        f"--config.total_steps={total_steps}", "--config.eval_every=0", "--config.checkpoint_every=100",
        f"--config.max_nonfinite_streak={STREAK}", "--config.loss_chunk_length=64",
        "--config.peak_flops_per_device=1e11", "--config.export_at_end=False"])


@pytest.fixture(scope="module")
def long_context_run(tmp_path_factory):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    config = long_context_config(total_steps=10)
    workdir = str(tmp_path_factory.mktemp("long_context"))
    batches = ObservedBatches(poison_from=2)
    with pytest.raises(NonFiniteLossError) as stopped:
        train(config, workdir, batches=batches)
    return config, workdir, stopped.value, batches


def test_sequence_parallel_first_step_loss_equals_single_device_loss(long_context_run):
    config, workdir, _, _ = long_context_run
    with open(os.path.join(workdir, "config.json")) as handle:
        mesh = json.load(handle)["mesh"]
    assert (mesh["ring"], mesh["ulysses"], mesh["fsdp"]) == (2, 2, 2)
    model_config = tiny()  # `xla` attention, no remat: the reference
    model = AFNextModel(model_config)
    example = zeros_batch(model_config, batch_size=2, seq_len=SEQ_LEN, num_windows=NUM_WINDOWS)
    init_key, _ = jax.random.split(jax.random.PRNGKey(config.seed))
    params = jax.jit(lambda key: unbox(model.init(key, example)))(init_key)
    loss_sum, _, tokens = jax.jit(lambda p, b: model_loss_sums(model, p, b, loss_chunk_length=SEQ_LEN))(
        params, micro_batch(0, num_windows=NUM_WINDOWS))
    first = read_metrics(workdir)[1]
    np.testing.assert_allclose(first["loss"], float(loss_sum / tokens), rtol=2e-5)


def test_non_finite_steps_are_skipped_then_the_run_stops_with_the_step_saved(long_context_run):
    _, workdir, error, _ = long_context_run
    metrics = read_metrics(workdir)
    stop_step = 2 + STREAK
    assert sorted(metrics) == list(range(1, stop_step + 1))
    assert [metrics[s]["finite"] for s in sorted(metrics)] == [1.0, 1.0] + [0.0] * STREAK
    assert metrics[stop_step]["nonfinite_total"] == STREAK
    assert str(stop_step) in os.listdir(os.path.join(workdir, "checkpoints"))
    assert os.path.isfile(os.path.join(workdir, f"nonfinite_step_{stop_step}.npz"))
    assert f"stopped at step {stop_step}" in str(error)


def test_the_loop_reads_each_steps_scalars_only_after_dispatching_the_next_step(long_context_run):
    """No host sync between steps: when step N is reported, step N+1 is dispatched and batch N+2 read."""
    _, _, _, batches = long_context_run
    stop_step = 2 + STREAK
    assert batches.taken_at_report == [step + 2 for step in range(1, stop_step + 1)]


def test_resuming_a_run_stopped_for_non_finite_steps_trains_on_from_the_stopping_step(long_context_run):
    """The saved state is the stopping step's (the halted step after it changed nothing), and resuming
    resets the streak so that training goes on."""
    config, workdir, _, _ = long_context_run
    stop_step = 2 + STREAK
    result = train(long_context_config(total_steps=stop_step + 2), workdir,
                   batches=SyntheticBatches(num_windows=NUM_WINDOWS))
    metrics = read_metrics(workdir)
    assert result.status == "finished" and sorted(metrics)[-2:] == [stop_step + 1, stop_step + 2]
    resumed = [metrics[stop_step + 1], metrics[stop_step + 2]]
    assert [m["halted"] for m in resumed] == [0.0, 0.0]
    assert [m["nonfinite_total"] for m in resumed] == [STREAK, STREAK]  # not STREAK + 1: nothing was lost
    assert resumed[0]["learning_rate"] != resumed[1]["learning_rate"]  # the updates are applied
