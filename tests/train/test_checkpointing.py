"""Checkpointer: what a restore may and may not do to the checkpoints on disk.

Three failures are told apart (checkpointing.py): an unreadable step (truncated file) is set aside
and the previous step used; a step of another experiment (changed width, changed stage) stops the
run naming the differing leaves; an I/O failure (a read-only or unreadable directory) is retried,
then stops. After each, the test asserts what is left on disk. Plus: retention (`keep`) and a
restore onto another device count.
"""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from af_next_jax.config import tiny
from af_next_jax.experiment import build_program, experiment_from, load_config
from af_next_jax.train.checkpointing import (IO_FAILED, UNREADABLE, Checkpointer, CheckpointIOError,
                                             CheckpointMismatchError, classify_error)
from trainer_helpers import REPO


def _state(value: float, sharding=None) -> dict:
    params = jnp.full((8, 4), value, jnp.float32)
    if sharding is not None:
        params = jax.device_put(params, sharding)
    return {"params": params, "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(sharding) -> dict:
    return {"params": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(sharding.mesh, P()))}


def _single_device_sharding():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    return NamedSharding(mesh, P("fsdp"))


def _disk(root) -> dict[str, int]:
    """{relative path: size} of every file under `root`: what a restore must (not) change."""
    listing = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            listing[os.path.relpath(path, root)] = os.path.getsize(path)
    return listing


def _save_steps(directory, steps, make_state, keep: int = 5) -> None:
    checkpointer = Checkpointer(str(directory), save_every=1, keep=keep, async_save=False)
    for step in steps:
        assert checkpointer.save(step, make_state(step), f'{{"position": {step}}}'.encode())
    checkpointer.close()


