"""Faults and resumption, end to end through the CLI in subprocesses (the debug config, demo data).

One reference run goes straight to the end. A second run in another workdir is SIGKILLed mid-run,
restarted with the same command, SIGTERMed (a preemption) after it has resumed, and restarted
again to the end. Its loss curve must be bit-identical to the reference. A persistent compilation
cache shared by the processes keeps the restarts cheap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from af_next_jax.train.metrics import read_metrics
from debug_run import TOTAL_STEPS, environment, train_command
from trainer_helpers import REPO


def _steps_done(workdir: str) -> int:
    try:
        return max(read_metrics(workdir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _finished_checkpoints(workdir: str) -> list[int]:
    """Steps whose save completed (orbax renames its temporary folder to the step number at the end)."""
    try:
        return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())
    except FileNotFoundError:
        return []


def _run_until(command, env, workdir: str, step: int, sig: int, timeout: float = 240,
               finished_checkpoint: int | None = None) -> int:
    """Start the run, send `sig` once `step` steps are logged (and the save of `finished_checkpoint`
    has completed: saves are asynchronous), return the exit code."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while process.poll() is None and time.time() < deadline and (
            _steps_done(workdir) < step or
            (finished_checkpoint is not None and finished_checkpoint not in _finished_checkpoints(workdir))):
        time.sleep(0.1)
    if process.poll() is None:
        process.send_signal(sig)
    return process.wait(timeout=120)


@pytest.fixture(scope="module")
def runs(debug_run, tmp_path_factory):
    """The reference is the session's debug run (tests/conftest.py), shared with the CLI tests."""
    root = tmp_path_factory.mktemp("resume")
    demo_data, env = debug_run["demo_data"], environment(debug_run["cache_dir"])
    reference, interrupted = debug_run["workdir"], str(root / "interrupted")
    killed_rc = _run_until(train_command(interrupted, demo_data), env, interrupted, 4, signal.SIGKILL,
                           finished_checkpoint=3)
    steps_at_kill = _steps_done(interrupted)
    checkpoints_at_kill = sorted(os.listdir(os.path.join(interrupted, "checkpoints")))
    terminated_rc = _run_until(train_command(interrupted, demo_data), env, interrupted, steps_at_kill + 2, signal.SIGTERM)
    with open(os.path.join(interrupted, "train.log")) as log:
        preempted_log = log.read()
    final = subprocess.run(train_command(interrupted, demo_data), cwd=REPO, env=env, capture_output=True, text=True)
    return dict(reference=reference, interrupted=interrupted, killed_rc=killed_rc, steps_at_kill=steps_at_kill,
                checkpoints_at_kill=checkpoints_at_kill, terminated_rc=terminated_rc, preempted_log=preempted_log,
                final=final)


def test_sigkilled_and_resumed_run_has_a_bit_identical_loss_curve(runs):
    assert runs["killed_rc"] == -signal.SIGKILL
    assert runs["steps_at_kill"] < TOTAL_STEPS
    assert runs["final"].returncode == 0, runs["final"].stderr[-2000:]
    reference, resumed = read_metrics(runs["reference"]), read_metrics(runs["interrupted"])
    assert sorted(reference) == sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
    assert [reference[s]["loss"] for s in reference] == [resumed[s]["loss"] for s in reference]
    assert [reference[s]["grad_norm"] for s in reference] == [resumed[s]["grad_norm"] for s in reference]


def test_the_killed_run_resumes_from_its_newest_finished_checkpoint(runs):
    """What the SIGKILL left on disk: finished steps (multiples of checkpoint_every, none past the
    last logged step) and perhaps an unfinished save (orbax's temporary folder), which is ignored."""
    finished = sorted(int(name) for name in runs["checkpoints_at_kill"] if name.isdigit())
    assert 3 in finished and all(step % 3 == 0 and step <= runs["steps_at_kill"] for step in finished)
    assert all(name.isdigit() or ".orbax-checkpoint-tmp" in name for name in runs["checkpoints_at_kill"])
    checkpoints = os.path.join(runs["interrupted"], "checkpoints")
    assert f"resumed from {checkpoints} at step {finished[-1]}" in runs["preempted_log"]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(runs):
    assert runs["steps_at_kill"] + 2 < TOTAL_STEPS, "the killed run got too far for a SIGTERM test"
    assert runs["terminated_rc"] == 0
    assert "SIGTERM: saved step" in runs["preempted_log"]
    assert runs["preempted_log"].count("resumed from") >= 1


def test_finished_run_leaves_checkpoints_export_tensorboard_and_resolved_config(runs):
    workdir = runs["reference"]
    assert str(TOTAL_STEPS) in os.listdir(os.path.join(workdir, "checkpoints"))
    assert os.path.isfile(os.path.join(workdir, "export", "model_config.json"))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(workdir, "tensorboard")))
    with open(os.path.join(workdir, "config.json")) as handle:
        resolved = json.load(handle)
    assert resolved["experiment"]["total_steps"] == TOTAL_STEPS and resolved["model"]["decoder"]["vocab_size"] > 0


def test_next_stage_can_start_from_the_finished_workdir(runs):
    """`init_from=WORKDIR` takes the export of the previous stage; a different model is refused."""
    import dataclasses

    import jax
    import numpy as np

    from af_next_jax.convert.orbax_io import load_config as load_model_config
    from af_next_jax.model.af_next import AFNextModel
    from af_next_jax.batch import zeros_batch
    from af_next_jax.experiment import unbox
    from af_next_jax.train.state import load_initial_params

    model_config = load_model_config(os.path.join(runs["reference"], "export"))
    example = zeros_batch(model_config, batch_size=1, seq_len=16, num_windows=1)
    abstract = unbox(jax.eval_shape(AFNextModel(model_config).init, jax.random.PRNGKey(0), example))
    params = load_initial_params(runs["reference"], abstract)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert all(np.shape(p) == a.shape for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract)))
    wider = model_config.replace(decoder=dataclasses.replace(
        model_config.decoder, intermediate_size=2 * model_config.decoder.intermediate_size))
    wider_abstract = unbox(jax.eval_shape(AFNextModel(wider).init, jax.random.PRNGKey(0), example))
    with pytest.raises(ValueError, match="does not fit"):
        load_initial_params(runs["reference"], wider_abstract)
