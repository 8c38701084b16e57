"""A full disk during a checkpoint save, the export or `convert to-hf` (af_next_jax/disk_space.py, issue 26).

Each write that runs out of space removes its partial output, keeps every complete step and export,
and stops with one line saying how much it needed where (exit status 2 from the commands); the same
command run after freeing space resumes from the last complete step with the uninterrupted curve (the
session's lone debug run, tests/conftest.py: `debug_run`).

The real full disk is a tmpfs of a few MB (tests/small_disk.py: skipped where mounting is not
permitted); an injected twin of each in-process case raises what orbax raises (a RESOURCE_EXHAUSTED
ValueError whose chain holds ENOSPC) so every CI runner covers the handling.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af_next_jax.config import tiny
from af_next_jax.convert import orbax_io
from af_next_jax.disk_space import DiskFull
from af_next_jax.train.checkpointing import Checkpointer
from af_next_jax.train.metrics import read_metrics
from debug_run import TOTAL_STEPS, environment, train_command
from small_disk import resize, small_disk
from trainer_helpers import REPO

TIMEOUT = 300
ORBAX_DISK_FULL = "RESOURCE_EXHAUSTED: Error writing \"a/0\": Failed writing: No space left on device [os_error_code='28']"


def _orbax_disk_full() -> ValueError:
    """What orbax's tensorstore writes raise on a full disk: a ValueError carrying the OS error."""
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as cause:
            raise ValueError(ORBAX_DISK_FULL) from cause
    except ValueError as error:
        return error


def _random(count: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (count,))  # incompressible, unlike zeros


def _tmp_folders(directory) -> list[str]:
    return [name for name in os.listdir(directory) if "tmp" in name or "partial" in name]


# ---------------------------------------------------------------- checkpoints, in process

def _assert_step_1_kept(directory, error: DiskFull) -> None:
    message = str(error)
    assert "\n" not in message
    assert f"no space left on the filesystem of {directory} to write checkpoint step 2" in message
    assert "it needs about 781.2 KiB per step" in message and "free there now" in message
    assert "the last complete checkpoint, step 1, is intact and a relaunch resumes from it" in message
    assert _tmp_folders(directory) == [] and sorted(os.listdir(directory)) == ["1"]
    reader = Checkpointer(str(directory), save_every=1, keep=3)
    step, state, _ = reader.restore_latest({"a": jax.ShapeDtypeStruct((100,), jnp.float32)})
    assert step == 1 and np.array_equal(np.asarray(state["a"]), np.arange(100, dtype=np.float32))
    reader.close()