def _truncate_state_files(step_dir) -> None:
    """Truncate every file of a step's state (a disk that filled up mid-write)."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            with open(os.path.join(root, name), "r+b") as handle:
                handle.truncate(3)


# ------------------------------------------------------------------ the trainer's own state trees

def _trainer_abstract_state(debug_config, *, stage: str = "full", intermediate_size: int | None = None) -> dict:
    """The abstract TrainState (tree, shapes, shardings) the trainer restores into, for a tiny model on
    one device (its Program: af_next_jax/experiment/program.py)."""
    overrides = [f"--config.stage={stage}", "--config.total_steps=10", "--config.data.seq_len=32",
                 "--config.data.batch_size=2", "--config.data.max_windows_per_batch=2", "--config.mesh.fsdp=1"]
    config = load_config(os.path.join(REPO, "experiments", "debug.py"), overrides)
    if intermediate_size is not None:
        config.model.decoder = {"intermediate_size": intermediate_size}
    return build_program(experiment_from(config), jax.devices()[:1]).abstract_state().to_dict()


def _zeros_like(abstract: dict) -> dict:
    return jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract)


@pytest.fixture(scope="module")
def full_stage_run(tmp_path_factory, debug_config):
    """Checkpoints of steps 1 and 2 of the tiny model, stage `full`, and the on-disk listing."""
    directory = tmp_path_factory.mktemp("full_stage") / "checkpoints"
    abstract = _trainer_abstract_state(debug_config)
    _save_steps(directory, (1, 2), lambda step: _zeros_like(abstract))
    return directory, _disk(directory.parent)


def test_a_changed_model_width_stops_naming_the_leaves_and_moves_nothing(full_stage_run, debug_config):
    directory, before = full_stage_run
    wider = _trainer_abstract_state(debug_config, intermediate_size=2 * tiny().decoder.intermediate_size)
    with pytest.raises(CheckpointMismatchError) as error:
        Checkpointer(str(directory), save_every=1, keep=5).restore_latest(wider)
    message = str(error.value)
    narrow, wide = tiny().decoder.intermediate_size, 2 * tiny().decoder.intermediate_size
    assert "params/params/decoder/layers/gate_proj/kernel: checkpoint" in message
    assert f"{narrow}) float32, this experiment" in message and f"{wide}) float32" in message
    assert "--workdir" in message and "init_from" in message and "Nothing was moved" in message
    assert _disk(directory.parent) == before  # every checkpoint in place, no corrupt_checkpoints/


def test_a_changed_stage_stops_naming_the_optimizer_leaves_and_moves_nothing(full_stage_run, debug_config):
    """Stage `projector` keeps no optimizer state for the decoder: another optimizer-state tree."""
    directory, before = full_stage_run
    projector_stage = _trainer_abstract_state(debug_config, stage="projector")
    with pytest.raises(CheckpointMismatchError) as error:
        Checkpointer(str(directory), save_every=1, keep=5).restore_latest(projector_stage)
    assert "opt_state/1/inner_states/decoder/" in str(error.value)
    assert "in the checkpoint, absent from this experiment" in str(error.value)
    assert _disk(directory.parent) == before


def test_the_same_experiment_restores_the_newest_step(full_stage_run, debug_config):
    directory, before = full_stage_run
    step, state, data_states = Checkpointer(str(directory), save_every=1, keep=5).restore_latest(
        _trainer_abstract_state(debug_config))
    assert step == 2 and data_states == [b'{"position": 2}'] and int(state["step"]) == 0
    assert _disk(directory.parent) == before


def test_a_truncated_latest_step_is_set_aside_with_a_warning_and_the_previous_restored(tmp_path, caplog):
    sharding = _single_device_sharding()
    directory = tmp_path / "checkpoints"
    _save_steps(directory, (1, 2), lambda step: _state(step, sharding))
    step_one = _disk(directory / "1")
    _truncate_state_files(directory / "2")
    checkpointer = Checkpointer(str(directory), save_every=1, keep=3, async_save=False)
    with caplog.at_level(logging.WARNING):
        step, state, data_states = checkpointer.restore_latest(_abstract(sharding))
    assert step == 1 and int(state["step"]) == 1 and data_states == [b'{"position": 1}']
    np.testing.assert_array_equal(state["params"], 1.0)
    assert "checkpoint step 2" in caplog.text and "unreadable" in caplog.text
    # On disk: step 2 moved aside (for inspection), step 1 untouched, nothing else.
    assert sorted(os.listdir(directory)) == ["1"]
    assert os.listdir(tmp_path / "corrupt_checkpoints") == ["2-0"]
    assert _disk(directory / "1") == step_one
    # Training continues: step 2 can be written again.
    assert checkpointer.save(2, _state(2, sharding), b"{}", force=True)
    checkpointer.close()


# A restore in a child process that cannot override file permissions (root normally can), so a
# read-only or unreadable directory behaves as it does for every other user.
_READ_ONLY_SCENARIO = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from af_next_jax.train.checkpointing import Checkpointer
mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("fsdp",))
abstract = {"params": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))}
try:
    step, state, data = Checkpointer(sys.argv[1], save_every=1, keep=5, io_retries=2,
                                     retry_seconds=0.01).restore_latest(abstract)
    print(json.dumps({"step": step, "value": float(state["params"][0, 0])}))
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
"""


