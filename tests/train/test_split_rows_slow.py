"""`slow`: rows split across processes in every layout, and the faults of such a run.

  - (b) a row over both processes with no DCN axis and (c) FSDP across processes (groups of one), each
    against 1 process x 8 devices with the same mesh sizes (tolerance: test_split_rows.py);
  - 4 processes x 2 devices: two row groups of two; the groups read different data shards, the members
    of a group the same (checked by the trainer at every step here), and the curve is the single
    process's with the same mesh;
  - the paper's layout (a) SIGKILLed on both processes mid-run and relaunched: the uninterrupted curve
    exactly; then SIGTERM to one process: both save the same step and exit 0.

    python -m pytest -m slow tests/train/test_split_rows_slow.py      (~20 minutes on 2 cores)
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from af_next_jax.train.metrics import read_metrics
from split_rows_helpers import LAYOUTS, TIMEOUT, flags, launch, logs, run_one_process
from test_multihost_faults import _signal_when, _steps_done
from test_split_rows import RTOL
from trainer_helpers import read_log, wait_all

pytestmark = pytest.mark.slow
STEPS = 3


def _assert_same_curve(split: str, single: str, steps: int = STEPS):
    two, one = read_metrics(split), read_metrics(single)
    assert sorted(two) == sorted(one) == list(range(1, steps + 1))
    for name in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose([two[s][name] for s in two], [one[s][name] for s in two], rtol=RTOL, err_msg=name)


@pytest.mark.parametrize("layout", ["row_spans_both", "whole_rows"])
def test_two_processes_give_the_curve_of_one_process(layout, demo_data, tmp_path):
    root = str(tmp_path)
    split, single = LAYOUTS[layout]
    codes = wait_all(launch(os.path.join(root, "two"), root, "two", 2, 4, flags(demo_data, STEPS, *split)), TIMEOUT)
    assert codes == [0, 0], logs(root, "two", 2)
    assert run_one_process(os.path.join(root, "one"), root, "one", flags(demo_data, STEPS, *single)) == [0]
    _assert_same_curve(os.path.join(root, "two"), os.path.join(root, "one"))


def test_four_processes_form_two_groups_of_two(demo_data, tmp_path):
    root = str(tmp_path)
    mesh = ["--config.mesh.fsdp=1", "--config.mesh.ring=1", "--config.mesh.ulysses=2", "--config.mesh.dcn_fsdp=2",
            "--config.mesh.dcn_ring=2"]
    # Check the groups' data at every step (log_every=1 in COMMON): members must agree each time.
    codes = wait_all(launch(os.path.join(root, "four"), root, "four", 4, 2, flags(demo_data, STEPS, *mesh)), TIMEOUT)
    assert codes == [0, 0, 0, 0], logs(root, "four", 4)
    with open(os.path.join(root, "four", "train.log")) as handle:
        log = handle.read()
    assert "2 row group(s)" in log and "group 0: processes 0, 1" in log and "group 1: processes 2, 3" in log
    shards = []
    for rank in range(4):
        name = "train.log" if rank == 0 else f"train.process_{rank}.log"
        with open(os.path.join(root, "four", name)) as handle:
            line = next(line for line in handle if "this process (row group" in line)
        shards.append(line.split("reads shards ")[1].strip())
    assert shards == ["0-0", "0-0", "1-1", "1-1"]  # members read the same shard, the groups different ones
    _, single = LAYOUTS["whole_rows"]  # fsdp 2, ring 2, ulysses 2: the same sizes on one process
    assert run_one_process(os.path.join(root, "one"), root, "one", flags(demo_data, STEPS, *single)) == [0]
    _assert_same_curve(os.path.join(root, "four"), os.path.join(root, "one"))


def test_a_split_row_run_killed_and_preempted_gives_the_uninterrupted_curve(demo_data, tmp_path):
    root, steps = str(tmp_path), 8
    split, _ = LAYOUTS["ring_across_processes"]
    extra = flags(demo_data, steps, *split)
    cache = os.path.join(root, "compilation_cache")
    reference, interrupted = os.path.join(root, "reference"), os.path.join(root, "interrupted")
    assert wait_all(launch(reference, root, "reference", 2, 4, extra, cache=cache), TIMEOUT) == [0, 0], \
        logs(root, "reference", 2)

    first = launch(interrupted, root, "killed", 2, 4, extra, cache=cache)
    _signal_when(first, interrupted, 3, signal.SIGKILL, (0, 1))
    assert wait_all(first, 120) == [-signal.SIGKILL] * 2
    killed_at = _steps_done(interrupted)
    assert 3 <= killed_at < steps

    second = launch(interrupted, root, "terminated", 2, 4, extra, cache=cache)
    _signal_when(second, interrupted, killed_at + 1, signal.SIGTERM, (1,))
    assert wait_all(second, TIMEOUT) == [0, 0], logs(root, "terminated", 2)
    saved = []
    for rank in (0, 1):
        line = next(line for line in read_log(root, "terminated", rank).splitlines() if "SIGTERM: saved step" in line)
        saved.append(int(line.split("SIGTERM: saved step ")[1].split()[0]))
    assert saved[0] == saved[1] < steps

    assert wait_all(launch(interrupted, root, "final", 2, 4, extra, cache=cache), TIMEOUT) == [0, 0]
    expected, resumed = read_metrics(reference), read_metrics(interrupted)
    assert sorted(resumed) == list(range(1, steps + 1))
    for name in ("loss", "grad_norm"):
        assert [expected[s][name] for s in expected] == [resumed[s][name] for s in expected], name