def test_a_full_disk_during_an_asynchronous_save_stops_with_the_previous_step_intact(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    with small_disk(folder, "256k"):
        directory = folder / "checkpoints"
        checkpointer = Checkpointer(str(directory), save_every=1, keep=3)
        checkpointer.save(1, {"a": jnp.arange(100, dtype=jnp.float32)}, b"1")
        checkpointer.wait()
        checkpointer.save(2, {"a": _random(200_000)}, b"2")  # 800 KB: written in the background, fails there
        with pytest.raises(DiskFull) as full:
            checkpointer.close()  # where the background failure surfaces (or the next save)
        _assert_step_1_kept(directory, full.value)


def test_an_injected_disk_full_save_removes_the_partial_step_and_keeps_the_previous(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(str(directory), save_every=1, keep=3, async_save=False)
    checkpointer.save(1, {"a": jnp.arange(100, dtype=jnp.float32)}, b"1")

    def fail(step, **_):
        (directory / f"{step}.orbax-checkpoint-tmp").mkdir()  # what orbax leaves when a write fails
        (directory / f"{step}.orbax-checkpoint-tmp" / "half").write_bytes(b"x" * 1000)
        raise _orbax_disk_full()

    monkeypatch.setattr(checkpointer._manager, "save", fail)
    with pytest.raises(DiskFull) as full:
        checkpointer.save(2, {"a": _random(200_000)}, b"2")
    _assert_step_1_kept(directory, full.value)


def test_other_save_errors_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=3, async_save=False)
    monkeypatch.setattr(checkpointer._manager, "save", lambda step, **_: (_ for _ in ()).throw(
        ValueError("PERMISSION_DENIED: Error writing")))
    with pytest.raises(ValueError, match="PERMISSION_DENIED"):
        checkpointer.save(1, {"a": jnp.zeros(3)}, b"1")


# ---------------------------------------------------------------- the export, in process

def _export(out, seed: int, count: int):
    return orbax_io.export_checkpoint(out, {"params": {"w": _random(count, seed)}}, tiny(), {"test": True})


def _assert_previous_export_kept(out, error: DiskFull) -> None:
    message = str(error)
    assert "\n" not in message
    assert f"no space left on the filesystem of {out.parent} to write the export {out}: it needs about 781.2 KiB" \
           in message
    assert "the previous export/ is intact" in message
    assert sorted(os.listdir(out.parent)) == ["export"]  # no partial export left
    assert np.array_equal(orbax_io.load_params(out)["params"]["w"], np.asarray(_random(1000, seed=1)))


def test_a_full_disk_during_the_export_keeps_the_previous_export(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    with small_disk(folder, "512k"):
        out = folder / "export"
        _export(out, seed=1, count=1000)
        with pytest.raises(DiskFull) as full:
            _export(out, seed=2, count=200_000)
        _assert_previous_export_kept(out, full.value)


def test_an_injected_disk_full_export_keeps_the_previous_export(tmp_path, monkeypatch):
    out = tmp_path / "export"
    _export(out, seed=1, count=1000)

    def fail(directory, params):
        (directory / "params").mkdir()
        raise _orbax_disk_full()

    monkeypatch.setattr(orbax_io, "_save_params", fail)
    with pytest.raises(DiskFull) as full:
        _export(out, seed=2, count=200_000)
    _assert_previous_export_kept(out, full.value)


def test_an_injected_disk_full_conversion_removes_its_partial_output(tmp_path):
    out = tmp_path / "hf"
    with pytest.raises(DiskFull) as full:
        with orbax_io.atomic_directory(out) as staging:
            (staging / "model-00001.safetensors").write_bytes(b"x" * 4096)
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                               "message: \"No space left on device\" })")  # what safetensors raises
    assert f"to write hf: it needs more than the 4.0 KiB written before the disk filled" in str(full.value)
    assert f"nothing was written to {out}" in str(full.value)
    assert os.listdir(tmp_path) == []  # neither the partial output nor the hold


# ---------------------------------------------------------------- the trainer and to-hf, as users run them

def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _train(workdir, debug_run, *extra):
    return subprocess.run(train_command(str(workdir), debug_run["demo_data"]) + list(extra), cwd=REPO,
                          env=environment(debug_run["cache_dir"]), capture_output=True, text=True, timeout=TIMEOUT)


def test_a_trainer_stopped_by_a_full_disk_resumes_to_the_uninterrupted_curve(debug_run, tmp_path):
    """One checkpoint (~3.5 MB) fits on the 6 MB disk, the second does not. Saves are synchronous here so
    the save itself meets the full disk (asynchronously, the next write of any kind may: see
    test_a_full_disk_during_an_asynchronous_save_...)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    with small_disk(folder, "6m"):
        workdir = folder / "run"
        stopped = _train(workdir, debug_run, "--config.async_checkpointing=False")
        assert stopped.returncode == 2, stopped.stderr[-3000:]
        (error,) = _errors(stopped.stderr)
        assert f"to write checkpoint step 6: it needs about" in error and "MiB per step" in error
        assert "the last complete checkpoint, step 3, is intact" in error
        assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]
        resize(folder, "64m")
        resumed = _train(workdir, debug_run, "--config.async_checkpointing=False")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        curve, uninterrupted = read_metrics(str(workdir)), read_metrics(debug_run["workdir"])
        assert sorted(curve) == list(range(1, TOTAL_STEPS + 1))
        assert [curve[s]["loss"] for s in curve] == [uninterrupted[s]["loss"] for s in curve]


def test_a_trainer_whose_export_meets_a_full_disk_exports_when_run_again(debug_run, tmp_path):
    """A finished run's last checkpoint (3.5 MB) on a 4 MB disk: the export (1.7 MB) does not fit."""
    folder = tmp_path / "disk"
    folder.mkdir()
    with small_disk(folder, "4m"):
        workdir = folder / "run"
        (workdir / "checkpoints").mkdir(parents=True)
        shutil.copy(os.path.join(debug_run["workdir"], "config.json"), workdir)
        shutil.copytree(os.path.join(debug_run["workdir"], "checkpoints", str(TOTAL_STEPS)),
                        workdir / "checkpoints" / str(TOTAL_STEPS))
        stopped = _train(workdir, debug_run)
        assert stopped.returncode == 2, stopped.stderr[-3000:]
        (error,) = _errors(stopped.stderr)
        assert f"to write the export {workdir / 'export'}: it needs about" in error
        assert "The partial export was removed and no export/ was written" in error
        assert not [name for name in os.listdir(workdir) if "export" in name]
        resize(folder, "64m")
        again = _train(workdir, debug_run)
        assert again.returncode == 0, again.stderr[-3000:]
        exported = orbax_io.load_params(workdir / "export")
        alone = orbax_io.load_params(os.path.join(debug_run["workdir"], "export"))
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(alone)))


def test_to_hf_on_a_full_disk_exits_2_and_leaves_nothing(debug_run, tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    with small_disk(folder, "512k"):
        result = subprocess.run(
            [sys.executable, "-m", "af_next_jax.convert", "to-hf", "--checkpoint", debug_run["workdir"], "--out",
             str(folder / "hf")], cwd=REPO, env=environment(debug_run["cache_dir"]), capture_output=True, text=True,
            timeout=TIMEOUT)
        assert result.returncode == 2, result.stderr[-3000:]
        (error,) = _errors(result.stderr)
        assert f"no space left on the filesystem of {folder} to write hf: it needs more than" in error
        assert os.listdir(folder) == []
