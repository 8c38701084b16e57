"""Faults of a two-process run (2 x 4 fake CPU devices, gloo, 127.0.0.1), launched with explicit flags.

A reference run goes straight to the end. A second run is SIGKILLed (both processes) mid-run and
relaunched with the same commands; then ONE process gets SIGTERM (a preemption notice): jax's
preemption sync manager tells the other, both save the same step and exit 0; a third launch runs to
the end. Its loss curve must equal the reference exactly (same program, same batches). The
reference's step-6 checkpoint also resumes on ONE process with 8 devices: the data shards are
re-split (2 shards, 1 process) and steps 7-8 equal the reference to float32 rounding (see
test_multihost.py for the tolerance). With its newest step truncated, two processes set that step
aside together (process 0 moves it) and resume from the previous one. Finally the reference's export
converts with `to-hf` and passes `verify`.

Slow (several launches of two processes, ~10 minutes on 2 cores): `pytest -m slow tests/train/test_multihost_faults.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from af_next_jax.train.metrics import read_metrics
from test_multihost import RTOL, overrides
from trainer_helpers import (REPO, cpu_environment, explicit_launch_flags, free_port, read_log, start_processes,
                             train_command, wait_all)

pytestmark = pytest.mark.slow
STEPS = 8
TIMEOUT = 900


def _two_processes(workdir, demo_data, cache, root, name):
    port = free_port()
    extra = overrides(demo_data, STEPS, "--config.checkpoint_every=3")
    return start_processes([(train_command(workdir, extra) + explicit_launch_flags(rank, 2, port),
                             cpu_environment(4, cache)) for rank in (0, 1)], root, name)


def _steps_done(workdir) -> int:
    try:
        return max(read_metrics(workdir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _signal_when(processes, workdir, step, sig, targets, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while _steps_done(workdir) < step and all(p.poll() is None for p in processes) and time.time() < deadline:
        time.sleep(0.1)
    for index in targets:
        if processes[index].poll() is None:
            processes[index].send_signal(sig)


@pytest.fixture(scope="module")
def fault_runs(demo_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multihost_faults"))
    cache = os.path.join(root, "compilation_cache")
    reference, interrupted = os.path.join(root, "reference"), os.path.join(root, "interrupted")
    reference_codes = wait_all(_two_processes(reference, demo_data, cache, root, "reference"), TIMEOUT)

    first = _two_processes(interrupted, demo_data, cache, root, "killed")
    _signal_when(first, interrupted, 4, signal.SIGKILL, (0, 1))
    killed_codes = wait_all(first, 120)
    steps_at_kill = _steps_done(interrupted)
    checkpoints_at_kill = sorted(int(s) for s in os.listdir(os.path.join(interrupted, "checkpoints")) if s.isdigit())

    second = _two_processes(interrupted, demo_data, cache, root, "terminated")
    # metrics.jsonl runs one step behind the dispatched steps (the loop reads scalars one step late): when it
    # shows step k + 1, step k + 2 is running, and the SIGTERM still lands well before STEPS.
    _signal_when(second, interrupted, steps_at_kill + 1, signal.SIGTERM, (1,))
    terminated_codes = wait_all(second, TIMEOUT)
    terminated_logs = [read_log(root, "terminated", rank) for rank in (0, 1)]
    final_codes = wait_all(_two_processes(interrupted, demo_data, cache, root, "final"), TIMEOUT)

    # The reference's step-6 checkpoint, resumed by one process with 8 devices.
    regrouped = os.path.join(root, "one_process_resume")
    os.makedirs(os.path.join(regrouped, "checkpoints"))
    shutil.copytree(os.path.join(reference, "checkpoints", "6"), os.path.join(regrouped, "checkpoints", "6"))
    extra = overrides(demo_data, STEPS, "--config.checkpoint_every=3")
    regrouped_codes = wait_all(start_processes([(train_command(regrouped, extra), cpu_environment(8, cache))],
                                               root, "regrouped"), TIMEOUT)
    # The reference's checkpoints with the newest step truncated, resumed by two processes: both must
    # set step 8 aside and fall back to step 6 together.
    fallback = os.path.join(root, "truncated_latest")
    shutil.copytree(os.path.join(reference, "checkpoints"), os.path.join(fallback, "checkpoints"))
    for folder, _, files in os.walk(os.path.join(fallback, "checkpoints", str(STEPS), "state")):
        for name in files:
            with open(os.path.join(folder, name), "r+b") as handle:
                handle.truncate(3)
    fallback_codes = wait_all(_two_processes(fallback, demo_data, cache, root, "fallback"), TIMEOUT)

    return dict(root=root, reference=reference, interrupted=interrupted, regrouped=regrouped,
                fallback=fallback, fallback_codes=fallback_codes,
                reference_codes=reference_codes, killed_codes=killed_codes, steps_at_kill=steps_at_kill,
                checkpoints_at_kill=checkpoints_at_kill, terminated_codes=terminated_codes,
                terminated_logs=terminated_logs, final_codes=final_codes, regrouped_codes=regrouped_codes)


def _log(fault_runs, name, rank=0):
    return read_log(fault_runs["root"], name, rank)[-3000:]


def test_both_processes_killed_and_relaunched_give_the_uninterrupted_curve(fault_runs):
    assert fault_runs["reference_codes"] == [0, 0], _log(fault_runs, "reference")
    assert fault_runs["killed_codes"] == [-signal.SIGKILL] * 2
    assert 4 <= fault_runs["steps_at_kill"] < STEPS
    # Checkpoints every 3 steps: the kill came after step 3 was saved (or being saved), never later ones.
    assert fault_runs["checkpoints_at_kill"] and max(fault_runs["checkpoints_at_kill"]) <= fault_runs["steps_at_kill"]
    assert set(fault_runs["checkpoints_at_kill"]) <= {3, 6}
    assert fault_runs["final_codes"] == [0, 0], _log(fault_runs, "final")
    reference, resumed = read_metrics(fault_runs["reference"]), read_metrics(fault_runs["interrupted"])
    assert sorted(reference) == sorted(resumed) == list(range(1, STEPS + 1))
    assert [reference[s]["loss"] for s in reference] == [resumed[s]["loss"] for s in reference]
    assert [reference[s]["grad_norm"] for s in reference] == [resumed[s]["grad_norm"] for s in reference]


def test_sigterm_to_one_process_makes_both_save_the_same_step_and_exit_cleanly(fault_runs):
    assert fault_runs["terminated_codes"] == [0, 0], "\n".join(fault_runs["terminated_logs"])
    saved = []
    for log in fault_runs["terminated_logs"]:
        lines = [line for line in log.splitlines() if "SIGTERM: saved step" in line]
        assert len(lines) == 1, log[-3000:]
        saved.append(int(lines[0].split("SIGTERM: saved step ")[1].split()[0]))
    assert saved[0] == saved[1] and saved[0] < STEPS
    assert str(saved[0]) in os.listdir(os.path.join(fault_runs["interrupted"], "checkpoints"))
    with open(os.path.join(fault_runs["interrupted"], "train.log")) as handle:
        assert f"resumed from {os.path.join(fault_runs['interrupted'], 'checkpoints')} at step {saved[0]}" in \
            handle.read()


def test_a_two_process_checkpoint_resumes_on_one_process_with_the_same_batches(fault_runs):
    assert fault_runs["regrouped_codes"] == [0], _log(fault_runs, "regrouped")
    reference, regrouped = read_metrics(fault_runs["reference"]), read_metrics(fault_runs["regrouped"])
    assert sorted(regrouped) == [7, 8]
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose([regrouped[s][name] for s in (7, 8)], [reference[s][name] for s in (7, 8)],
                                   rtol=RTOL, err_msg=name)


def test_the_two_process_export_converts_to_hf_and_passes_verify(fault_runs, demo_data, tmp_path):
    export = os.path.join(fault_runs["reference"], "export")
    hf = str(tmp_path / "hf")
    for command in (["to-hf", "--checkpoint", export, "--out", hf, "--tokenizer-dir", demo_data, "--dtype", "float32"],
                    ["verify", "--hf-dir", hf, "--checkpoint", export]):
        result = subprocess.run([sys.executable, "-m", "af_next_jax.convert", *command], cwd=REPO,
                                env=cpu_environment(1), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_two_processes_fall_back_past_a_truncated_latest_step_together(fault_runs):
    assert fault_runs["fallback_codes"] == [0, 0], _log(fault_runs, "fallback")
    fallback = fault_runs["fallback"]
    for name in ("train.log", "train.process_1.log"):
        with open(os.path.join(fallback, name)) as handle:
            log = handle.read()
        assert f"checkpoint step {STEPS} in {os.path.join(fallback, 'checkpoints')} is unreadable" in log
        assert f"resumed from {os.path.join(fallback, 'checkpoints')} at step 6" in log
    assert os.listdir(os.path.join(fallback, "corrupt_checkpoints")) == [f"{STEPS}-0"]  # moved once, by process 0
    reference, resumed = read_metrics(fault_runs["reference"]), read_metrics(fallback)
    assert sorted(resumed) == [7, 8]
    assert [resumed[s]["loss"] for s in (7, 8)] == [reference[s]["loss"] for s in (7, 8)]
