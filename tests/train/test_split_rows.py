"""A row's sequence split across processes (row groups, experiment/feeding.py), in CI: the paper's layout,
the ring across 2 processes x 4 fake CPU devices (gloo, launched with only the SLURM variables), against
1 process x 8 devices with the same mesh sizes; its export converts with `to-hf` and passes `verify`;
and a member fed other data stops before any step trains. The other layouts, 4 processes, kills and
preemption are in test_split_rows_slow.py.

Tolerance (as test_multihost.py): the same SPMD program on meshes of the same sizes and the same global
batches; only the order of cross-device sums may differ (gloo between the processes, and the device
order of a hybrid DCN mesh). That moves float32 results by a few ulps; rtol 2e-6 allows that and
nothing else: another batch changes the loss in the 3rd digit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from af_next_jax.train.metrics import read_metrics
from split_rows_helpers import LAYOUTS, TIMEOUT, flags, launch, logs, run_one_process
from trainer_helpers import REPO, cpu_environment, wait_all

STEPS = 3
RTOL = 2e-6


@pytest.fixture(scope="module")
def ring_across_processes(demo_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("split_rows"))
    two, one = os.path.join(root, "two"), os.path.join(root, "one")
    split, single = LAYOUTS["ring_across_processes"]
    two_codes = wait_all(launch(two, root, "two", 2, 4, flags(demo_data, STEPS, *split)), TIMEOUT)
    one_codes = run_one_process(one, root, "one", flags(demo_data, STEPS, *single))
    return dict(root=root, two=two, one=one, two_codes=two_codes, one_codes=one_codes)


def test_the_ring_across_processes_gives_the_curve_of_one_process(ring_across_processes):
    runs = ring_across_processes
    assert runs["two_codes"] == [0, 0], logs(runs["root"], "two", 2)
    assert runs["one_codes"] == [0], logs(runs["root"], "one", 1)
    with open(os.path.join(runs["two"], "train.log")) as handle:
        log = handle.read()
    assert "1 row group(s)" in log and "group 0: processes 0, 1" in log
    two, one = read_metrics(runs["two"]), read_metrics(runs["one"])
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for name in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose([two[s][name] for s in two], [one[s][name] for s in two], rtol=RTOL, err_msg=name)


def test_the_checkpoint_holds_each_data_shard_once(ring_across_processes):
    import json

    with open(os.path.join(ring_across_processes["two"], "checkpoints", "2", "data", "metadata")) as handle:
        data = json.load(handle)
    assert data["processes"] == 2 and len(data["iterators"]) == 1  # the group's positions, saved once
    assert sorted(json.loads(data["iterators"][0])["shards"]) == ["0", "1"]


def test_the_export_of_the_split_row_run_converts_and_passes_verify(ring_across_processes, demo_data, tmp_path):
    export, hf = os.path.join(ring_across_processes["two"], "export"), str(tmp_path / "hf")
    for command in (["to-hf", "--checkpoint", export, "--out", hf, "--tokenizer-dir", demo_data, "--dtype", "float32"],
                    ["verify", "--hf-dir", hf, "--checkpoint", export]):
        result = subprocess.run([sys.executable, "-m", "af_next_jax.convert", *command], cwd=REPO,
                                env=cpu_environment(1), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_a_group_member_fed_other_data_stops_before_training(demo_data, tmp_path):
    root = str(tmp_path)
    split, _ = LAYOUTS["ring_across_processes"]
    codes = wait_all(launch(os.path.join(root, "run"), root, "mismatch", 2, 4, flags(demo_data, STEPS, *split),
                            per_process={1: ["--config.data.seed=1"]}), TIMEOUT)
    output = logs(root, "mismatch", 2)
    assert codes == [2, 2], output
    assert "row group 0 (processes [0, 1]) built different batches for step 1" in output
    assert not os.path.exists(os.path.join(root, "run", "metrics.jsonl")) or \
        not read_metrics(os.path.join(root, "run")), "a step was trained on mismatched data"
