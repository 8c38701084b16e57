"""The CLI end to end on tiny MusicFlamingo (RoTE) and AF3 models saved by transformers' save_pretrained:
from-hf, to-hf, transformers from_pretrained of the export, verify, and bit-identical round trips."""

import copy
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from af_next_jax.convert import orbax_io
from af_next_jax.convert.mapping import canonical_key, tensors_from_params
from conftest import write_af_next_tokenizer, read_tensors, run_cli

HF_CLASSES = {"musicflamingo": transformers.MusicFlamingoForConditionalGeneration,
              "audioflamingo3": transformers.AudioFlamingo3ForConditionalGeneration}
# One model is enough for these; the session fixtures are reused, not rebuilt.
MUSICFLAMINGO_ONLY = pytest.mark.parametrize("saved_model", ["musicflamingo"], indirect=True)
KEY_WARNING_WORDS = ("LOAD REPORT", "missing", "unexpected", "not used", "newly initialized", "MISSING", "UNEXPECTED")


def assert_bit_identical(original: dict, exported: dict):
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        assert exported[key].shape == value.shape, key
        assert exported[key].tobytes() == value.tobytes(), f"{key} differs"


def test_export_is_sharded_with_an_index_and_pt_metadata(converted):
    _, hf_dir = converted
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for name in shards:
        with safe_open(str(hf_dir / name), framework="numpy") as handle:
            assert handle.metadata() == {"format": "pt"}
            total += sum(handle.get_tensor(k).nbytes for k in handle.keys())
    assert index["metadata"]["total_size"] == total
    assert (hf_dir / "generation_config.json").is_file()


def test_export_loads_in_transformers_without_key_warnings(saved_model, converted, transformers_warnings):
    model_type, _, reference, _ = saved_model
    _, hf_dir = converted
    model, info = HF_CLASSES[model_type].from_pretrained(hf_dir, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    assert not [m for m in transformers_warnings if any(w in m for w in KEY_WARNING_WORDS)], transformers_warnings
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_round_trip_is_bit_identical_float32(saved_model, converted):
    _, _, _, hf_dir = saved_model
    assert_bit_identical(read_tensors(hf_dir), read_tensors(converted[1]))


def test_round_trip_is_bit_identical_bfloat16(saved_model, tmp_path):
    """bfloat16 in, float32 checkpoint, bfloat16 out (the default: the dtype the checkpoint came from)."""
    _, _, reference, _ = saved_model
    copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path / "hf_bf16")  # one model.safetensors
    assert run_cli("from-hf", "--hf-dir", tmp_path / "hf_bf16", "--out", tmp_path / "ckpt", "--quiet") == 0
    assert run_cli("to-hf", "--checkpoint", tmp_path / "ckpt", "--out", tmp_path / "out", "--quiet") == 0
    exported = read_tensors(tmp_path / "out")
    assert next(iter(exported.values())).dtype.name == "bfloat16"
    assert_bit_identical(read_tensors(tmp_path / "hf_bf16"), exported)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_verify_passes_on_the_export(converted, capsys):
    ckpt, hf_dir = converted
    assert run_cli("verify", "--hf-dir", hf_dir, "--checkpoint", ckpt) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "max |logit diff|" in out and "KL" in out


@MUSICFLAMINGO_ONLY
def test_verify_of_a_bfloat16_export_rounds_our_weights_alike(converted, tmp_path, capsys):
    """A float32 checkpoint exported as bfloat16 passes (ours rounded the same way), and fails when
    compared with the float32 weights kept: the rounding is then the (reported) difference."""
    ckpt, _ = converted
    assert run_cli("to-hf", "--checkpoint", ckpt, "--out", tmp_path / "bf16", "--dtype", "bfloat16", "--quiet") == 0
    assert run_cli("verify", "--hf-dir", tmp_path / "bf16", "--checkpoint", ckpt) == 0
    assert "rounded to bfloat16" in capsys.readouterr().out
    assert run_cli("verify", "--hf-dir", tmp_path / "bf16", "--checkpoint", ckpt, "--keep-checkpoint-dtype") == 1


