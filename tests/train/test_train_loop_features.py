"""`train()` end to end on 8 fake CPU devices: evaluation inside the loop and gradient accumulation.

Two short runs of the debug experiment on synthetic batches:
- `accumulated`: 2 micro-batches per step, an evaluation every 3 steps (so at steps 3 and 4, the last);
- `one_big_batch`: the same examples as one micro-batch of twice the rows and windows.
Reference for the evaluation: the exported final parameters through `model_loss_sums` (the loss of
the train step) over the first `eval_batches` held-out batches. Reference for accumulation: the big
batch, whose token-mean loss and gradient must be those of the two micro-batches together.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from af_next_jax.batch import zeros_batch
from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import synthetic_batch
from af_next_jax.experiment import load_config
from af_next_jax.train.loop import train
from af_next_jax.train.metrics import read_metrics
from af_next_jax.experiment import unbox
from af_next_jax.train.state import load_initial_params
from af_next_jax.train.train_step import model_loss_sums
from trainer_helpers import REPO

ROWS, SEQ_LEN, WINDOWS, STEPS, EVAL_EVERY, EVAL_BATCHES = 8, 128, 8, 4, 3, 2


def example_batch(index: int) -> dict:
    """Rows of [ROWS, SEQ_LEN] with audio in half the rows; token counts differ from batch to batch."""
    frames = 100 + 37 * (index % 5)
    batch = synthetic_batch(tiny(), audio_frames_per_example=[[frames], []] * (ROWS // 2), seq_len=SEQ_LEN,
                            num_windows=WINDOWS, seed=index)
    if index % 2:
        batch["loss_mask"][:, ::3] = 0  # unequal trained tokens: a mean of per-batch means would differ
    return batch


def concatenated(first: dict, second: dict) -> dict:
    """Two batches as one: rows and windows in that order (the row-major `<sound>` order is kept)."""
    return {name: np.concatenate([first[name], second[name]]) for name in first}


class Batches:
    """Injected training batches: micro-batch i is `example_batch(i)`; with `merge`, batch i is micro-batches
    2i and 2i+1 as one."""

    def __init__(self, merge: bool = False):
        self.index, self.merge = 0, merge

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.index += 1
        if self.merge:
            return concatenated(example_batch(2 * self.index - 2), example_batch(2 * self.index - 1))
        return example_batch(self.index - 1)

    def get_state(self) -> bytes:
        return str(self.index).encode()

    def set_state(self, state: bytes) -> None:
        self.index = int(state)


def eval_batch(index: int) -> dict:
    return example_batch(1000 + index)


def _run(workdir, *, rows: int, windows: int, accum: int, eval_every: int, batches, eval_factory=None):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    config = load_config(os.path.join(REPO, "experiments", "debug.py"), [
        f"--config.data.batch_size={rows}", f"--config.data.seq_len={SEQ_LEN}",
        f"--config.data.max_windows_per_batch={windows}", f"--config.grad_accum_steps={accum}",
        f"--config.total_steps={STEPS}", f"--config.eval_every={eval_every}",
        f"--config.eval_batches={EVAL_BATCHES}", "--config.checkpoint_every=100",
        "--config.async_checkpointing=False", "--config.loss_chunk_length=64", "--config.log_every=1",
        "--config.peak_flops_per_device=1e11"])
    # The debug experiment warms up over 10 steps and clips at norm 1: both act in these runs.
    assert config.optimizer.warmup_steps > 1 and config.optimizer.grad_clip_norm > 0
    assert train(config, str(workdir), batches=batches, eval_batches_factory=eval_factory).status == "finished"
    return str(workdir)


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    factory_calls = []

    def eval_factory():
        factory_calls.append(1)
        return iter([eval_batch(i) for i in range(EVAL_BATCHES + 1)])  # one more than eval_batches

    workdir = _run(tmp_path_factory.mktemp("accumulated"), rows=ROWS, windows=WINDOWS, accum=2,
                   eval_every=EVAL_EVERY, batches=Batches(), eval_factory=eval_factory)
    return workdir, len(factory_calls)


@pytest.fixture(scope="module")
def one_big_batch(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("big"), rows=2 * ROWS, windows=2 * WINDOWS, accum=1, eval_every=0,
                batches=Batches(merge=True))


def _exported_params(workdir: str):
    model_config = tiny()
    example = zeros_batch(model_config, batch_size=ROWS, seq_len=SEQ_LEN, num_windows=WINDOWS)
    abstract = unbox(jax.eval_shape(AFNextModel(model_config).init, jax.random.PRNGKey(0), example))
    return load_initial_params(workdir, abstract)


def test_evaluation_runs_on_schedule_and_equals_the_loss_of_the_final_parameters(accumulated):
    workdir, factory_calls = accumulated
    evaluations = read_metrics(workdir, kind="eval")
    assert sorted(evaluations) == [EVAL_EVERY, STEPS]  # every eval_every steps, and at the end
    assert factory_calls == 1  # the held-out batches are read once and reused

    model = AFNextModel(tiny())
    params = _exported_params(workdir)
    sums = jax.jit(lambda p, b: model_loss_sums(model, p, b, loss_chunk_length=SEQ_LEN))
    totals = np.sum([np.asarray([float(x) for x in sums(params, eval_batch(i))]) for i in range(EVAL_BATCHES)],
                    axis=0)
    loss_sum, correct, tokens = totals
    final = evaluations[STEPS]
    assert final["tokens"] == tokens
    np.testing.assert_allclose(final["loss"], loss_sum / tokens, rtol=1e-5)
    np.testing.assert_allclose(final["accuracy"], correct / tokens, rtol=1e-6)
    # The earlier evaluation saw the parameters of its own step, not the final ones.
    assert evaluations[EVAL_EVERY]["tokens"] == tokens and evaluations[EVAL_EVERY]["loss"] != final["loss"]


def test_gradient_accumulation_equals_one_batch_of_all_the_micro_batches(accumulated, one_big_batch):
    accumulated_workdir, _ = accumulated
    steps, big = read_metrics(accumulated_workdir), read_metrics(one_big_batch)
    assert sorted(steps) == sorted(big) == list(range(1, STEPS + 1))
    for step in steps:
        assert steps[step]["tokens"] == big[step]["tokens"], step
        np.testing.assert_allclose(steps[step]["loss"], big[step]["loss"], rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(steps[step]["grad_norm"], big[step]["grad_norm"], rtol=1e-4,
                                   err_msg=f"step {step}")
    # The parameters after STEPS updates agree as well.
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(_exported_params(accumulated_workdir)),
                            jax.tree.leaves(_exported_params(one_big_batch))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_a_steps_log_line_comes_before_its_evaluation(accumulated):
    """Scalars are read one step late, except where evaluation waits for the step anyway."""
    workdir, _ = accumulated
    with open(os.path.join(workdir, "train.log")) as handle:
        lines = handle.read().splitlines()
    for step in (EVAL_EVERY, STEPS):
        step_line = next(i for i, line in enumerate(lines) if f"step {step}/{STEPS} |" in line)
        eval_line = next(i for i, line in enumerate(lines) if f"eval at step {step} |" in line)
        assert step_line < eval_line, lines
