"""The pieces of a multi-process run that need no second process: how a launch is resolved from flags,
environment and cluster variables; how data shards split over processes and resume on another count;
the peak FLOPs of a mesh of several devices."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest

from af_next_jax.parallel import MeshConfig, make_mesh
from af_next_jax.train import launch
from af_next_jax.train.flops import peak_flops_per_device
from af_next_jax.train.host_data import (DataShardError, GroupDataMismatch, HostBatches, merged_positions,
                                         owned_shards, resolve_shard_count, saved_shard_count)
from trainer_helpers import slurm_environment

CLUSTER_VARIABLES = ("SLURM_", "OMPI_", "AF_NEXT_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                     "TPU_", "MEGASCALE_", "KUBERNETES_")


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(CLUSTER_VARIABLES):
            monkeypatch.delenv(name)
    return monkeypatch


# ------------------------------------------------------------------ launch

def test_no_flags_and_no_cluster_is_one_process(clean_env):
    assert launch.resolve() == launch.Launch("single")


def test_explicit_flags_and_their_environment_variables(clean_env):
    assert launch.resolve("10.0.0.1:1234", 4, 3) == launch.Launch("explicit", "10.0.0.1:1234", 4, 3)
    clean_env.setenv("AF_NEXT_COORDINATOR", "node0:999")
    clean_env.setenv("AF_NEXT_NUM_PROCESSES", "2")
    clean_env.setenv("AF_NEXT_PROCESS_ID", "1")
    assert launch.resolve() == launch.Launch("explicit", "node0:999", 2, 1)
    assert launch.resolve(process_id=0).process_id == 0  # a flag beats its variable


@pytest.mark.parametrize("arguments, message", [
    (("10.0.0.1:1234", 2, None), "missing \\['--process-id'\\]"),
    (("10.0.0.1", 2, 0), "HOST:PORT"),
    (("10.0.0.1:1234", 2, 2), "must lie in \\[0, 2\\)"),
])
def test_an_incomplete_explicit_launch_says_what_is_missing(clean_env, arguments, message):
    with pytest.raises(ValueError, match=message):
        launch.resolve(*arguments)


def test_srun_variables_alone_give_the_slurm_launch(clean_env):
    for name, value in slurm_environment(1, 2, port=61440 + 77).items():
        clean_env.setenv(name, value)
    resolved = launch.resolve()
    # jax's SLURM detection: first host of the node list, port 61440 + job id % 4096, ranks from srun.
    assert (resolved.cluster, resolved.coordinator, resolved.num_processes, resolved.process_id) == (
        "slurm", "127.0.0.1:61517", 2, 1)
    assert resolved.local_device_ids == (1,)  # two tasks on the node: one GPU each


def test_one_slurm_task_per_node_drives_all_the_node_gpus(clean_env):
    for name, value in slurm_environment(1, 2, port=61440 + 77).items():
        clean_env.setenv(name, value)
    clean_env.setenv("SLURM_STEP_NODELIST", "gpu[017-018]")
    clean_env.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x2)")
    clean_env.setenv("SLURM_NODEID", "1")
    clean_env.setenv("SLURM_LOCALID", "0")
    resolved = launch.resolve()
    assert resolved.coordinator == "gpu017:61517" and resolved.local_device_ids is None


def test_a_one_task_slurm_allocation_stays_a_single_process(clean_env):
    for name, value in slurm_environment(0, 1, port=61440 + 77).items():
        clean_env.setenv(name, value)
    resolved = launch.resolve()
    assert resolved.num_processes == 1 and not resolved.multiprocess


def test_open_mpi_variables_give_the_mpi_launch(clean_env):
    clean_env.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911")
    for name, value in dict(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="2", OMPI_COMM_WORLD_LOCAL_RANK="0",
                            OMPI_COMM_WORLD_LOCAL_SIZE="1").items():
        clean_env.setenv(name, value)
    resolved = launch.resolve()
    assert (resolved.cluster, resolved.num_processes, resolved.process_id) == ("ompi", 4, 2)
    assert resolved.coordinator.startswith("10.96.0.1:") and resolved.local_device_ids is None


# ------------------------------------------------------------------ data shards

def test_the_shard_count_is_the_row_group_count_at_first_start_then_the_saved_one():
    assert resolve_shard_count(0, 2, batch_size=8, max_windows=8) == 2
    assert resolve_shard_count(4, 2, batch_size=8, max_windows=8) == 4
    assert resolve_shard_count(0, 1, batch_size=8, max_windows=8, saved=4) == 4  # 4 shards -> 1 group
    assert resolve_shard_count(0, 2, batch_size=8, max_windows=8, saved=4) == 2 * 2
    assert list(owned_shards(4, 1, 2)) == [2, 3]


@pytest.mark.parametrize("arguments, message", [
    (dict(configured=0, groups=3, saved=2, saved_step=40), r"step 40 .* 2 data shards, which the 3 row groups "
                                                           r".* cannot split .* divides 2 \(\[1, 2\]\)"),
    (dict(configured=4, groups=2, saved=2), "config.data.shards=4, but the checkpoint read its data as 2"),
    (dict(configured=3, groups=2), "multiple of the 2 row groups"),
    (dict(configured=0, groups=4, batch_size=6), "batch_size=6 .* 4 data shards"),
])
def test_a_shard_count_that_would_change_the_data_order_is_refused(arguments, message):
    arguments = dict(dict(batch_size=8, max_windows=8), **arguments)
    with pytest.raises(DataShardError, match=message):
        resolve_shard_count(arguments.pop("configured"), arguments.pop("groups"), **arguments)


def test_group_members_positions_are_saved_once_and_must_agree():
    two = _hosts(2, 1) + _hosts(2, 1)  # two members of one group, reading both shards
    for host in two:
        next(host)
    merged = merged_positions([host.get_state() for host in two])
    assert len(merged) == 1 and sorted(json.loads(merged[0])["shards"]) == ["0", "1"]
    next(two[1])  # one member moves on alone: it no longer reads what the other reads
    with pytest.raises(GroupDataMismatch, match="processes 0 and 1 read data shard 0"):
        merged_positions([host.get_state() for host in two])


class _Counting:
    """A stand-in pipeline for one shard: batch i has rows `[shard, i]` and one window valued shard."""

    def __init__(self, shard: int):
        self.shard, self.index = shard, 0

    def __next__(self):
        batch = {"token_ids": np.array([[self.shard, self.index]]), "mel_valid_frames": np.array([self.shard])}
        self.index += 1
        return batch

    def get_state(self):
        return json.dumps({"index": self.index}).encode()

    def set_state(self, state):
        self.index = json.loads(state)["index"]

    def metrics(self):
        return {"data/skipped": 1.0, "data/examples": 3.0, "data/skip_fraction": 0.25}


def _hosts(num_shards: int, process_count: int) -> list[HostBatches]:
    return [HostBatches({s: _Counting(s) for s in owned_shards(num_shards, p, process_count)}, num_shards)
            for p in range(process_count)]


def test_two_processes_resume_on_one_and_one_on_two_with_the_same_global_batches():
    two = _hosts(2, 2)
    for _ in range(3):
        for host in two:
            next(host)
    states = [host.get_state() for host in two]  # what the checkpoint holds: one state per process
    assert saved_shard_count(states) == 2
    expected = np.concatenate([next(host)["token_ids"] for host in two])  # the next global batch
    one = _hosts(2, 1)[0]
    one.set_global_state(states)
    np.testing.assert_array_equal(next(one)["token_ids"], expected)
    # ... and back: one process's state (both shards) continues on two processes.
    back = _hosts(2, 2)
    for host in back:
        host.set_global_state([one.get_state()])
    np.testing.assert_array_equal(np.concatenate([next(host)["token_ids"] for host in back]), [[0, 4], [1, 4]])


def test_a_process_concatenates_its_shards_rows_then_windows_in_shard_order():
    host = _hosts(4, 2)[1]
    batch = next(host)
    np.testing.assert_array_equal(batch["token_ids"], [[2, 0], [3, 0]])
    np.testing.assert_array_equal(batch["mel_valid_frames"], [2, 3])
    assert host.metrics() == {"data/skipped": 2.0, "data/examples": 6.0, "data/skip_fraction": 0.25}


# ------------------------------------------------------------------ peak FLOPs

def test_peak_flops_of_a_mesh_of_eight_devices_is_measured_inside_the_mesh():
    """The start-up crash: measuring on device 0 inside an 8-device mesh context."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1))
    assert mesh.devices.size == 8
    with jax.set_mesh(mesh):
        flops, source = peak_flops_per_device(0.0, mesh.devices.flat)
    assert flops > 1e8 and source == "measured matmul (cpu)"


def test_peak_flops_come_from_the_mesh_devices_kind_most_specific_first():
    def devices(kind):
        return [types.SimpleNamespace(device_kind=kind, process_index=0)] * 8

    assert peak_flops_per_device(0.0, devices("NVIDIA H100 PCIe")) == (756e12, "table (NVIDIA H100 PCIe)")
    assert peak_flops_per_device(0.0, devices("NVIDIA H100 80GB HBM3"))[0] == 989e12
    assert peak_flops_per_device(0.0, devices("NVIDIA A100-SXM4-40GB"))[0] == 312e12
    assert peak_flops_per_device(0.0, devices("TPU v4"))[0] == 275e12
    assert peak_flops_per_device(5e12, devices("TPU v4")) == (5e12, "config")