@MUSICFLAMINGO_ONLY
def test_verify_fails_when_a_weight_is_perturbed(converted, tmp_path, capsys):
    ckpt, hf_dir = converted
    params = orbax_io.load_params(ckpt)
    down_proj = params["params"]["decoder"]["layers"]["down_proj"]["kernel"]
    down_proj[1] += 0.01 * np.random.default_rng(0).standard_normal(down_proj[1].shape, dtype=np.float32)
    with orbax_io.atomic_directory(tmp_path / "perturbed") as staging:
        orbax_io.save_checkpoint(staging, params, orbax_io.load_config(ckpt))
    assert run_cli("verify", "--hf-dir", hf_dir, "--checkpoint", tmp_path / "perturbed") == 1
    assert "FAIL" in capsys.readouterr().out


@MUSICFLAMINGO_ONLY
def test_tokenizer_files_are_copied(converted, tmp_path):
    ckpt, _ = converted
    from af_next_jax.convert.hf_processor import CHAT_TEMPLATE
    tokenizer_dir = tmp_path / "tokenizer"
    write_af_next_tokenizer(tokenizer_dir, orbax_io.load_config(ckpt))
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"custom_field": 7}))
    (tokenizer_dir / "config.json").write_text("{}")
    (tokenizer_dir / "vocab.json").write_text("{}")
    assert run_cli("to-hf", "--checkpoint", ckpt, "--out", tmp_path / "out", "--tokenizer-dir", tokenizer_dir,
                   "--quiet") == 0
    for name in ("tokenizer.json", "vocab.json"):
        assert (tmp_path / "out" / name).read_text() == (tokenizer_dir / name).read_text()
    tokenizer_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer_config["custom_field"] == 7 and tokenizer_config["chat_template"] == CHAT_TEMPLATE  # merged
    assert (tmp_path / "out" / "preprocessor_config.json").is_file()  # the processor files are written
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] in HF_CLASSES  # ours, not the copy


@MUSICFLAMINGO_ONLY
def test_float16_export_holds_our_weights_rounded_to_float16_and_loads_in_transformers(
        saved_model, converted, tmp_path, capsys, transformers_warnings):
    model_type, _, _, _ = saved_model
    ckpt, _ = converted
    assert run_cli("to-hf", "--checkpoint", ckpt, "--out", tmp_path / "f16", "--dtype", "float16", "--quiet") == 0
    ours = dict(tensors_from_params(orbax_io.load_params(ckpt), orbax_io.load_config(ckpt)))  # float32
    exported = read_tensors(tmp_path / "f16")
    assert sorted(exported) == sorted(ours)
    for key, value in ours.items():
        assert exported[key].dtype == np.float16, f"{key}: {exported[key].dtype}"
        # Within float16 precision: half a unit in the last place, 2^-11 relative (2^-25 absolute for subnormals).
        error = np.abs(exported[key].astype(np.float32) - value)
        assert np.all(error <= np.abs(value) * 2.0**-11 + 2.0**-25), key
        np.testing.assert_array_equal(exported[key], value.astype(np.float16), err_msg=key)  # round to nearest
    assert json.loads((tmp_path / "f16" / "config.json").read_text())["dtype"] == "float16"
    model, info = HF_CLASSES[model_type].from_pretrained(tmp_path / "f16", output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    loaded = {canonical_key(key): value for key, value in model.state_dict().items()}
    assert sorted(loaded) == sorted(exported)
    for key, value in loaded.items():
        assert value.dtype == torch.float16, key
        assert torch.equal(value, torch.from_numpy(exported[key])), key
    assert run_cli("verify", "--hf-dir", tmp_path / "f16", "--checkpoint", ckpt) == 0
    assert "rounded to float16" in capsys.readouterr().out
