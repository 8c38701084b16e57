"""One writer per workdir (af_next_jax/holder.py, Workdir.hold; issue 26).

The hold itself (refusal, staleness by time and by a dead process, refresh, release) is checked in
process. Through the CLIs: a second trainer on a workdir that a running trainer holds stops with exit
status 2 naming the holder, and the first run's metrics, checkpoints and export are those of the
session's lone debug run (tests/conftest.py: `debug_run`, the same command); a trainer finding the
hold of a dead run takes it over and resumes from its last checkpoint with the lone run's curve; a
second `convert to-hf` onto an output another conversion holds stops with exit status 2. A two-process
job holds its workdir against a third process (slow: two 8-device compiles).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from af_next_jax.holder import DirectoryHeld, Hold
from af_next_jax.train.metrics import read_metrics
from af_next_jax.workdir import HOLD_FILE
from debug_run import TOTAL_STEPS, environment, train_command
from trainer_helpers import REPO

TIMEOUT = 300


def _dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _hold_record(pid: int, host: str | None = None, purpose: str = "a training run of 1 process(es)") -> str:
    return json.dumps({"purpose": purpose, "host": host or socket.gethostname(), "pid": pid,
                       "started": "2026-01-01T00:00:00+00:00", "job": {}})


def _checkpoint_steps(workdir) -> list[int]:
    return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def _losses(workdir) -> dict[int, float]:
    return {step: record["loss"] for step, record in read_metrics(str(workdir)).items()}


# ---------------------------------------------------------------- the hold, in process

def test_a_live_hold_refuses_a_second_writer_naming_the_holder(tmp_path):
    with Hold(tmp_path / "run.hold", "the first writer"):
        with pytest.raises(DirectoryHeld) as refused:
            Hold(tmp_path / "run.hold", "the second writer").acquire()
    message = str(refused.value)
    assert f"{tmp_path} is in use by the first writer (host {socket.gethostname()}, pid {os.getpid()}, started " \
           in message
    assert "Wait for it to finish or stop it" in message and "Or use another directory" in message


def test_the_hold_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / "run.hold").write_text(_hold_record(dead))
    with caplog.at_level("WARNING", logger="af_next_jax.holder"), Hold(tmp_path / "run.hold", "the next run") as hold:
        assert hold.took_over["pid"] == dead
        assert json.loads((tmp_path / "run.hold").read_text())["pid"] == os.getpid()
    assert f"its process {dead} on this host is gone" in caplog.text and "took over" in caplog.text


def test_a_hold_of_another_host_is_stale_only_once_it_is_not_refreshed_for_stale_seconds(tmp_path):
    path = tmp_path / "run.hold"
    path.write_text(_hold_record(1, host="another-host"))
    with pytest.raises(DirectoryHeld, match="host another-host, pid 1"):
        Hold(path, "the next run", stale_seconds=60).acquire()  # refreshed just now (written): live
    os.utime(path, (time.time() - 61, time.time() - 61))
    with Hold(path, "the next run", stale_seconds=60) as hold:
        assert hold.took_over["host"] == "another-host"


def test_the_holder_refreshes_its_hold_while_it_works(tmp_path):
    path = tmp_path / "run.hold"
    with Hold(path, "a writer", refresh_seconds=0.05):
        os.utime(path, (time.time() - 1000, time.time() - 1000))
        time.sleep(0.5)
        assert time.time() - path.stat().st_mtime < 10


def test_release_removes_the_hold_but_never_a_successors(tmp_path):
    path = tmp_path / "run.hold"
    with Hold(path, "a writer"):
        assert path.is_file()
    assert not path.exists()
    hold = Hold(path, "a writer")
    hold.acquire()
    path.write_text(_hold_record(12345, purpose="a successor"))  # took over while this one hung
    hold.release()
    assert json.loads(path.read_text())["purpose"] == "a successor"


# ---------------------------------------------------------------- two trainers on one workdir

@pytest.fixture(scope="module")
def contested_run(debug_run, tmp_path_factory):
    """The debug run's command twice on one workdir, the second started 2 s after the first holds it."""
    root = tmp_path_factory.mktemp("one_writer")
    workdir = root / "shared"
    command, env = train_command(str(workdir), debug_run["demo_data"]), environment(debug_run["cache_dir"])
    with open(root / "first.log", "w") as first_log:
        first = subprocess.Popen(command, cwd=REPO, env=env, stdout=first_log, stderr=subprocess.STDOUT)
    deadline = time.time() + TIMEOUT
    while not (workdir / HOLD_FILE).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(2)
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    first_status = first.wait(timeout=TIMEOUT)
    return dict(workdir=workdir, first=first, first_status=first_status, second=second,
                first_log=(root / "first.log").read_text(), reference=debug_run["workdir"])


def test_a_second_trainer_on_a_held_workdir_exits_2_naming_the_holder(contested_run):
    second, first = contested_run["second"], contested_run["first"]
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, second.stderr
    assert (f"{contested_run['workdir']} is in use by a training run of 1 process(es) (host {socket.gethostname()}, "
            f"pid {first.pid}, started ") in errors[0]
    assert "Wait for it to finish or stop it" in errors[0]