# Run as root, the child first drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its bounding set
# (prctl PR_CAPBSET_DROP = 24), then execs the scenario: file modes then apply to it as to any user.
_WITHOUT_PERMISSION_OVERRIDE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for capability in (1, 2):
    if libc.prctl(24, capability, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
"""


def _restore_without_permission_override(directory) -> tuple[dict, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    command = [sys.executable, "-c", _READ_ONLY_SCENARIO, str(directory)]
    if os.geteuid() == 0:
        command = [sys.executable, "-c", _WITHOUT_PERMISSION_OVERRIDE] + command[1:]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def _chmod_tree(root, directory_mode: int, file_mode: int) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(folder, name), file_mode)
        os.chmod(folder, directory_mode)


def test_read_only_directory_restores_without_writing_and_unreadable_files_stop_after_retries(tmp_path):
    sharding = _single_device_sharding()
    workdir = tmp_path / "workdir"
    _save_steps(workdir / "checkpoints", (1, 2), lambda step: _state(step, sharding))
    _chmod_tree(workdir, 0o555, 0o444)
    try:
        # A read-only workdir (a finished run on a shared mount): the newest step restores, nothing changes.
        before = _disk(workdir)
        result, _ = _restore_without_permission_override(workdir / "checkpoints")
        assert result == {"step": 2, "value": 2.0}
        assert _disk(workdir) == before
        # Unreadable array files (tensorstore: PERMISSION_DENIED): an I/O failure, retried, then a stop.
        for folder, _, files in os.walk(workdir / "checkpoints" / "2" / "state"):
            for name in files:
                if name != "_METADATA":
                    os.chmod(os.path.join(folder, name), 0o000)
        result, log = _restore_without_permission_override(workdir / "checkpoints")
        assert result["error"] == "CheckpointIOError", result
        assert "Nothing was moved" in result["message"] and "step 2" in result["message"]
        assert log.count("retrying") == 2
        assert _disk(workdir) == before and not os.path.exists(workdir / "corrupt_checkpoints")
        # A truncated step in a read-only workdir cannot be set aside: stop, explain, move nothing.
        _chmod_tree(workdir, 0o755, 0o644)
        _truncate_state_files(workdir / "checkpoints" / "2")
        truncated = _disk(workdir)
        _chmod_tree(workdir, 0o555, 0o444)
        result, _ = _restore_without_permission_override(workdir / "checkpoints")
        assert result["error"] == "CheckpointIOError" and "unreadable" in result["message"], result
        assert "move" in result["message"] and "by hand" in result["message"]
        assert _disk(workdir) == truncated
    finally:
        _chmod_tree(workdir, 0o755, 0o644)


def test_errors_are_classified_by_what_they_prove():
    import errno

    assert classify_error(ValueError('DATA_LOSS: Error reading "params/.zarray": CRC-32C checksum failed')) == \
        UNREADABLE
    assert classify_error(ValueError("OUT_OF_RANGE: Requested byte range [0, 286) is not valid")) == UNREADABLE
    assert classify_error(json.JSONDecodeError("Unterminated string", "{", 1)) == UNREADABLE
    assert classify_error(FileNotFoundError(errno.ENOENT, "missing")) == UNREADABLE
    assert classify_error(ValueError("PERMISSION_DENIED: Error opening file")) == IO_FAILED
    assert classify_error(OSError(errno.EIO, "Input/output error")) == IO_FAILED
    assert classify_error(OSError(errno.ESTALE, "Stale file handle")) == IO_FAILED
    # Anything else is not a checkpoint problem: it propagates, nothing is moved.
    assert classify_error(TypeError("unsupported operand")) not in (UNREADABLE, IO_FAILED)
    assert classify_error(ValueError("some other bug")) not in (UNREADABLE, IO_FAILED)


def test_a_transient_io_error_is_retried_then_the_step_restores(tmp_path, monkeypatch, caplog):
    sharding = _single_device_sharding()
    directory = tmp_path / "checkpoints"
    _save_steps(directory, (1, 2), lambda step: _state(step, sharding))
    before = _disk(tmp_path)
    checkpointer = Checkpointer(str(directory), save_every=1, keep=5, retry_seconds=0.01)
    real_restore, failures = checkpointer._manager.restore, []

    def flaky_restore(*args, **kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise OSError(5, "Input/output error")
        return real_restore(*args, **kwargs)

    monkeypatch.setattr(checkpointer._manager, "restore", flaky_restore)
    with caplog.at_level(logging.WARNING):
        step, state, _ = checkpointer.restore_latest(_abstract(sharding))
    assert step == 2 and int(state["step"]) == 2 and len(failures) == 2
    assert caplog.text.count("retrying") == 2
    assert _disk(tmp_path) == before


def test_retention_keeps_the_newest_keep_steps(tmp_path):
    sharding = _single_device_sharding()
    _save_steps(tmp_path / "checkpoints", (1, 2, 3, 4, 5), lambda step: _state(step, sharding), keep=2)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]


def test_checkpoint_saved_on_eight_devices_restores_onto_two(tmp_path):
    eight = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    two = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    saved = _state(3.0, NamedSharding(eight, P("fsdp")))
    saved["params"] = saved["params"] + jnp.arange(32, dtype=jnp.float32).reshape(8, 4)
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=2, async_save=True)
    checkpointer.save(3, saved, None)
    checkpointer.wait()
    target = NamedSharding(two, P("fsdp"))
    step, restored, data_states = checkpointer.restore_latest(_abstract(target))
    checkpointer.close()
    assert step == 3 and data_states == [None]
    assert restored["params"].sharding == target and len(restored["params"].addressable_shards) == 2
    np.testing.assert_array_equal(restored["params"], saved["params"])
