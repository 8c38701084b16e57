"""`to-hf --checkpoint WORKDIR [--step N]` and `verify` on a training workdir: a tiny run of the debug
experiment (2 steps, a checkpoint every step, final export) on 8 fake CPU devices with its parameters
FSDP-sharded 8 ways, then exported from its final export and from a saved training step; the saved step
is exported in a process with one device, so the restore cannot lean on the mesh that saved it."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from af_next_jax.config import tiny
from af_next_jax.convert import orbax_io
from af_next_jax.convert.mapping import tensors_from_params
from af_next_jax.model.synthetic import synthetic_batch
from af_next_jax.experiment import load_config
from af_next_jax.train.loop import train
from conftest import read_tensors, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS, SEQ_LEN, WINDOWS, STEPS = 8, 128, 8, 2


class SyntheticBatches:
    """Stand-in for the data pipeline: valid random [ROWS, SEQ_LEN] batches (half the rows with audio)."""

    def __init__(self):
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.index += 1
        return synthetic_batch(tiny(), audio_frames_per_example=[[200], []] * (ROWS // 2), seq_len=SEQ_LEN,
                               num_windows=WINDOWS, seed=self.index)

    def get_state(self) -> bytes:
        return str(self.index).encode()

    def set_state(self, state: bytes) -> None:
        self.index = int(state)

    def metrics(self) -> dict:
        return {"data/skipped": 0.0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
    config = load_config(os.path.join(REPO, "experiments", "debug.py"), [
        f"--config.data.batch_size={ROWS}", f"--config.data.seq_len={SEQ_LEN}",
        f"--config.data.max_windows_per_batch={WINDOWS}", f"--config.total_steps={STEPS}", "--config.eval_every=0",
        "--config.checkpoint_every=1", f"--config.keep_checkpoints={STEPS}", "--config.async_checkpointing=False",
        "--config.loss_chunk_length=64", "--config.peak_flops_per_device=1e11"])
    assert config.mesh.fsdp == -1  # the debug mesh: FSDP over every device, so parameters are sharded 8 ways
    path = tmp_path_factory.mktemp("run") / "workdir"
    assert train(config, str(path), batches=SyntheticBatches()).status == "finished"
    return path


def saved_step_params(workdir, step: int) -> dict:
    """The step's parameters restored the trainer's way (orbax, onto this process's 8 devices)."""
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return jax.tree.map(np.asarray, state["params"])


def test_final_export_of_a_workdir_converts_and_verifies(workdir, tmp_path, capsys):
    assert run_cli("to-hf", "--checkpoint", workdir, "--out", tmp_path / "hf", "--quiet") == 0
    out = capsys.readouterr().out
    assert "final export" in out
    # Injected batches: the run had no tokenizer, so to-hf says why it wrote no processor files.
    assert "no tokenizer found" in out and not (tmp_path / "hf" / "preprocessor_config.json").exists()
    config = orbax_io.load_config(workdir / "export")
    expected = dict(tensors_from_params(orbax_io.load_params(workdir / "export"), config))
    exported = read_tensors(tmp_path / "hf")
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert run_cli("verify", "--hf-dir", tmp_path / "hf", "--checkpoint", workdir) == 0, capsys.readouterr()


def test_saved_step_exports_in_a_one_device_process_and_verifies(workdir, tmp_path, capsys):
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}  # one CPU device
    result = subprocess.run([sys.executable, "-m", "af_next_jax.convert", "to-hf", "--checkpoint", str(workdir),
                             "--step", "1", "--out", str(tmp_path / "hf"), "--quiet"],
                            env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training step 1" in result.stdout
    config = orbax_io.load_config(workdir / "export")
    expected = dict(tensors_from_params(saved_step_params(workdir, 1), config))
    final = dict(tensors_from_params(orbax_io.load_params(workdir / "export"), config))
    exported = read_tensors(tmp_path / "hf")
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    # The control: step 1 is not the end of the run, so the test can tell the two apart.
    assert any(not np.array_equal(final[key], value) for key, value in expected.items())
    assert run_cli("verify", "--hf-dir", tmp_path / "hf", "--checkpoint", workdir, "--step", 1) == 0, \
        capsys.readouterr()


def test_missing_step_is_refused_with_the_saved_steps_listed(workdir, tmp_path, capsys):
    steps = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    assert steps == list(range(1, STEPS + 1))
    assert run_cli("to-hf", "--checkpoint", workdir, "--step", 99, "--out", tmp_path / "hf", "--quiet") == 2
    error = capsys.readouterr().err
    assert "--step 99" in error and f"Saved steps: {', '.join(map(str, steps))}." in error
    assert not (tmp_path / "hf").exists()


def test_unfinished_workdir_without_step_is_refused_with_the_saved_steps_listed(workdir, tmp_path, capsys):
    """No final export (a stopped or preempted run): we do not guess a step, we list them."""
    unfinished = tmp_path / "unfinished"
    shutil.copytree(workdir, unfinished, ignore=lambda folder, names: ["export"] if folder == str(workdir) else [])
    assert run_cli("to-hf", "--checkpoint", unfinished, "--out", tmp_path / "hf", "--quiet") == 2
    error = capsys.readouterr().err
    assert "no final export" in error and "--step N" in error and "Saved steps: 1, 2." in error
    assert not (tmp_path / "hf").exists()


def test_step_of_a_converted_checkpoint_is_refused(workdir, tmp_path, capsys):
    assert run_cli("to-hf", "--checkpoint", workdir / "export", "--step", 1, "--out", tmp_path / "hf", "--quiet") == 2
    assert "not a training workdir" in capsys.readouterr().err


def test_a_step_folder_given_as_checkpoint_is_refused_with_the_command_to_use(workdir, tmp_path, capsys):
    step_folder = workdir / "checkpoints" / "1"
    assert run_cli("to-hf", "--checkpoint", step_folder, "--out", tmp_path / "hf", "--quiet") == 2
    assert f"--checkpoint {workdir} --step 1" in capsys.readouterr().err
