"""experiment/feeding.py: which processes form a row group (the same rows, so the same host batch), on
device-to-process layouts written out by hand, and the real v5p-64 topology of the long-context stage."""

import numpy as np
import pytest

from af_next_jax.experiment.feeding import feeding_plan
from af_next_jax.experiment.settings import ExperimentError

AXES = ("data", "fsdp", "ring", "ulysses", "tensor")
ROWS, WINDOWS = ("data", "fsdp"), ("data", "fsdp", "ring", "ulysses")


def _plan(shape: dict, processes, batch_size=8, windows=16):
    mesh_shape = {axis: shape.get(axis, 1) for axis in AXES}
    devices = np.asarray(processes).reshape(tuple(mesh_shape[a] for a in AXES))
    return feeding_plan(devices, mesh_shape, AXES, ROWS, WINDOWS, batch_size, windows)


def test_whole_rows_per_process_are_groups_of_one():
    plan = _plan({"fsdp": 4, "ring": 2}, [0, 0, 1, 1, 2, 2, 3, 3])
    assert [group.processes for group in plan.groups] == [(0,), (1,), (2,), (3,)]
    assert [group.rows for group in plan.groups] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [group.windows for group in plan.groups] == [tuple(range(4 * g, 4 * g + 4)) for g in range(4)]


def test_a_ring_across_processes_puts_them_in_one_group():
    """The paper's layout: ring across nodes (dcn_ring), Ulysses inside; each row on both processes."""
    plan = _plan({"ring": 2, "ulysses": 4}, [0, 0, 0, 0, 1, 1, 1, 1])
    assert [group.processes for group in plan.groups] == [(0, 1)]
    assert plan.groups[0].rows == tuple(range(8)) and plan.groups[0].windows == tuple(range(16))


def test_four_processes_of_two_devices_form_two_groups_of_two():
    plan = _plan({"fsdp": 2, "ring": 2, "ulysses": 2}, [0, 0, 1, 1, 2, 2, 3, 3])
    assert [group.processes for group in plan.groups] == [(0, 1), (2, 3)]
    assert [group.rows for group in plan.groups] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert plan.group_of(3).index == 1 and plan.num_groups == 2


def test_processes_holding_overlapping_rows_cannot_be_fed():
    # Process 1 holds rows of both halves, each shared with another process: no group can be formed.
    with pytest.raises(ExperimentError, match="overlapping but different rows"):
        _plan({"fsdp": 2, "ring": 2}, [0, 1, 1, 2])


def test_a_process_may_hold_rows_that_are_not_one_block():
    """A TPU mesh follows the torus: a host's chips can hold rows 0, 1, 4, 5. Its windows are those rows' slots."""
    plan = _plan({"fsdp": 8}, [0, 0, 1, 1, 0, 0, 1, 1])
    assert [group.rows for group in plan.groups] == [(0, 1, 4, 5), (2, 3, 6, 7)]
    assert plan.groups[0].windows == (0, 1, 2, 3, 8, 9, 10, 11)
    assert plan.groups[1].local_start("rows", 6) == 2 and plan.groups[1].local_start("windows", 12) == 4


def test_v5p_64_long_context_is_one_group_of_eight_hosts():
    from af_next_jax.compile.steps import compile_tool_program
    from af_next_jax.compile.topology import parse_topology, topology_devices
    from af_next_jax.experiment import load_config

    config = load_config("experiments/af_next_stage4_long_context.py")
    try:
        devices = topology_devices(parse_topology(config.target_topology))
    except RuntimeError as error:
        pytest.skip(f"libtpu cannot build {config.target_topology} here ({error})")
    plan = compile_tool_program(config, devices).feeding
    assert [group.processes for group in plan.groups] == [tuple(range(8))]
    assert "processes 0-7" in plan.describe()
