"""The trainer on two processes (2 x 4 fake CPU devices, gloo, 127.0.0.1) against one process x 8.

Both runs use the debug experiment on the demo data with `--config.data.shards=2`, so they read the
same global batches (host_data.py): process p of the two-process run reads shard p, the single
process reads both. The two-process run is launched the way `srun` launches it: only the SLURM
environment variables, no flags (jax's SLURM detection finds the coordinator and the ranks).

Tolerance: the two runs execute the same SPMD program on the same 8-device mesh with the same
inputs; only the cross-device reductions differ (gloo between the processes instead of the
in-process all-reduce), which may sum in another order. That moves a float32 result by a few ulps:
measured 1 ulp (4.8e-7 at loss 6.9) on the loss and 0 on the grad norm. rtol 2e-6 (~4 ulps) allows
that and nothing else: a wrong batch (another shard or order) changes the loss in the 3rd digit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from af_next_jax.train.metrics import read_metrics
from trainer_helpers import (cpu_environment, free_port, read_log, slurm_environment, start_processes,
                             train_command, wait_all)

STEPS = 3
RTOL = 2e-6
TIMEOUT = 600


def overrides(demo_data: str, total_steps: int = STEPS, *extra: str) -> list[str]:
    """The debug experiment with a global batch of 8 rows (one per device) in 2 data shards."""
    return [f"--config.data.dir={demo_data}", f"--config.total_steps={total_steps}", "--config.data.batch_size=8",
            "--config.data.max_windows_per_batch=8", "--config.data.shards=2", "--config.checkpoint_every=2",
            "--config.eval_every=0", "--config.log_every=1", *extra]


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("multihost"))
    two, one = os.path.join(root, "two_processes"), os.path.join(root, "one_process")
    port = free_port(61440, 65535)
    # Two processes, launched by SLURM's variables alone.
    two_processes = start_processes(
        [(train_command(two, overrides(demo_data)), cpu_environment(4, **slurm_environment(rank, 2, port)))
         for rank in (0, 1)], root, "two")
    two_codes = wait_all(two_processes, TIMEOUT)
    # One process with 8 devices, peak FLOPs measured (the start-up that used to crash).
    one_process = start_processes([(train_command(one, overrides(demo_data)), cpu_environment(8))], root, "one")
    one_codes = wait_all(one_process, TIMEOUT)
    return dict(root=root, two=two, one=one, two_codes=two_codes, one_codes=one_codes,
                two_logs=[read_log(root, "two", rank) for rank in (0, 1)], one_log=read_log(root, "one", 0))


def test_slurm_variables_alone_connect_both_processes(runs):
    assert runs["two_codes"] == [0, 0], "\n\n".join(log[-3000:] for log in runs["two_logs"])
    # Each process logs to its own file (process 1's console shows warnings and errors only).
    assert sorted(name for name in os.listdir(runs["two"]) if name.startswith("train")) == [
        "train.log", "train.process_1.log"]
    for rank, name in enumerate(("train.log", "train.process_1.log")):
        with open(os.path.join(runs["two"], name)) as handle:
            log = handle.read()
        assert "slurm cluster detected, coordinator 127.0.0.1:" in log
        assert f"process {rank} of 2, 4 local devices" in log and "8 global devices" in log
    assert "step 3/3" in runs["two_logs"][0] and "step 3/3" not in runs["two_logs"][1]
    with open(os.path.join(runs["two"], "metrics.jsonl")) as handle:
        assert len(handle.readlines()) == STEPS  # one writer: process 0
    with open(os.path.join(runs["two"], "config.json")) as handle:
        resolved = json.load(handle)
    assert resolved["processes"] == 2 and resolved["devices"] == 8 and resolved["data_shards"] == 2


def test_one_process_with_eight_devices_starts_with_a_measured_peak(runs):
    assert runs["one_codes"] == [0], runs["one_log"][-3000:]
    assert "measured matmul (cpu)" in runs["one_log"]


def test_two_processes_give_the_loss_and_grad_norm_of_one_process(runs):
    two, one = read_metrics(runs["two"]), read_metrics(runs["one"])
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    for name in ("loss", "grad_norm", "accuracy", "tokens"):
        np.testing.assert_allclose([two[s][name] for s in two], [one[s][name] for s in two], rtol=RTOL, err_msg=name)


def test_every_process_saves_its_data_position_and_they_equal_the_single_process_shards(runs):
    """The 2-process checkpoint holds both processes' iterator states; shard by shard they equal the
    positions of the single process that read both shards (so either run can resume the other)."""

    def shard_positions(workdir, step):
        with open(os.path.join(workdir, "checkpoints", str(step), "data", "metadata")) as handle:
            data = json.load(handle)
        positions = {}
        for state in data["iterators"]:
            positions.update(json.loads(state)["shards"])
        return data["processes"], positions

    processes, two = shard_positions(runs["two"], STEPS)
    assert processes == 2 and sorted(two) == ["0", "1"]
    processes, one = shard_positions(runs["one"], STEPS)
    assert processes == 1 and one == two


def test_the_two_process_export_holds_the_trained_parameters(runs):
    import jax

    from af_next_jax.convert.orbax_io import load_config, load_params

    two, one = load_params(os.path.join(runs["two"], "export")), load_params(os.path.join(runs["one"], "export"))
    assert load_config(os.path.join(runs["two"], "export")) == load_config(os.path.join(runs["one"], "export"))
    assert jax.tree.structure(two) == jax.tree.structure(one)
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