def test_the_first_trainer_writes_exactly_what_it_writes_alone(contested_run):
    from af_next_jax.convert.orbax_io import load_params

    import jax

    workdir, reference = contested_run["workdir"], contested_run["reference"]
    assert contested_run["first_status"] == 0, contested_run["first_log"][-3000:]
    with open(workdir / "metrics.jsonl") as handle:
        steps = [json.loads(line)["step"] for line in handle if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, TOTAL_STEPS + 1))  # every step once: nobody else appended
    assert _losses(workdir) == _losses(reference)
    assert _checkpoint_steps(workdir) == _checkpoint_steps(reference)
    exported, alone = load_params(workdir / "export"), load_params(os.path.join(reference, "export"))
    assert jax.tree.structure(exported) == jax.tree.structure(alone)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(alone)))
    assert contested_run["first_log"].count("started ") == 1
    assert not (workdir / HOLD_FILE).exists()  # released at the end


def test_a_dead_runs_hold_is_taken_over_and_the_run_resumes_from_its_last_checkpoint(debug_run, tmp_path):
    """A run killed after its step 9 checkpoint (the reference's files up to there, its hold naming a dead
    process of this host): the same command takes the workdir over and finishes with the lone curve."""
    reference, workdir = debug_run["workdir"], tmp_path / "killed"
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copy(os.path.join(reference, "config.json"), workdir)
    shutil.copytree(os.path.join(reference, "checkpoints", "9"), workdir / "checkpoints" / "9")
    dead = _dead_pid()
    (workdir / HOLD_FILE).write_text(_hold_record(dead))
    result = subprocess.run(train_command(str(workdir), debug_run["demo_data"]), cwd=REPO,
                            env=environment(debug_run["cache_dir"]), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"took over {workdir} from a training run of 1 process(es) (host {socket.gethostname()}, pid {dead}" \
           in result.stderr and f"its process {dead} on this host is gone" in result.stderr
    log = (workdir / "train.log").read_text()
    assert "resumed from" in log and "at step 9" in log
    assert f"took over {workdir} from a training run of 1 process(es)" in log  # the run's own record says so
    resumed, alone = _losses(workdir), _losses(reference)
    assert sorted(resumed) == list(range(10, TOTAL_STEPS + 1))
    assert resumed == {step: alone[step] for step in resumed}


# ---------------------------------------------------------------- convert to-hf

def test_a_second_conversion_onto_a_held_output_exits_2_naming_the_holder(debug_run, tmp_path):
    out = tmp_path / "hf"
    with Hold(tmp_path / f".{out.name}.hold", f"a conversion writing {out}", target=out):
        result = subprocess.run(
            [sys.executable, "-m", "af_next_jax.convert", "to-hf", "--checkpoint", debug_run["workdir"], "--out",
             str(out)], cwd=REPO, env=environment(debug_run["cache_dir"]), capture_output=True, text=True,
            timeout=TIMEOUT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (f"{out} is in use by a conversion writing {out} (host {socket.gethostname()}, pid {os.getpid()}, "
            f"started ") in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------- a multi-host pair and a third process

@pytest.mark.slow  # two processes compile the 8-device step: ~2 minutes on 2 cores
def test_a_third_process_on_a_pairs_workdir_exits_2_and_the_pair_finishes(demo_data, tmp_path):
    """Process 0 of a two-process job (SLURM variables, 2 x 4 CPU devices) holds the workdir for both; a
    one-process run of the same command started meanwhile is refused naming the job's holder."""
    import trainer_helpers
    from trainer_helpers import cpu_environment, free_port, read_log, slurm_environment, start_processes, wait_all

    workdir, port = tmp_path / "pair", free_port(61440, 65535)
    flags = [f"--config.data.dir={demo_data}", "--config.total_steps=3", "--config.data.batch_size=8",
             "--config.data.max_windows_per_batch=8", "--config.data.shards=2", "--config.checkpoint_every=2",
             "--config.eval_every=0", "--config.log_every=1"]
    command = trainer_helpers.train_command(str(workdir), flags)
    pair = start_processes([(command, cpu_environment(4, **slurm_environment(rank, 2, port))) for rank in (0, 1)],
                           str(tmp_path), "pair")
    deadline = time.time() + TIMEOUT
    while not (workdir / HOLD_FILE).exists() and all(p.poll() is None for p in pair) and time.time() < deadline:
        time.sleep(0.05)
    third = subprocess.run(command, cwd=REPO, env=cpu_environment(4), capture_output=True, text=True, timeout=TIMEOUT)
    codes = wait_all(pair, TIMEOUT)
    assert codes == [0, 0], "\n\n".join(read_log(str(tmp_path), "pair", rank)[-3000:] for rank in (0, 1))
    assert third.returncode == 2, third.stderr[-3000:]
    (error,) = [line for line in third.stderr.splitlines() if line.startswith("error: ")]
    assert (f"{workdir} is in use by a training run of 2 process(es) (host {socket.gethostname()}, pid {pair[0].pid}, "
            f"SLURM_JOB_ID={port - 61440}") in error
    assert sorted(read_metrics(str(workdir))) == [1, 2, 3]
    assert _checkpoint_steps(workdir) == [2, 3] and not (workdir / HOLD_FILE).exists()
