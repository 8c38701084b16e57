"""Bad input stops with a message naming the key / shape / model_type and leaves nothing behind."""

import functools
import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from af_next_jax.config import tiny
from af_next_jax.convert import hf_import, orbax_io
from af_next_jax.convert.hf_config import to_hf_config
from af_next_jax.convert.mapping import model_rules
from af_next_jax.convert.checks import expected_shapes
from conftest import run_cli

CONFIG = tiny()


def valid_tensors() -> dict[str, np.ndarray]:
    """A complete, correctly shaped random state dict for CONFIG, keyed as save_pretrained writes it."""
    return dict(_valid_tensors())


@functools.cache
def _valid_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = expected_shapes(CONFIG)
    tensors = {}
    for rule in model_rules(CONFIG):
        shape = shapes[rule.path][1:] if rule.num_layers else shapes[rule.path]
        for key in rule.hf_keys():
            tensors[key] = np.ascontiguousarray(rule.to_hf(rng.standard_normal(shape).astype(np.float32)))
    return tensors


def write_hf_dir(path, tensors, hf_config=None):
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config or to_hf_config(CONFIG)))
    return path


def assert_fails_cleanly(tmp_path, hf_dir, capsys, *expected_words):
    out = tmp_path / "ckpt"
    assert run_cli("from-hf", "--hf-dir", hf_dir, "--out", out, "--quiet") == 2
    error = capsys.readouterr().err
    for word in expected_words:
        assert word in error, error
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if "ckpt" in p.name], "a partial output was left behind"


def test_valid_input_converts(tmp_path):
    """The control for the cases below: the same directory, unmodified, converts."""
    hf_dir = write_hf_dir(tmp_path / "hf", valid_tensors())
    assert run_cli("from-hf", "--hf-dir", hf_dir, "--out", tmp_path / "ckpt", "--quiet") == 0


def test_missing_key_is_named(tmp_path, capsys):
    tensors = valid_tensors()
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    hf_dir = write_hf_dir(tmp_path / "hf", tensors)
    assert_fails_cleanly(tmp_path, hf_dir, capsys, "missing", "language_model.model.layers.1.mlp.up_proj.weight")


def test_unexpected_key_is_named(tmp_path, capsys):
    tensors = valid_tensors()
    tensors["audio_tower.layers.9.fc1.weight"] = np.zeros((4, 4), np.float32)
    hf_dir = write_hf_dir(tmp_path / "hf", tensors)
    assert_fails_cleanly(tmp_path, hf_dir, capsys, "unexpected", "audio_tower.layers.9.fc1.weight")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, capsys):
    tensors = valid_tensors()
    tensors["multi_modal_projector.linear_1.weight"] = np.zeros((64, 65), np.float32)
    hf_dir = write_hf_dir(tmp_path / "hf", tensors)
    assert_fails_cleanly(tmp_path, hf_dir, capsys, "multi_modal_projector.linear_1.weight", "[64, 65]", "[64, 64]")


def test_unknown_model_type_is_named(tmp_path, capsys):
    hf_dir = write_hf_dir(tmp_path / "hf", valid_tensors(), {**to_hf_config(CONFIG), "model_type": "llama"})
    assert_fails_cleanly(tmp_path, hf_dir, capsys, "'llama'", "musicflamingo")


def test_af_next_alias_imports_like_musicflamingo(tmp_path):
    """transformers' AF-Next class is a plain MusicFlamingo subclass: same weights, RoTE on."""
    hf_dir = write_hf_dir(tmp_path / "hf", valid_tensors(), {**to_hf_config(CONFIG), "model_type": "audioflamingonext"})
    assert run_cli("from-hf", "--hf-dir", hf_dir, "--out", tmp_path / "ckpt", "--quiet") == 0
    assert orbax_io.load_config(tmp_path / "ckpt").rote == CONFIG.rote


def test_index_naming_a_missing_shard_is_named(tmp_path, capsys):
    hf_dir = write_hf_dir(tmp_path / "hf", valid_tensors())
    weight_map = {key: "model-00001-of-00002.safetensors" for key in valid_tensors()}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_fails_cleanly(tmp_path, hf_dir, capsys, "model-00001-of-00002.safetensors", "does not exist")


def test_validation_reads_no_tensor_data(tmp_path, capsys, monkeypatch):
    """A bad shape in the last tensor is caught from the headers, before any tensor is loaded."""
    loaded = []
    monkeypatch.setattr(hf_import, "load_tensor", lambda handle, key: loaded.append(key))
    tensors = valid_tensors()
    tensors["language_model.lm_head.weight"] = np.zeros((3, 64), np.float32)
    hf_dir = write_hf_dir(tmp_path / "hf", tensors)
    assert_fails_cleanly(tmp_path, hf_dir, capsys, "language_model.lm_head.weight", "[3, 64]")
    assert loaded == []


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    hf_dir = write_hf_dir(tmp_path / "hf", valid_tensors())
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("mine")
    assert run_cli("from-hf", "--hf-dir", hf_dir, "--out", tmp_path / "ckpt", "--quiet") == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["keep.txt"]


def test_module_entry_point_reports_bad_input_with_exit_status_2(tmp_path):
    """`python -m af_next_jax.convert` as users run it: one `error: ...` line on stderr (no traceback), nothing
    written."""
    hf_dir = write_hf_dir(tmp_path / "hf", {"x": np.zeros(1, np.float32)}, {"model_type": "whisper"})
    result = subprocess.run([sys.executable, "-m", "af_next_jax.convert", "from-hf", "--hf-dir", str(hf_dir),
                             "--out", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unsupported model_type 'whisper'"), result.stderr
    assert not (tmp_path / "ckpt").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_export")
    hf_dir = write_hf_dir(root / "hf", valid_tensors())
    assert run_cli("from-hf", "--hf-dir", hf_dir, "--out", root / "ckpt", "--quiet") == 0
    return root / "ckpt"


@pytest.mark.parametrize("argv,message", [
    (["--max-shard-size", "lots"], "--max-shard-size"),
    (["--tokenizer-dir", "/nonexistent"], "--tokenizer-dir"),
])
def test_bad_export_options_write_nothing(checkpoint, tmp_path, capsys, argv, message):
    assert run_cli("to-hf", "--checkpoint", checkpoint, "--out", tmp_path / "out", *argv, "--quiet") == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_invalid_model_dimensions_in_config_json_are_bad_input(tmp_path, capsys):
    """ModelConfig's own validation (a ValueError) on a user's config.json is an input error: one line."""
    hf = to_hf_config(CONFIG)
    hf["text_config"] = {**hf["text_config"], "num_attention_heads": 5}  # 5 heads do not divide 64
    hf_dir = write_hf_dir(tmp_path / "hf", valid_tensors(), hf)
    assert_fails_cleanly(tmp_path, hf_dir, capsys, str(hf_dir / "config.json"), "not a valid model config")


def test_neither_checkpoint_nor_workdir_is_named_with_both_ways_to_make_one(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli("to-hf", "--checkpoint", tmp_path / "empty", "--out", tmp_path / "out", "--quiet") == 2
    error = capsys.readouterr().err
    assert "neither a converted checkpoint" in error and "from-hf" in error and "af_next_jax.train" in error
    assert not (tmp_path / "out").exists()


# Runs `python -m af_next_jax.convert` as users do, with hf_import.read_params (after validation) replaced by
# a function raising a ValueError: a bug, not bad input.
INJECTED_BUG = """
import runpy, sys
from af_next_jax.convert import hf_import
def read_params(plan, progress=True):
    raise ValueError("injected internal bug")
hf_import.read_params = read_params
sys.argv = ["af_next_jax.convert"] + sys.argv[1:]
runpy.run_module("af_next_jax.convert", run_name="__main__")
"""


def test_internal_value_error_keeps_its_traceback_and_exit_status_1(tmp_path):
    hf_dir = write_hf_dir(tmp_path / "hf", valid_tensors())
    result = subprocess.run([sys.executable, "-c", INJECTED_BUG, "from-hf", "--hf-dir", str(hf_dir),
                             "--out", str(tmp_path / "ckpt"), "--quiet"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert "ValueError: injected internal bug" in result.stderr
    assert "error: injected internal bug" not in result.stderr  # not dressed up as bad input
    assert not [p.name for p in tmp_path.iterdir() if "ckpt" in p.name], "a partial output was left behind"

