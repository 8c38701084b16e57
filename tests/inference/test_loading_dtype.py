"""A loaded model computes in its checkpoint's dtype (inference/loading.py `checkpoint_dtype`), unless
`--dtype` says otherwise: an HF directory in the dtype transformers' `from_pretrained` loads it in
(config.json's `dtype` / `torch_dtype`, else the weights'), a checkpoint `from-hf` made in its source's
dtype (conversion.json), a training run's checkpoint in the compute_dtype it trained with."""

import json
import shutil

import pytest

from af_next_jax import generate as generate_cli
from af_next_jax.convert.cli import main as convert_main
from af_next_jax.convert.errors import BadInputError
from af_next_jax.evaluate import __main__ as evaluate_cli
from af_next_jax.inference import loading
from af_next_jax.inference.loading import load_model


@pytest.fixture(scope="module")
def bfloat16_export(checkpoint, tmp_path_factory):
    """The tiny checkpoint (trained-here config: compute_dtype float32) exported to HF in bfloat16."""
    out = tmp_path_factory.mktemp("bf16") / "hf"
    assert convert_main(["to-hf", "--checkpoint", str(checkpoint / "ckpt"), "--out", str(out), "--dtype", "bfloat16",
                         "--tokenizer-dir", str(checkpoint), "--quiet"]) == 0
    return out


def test_a_training_runs_checkpoint_computes_in_its_compute_dtype(checkpoint):
    assert load_model(checkpoint=str(checkpoint / "ckpt")).config.compute_dtype == "float32"
    assert load_model(checkpoint=str(checkpoint / "ckpt"), dtype="float16").config.compute_dtype == "float16"


def test_a_converted_checkpoint_computes_in_its_source_dtype(checkpoint, tmp_path):
    converted = tmp_path / "ckpt"
    shutil.copytree(checkpoint / "ckpt", converted)
    (converted / "conversion.json").write_text(json.dumps({"source": {"hf_dir": "x"}, "hf_dtype": "bfloat16"}))
    assert load_model(checkpoint=str(converted)).config.compute_dtype == "bfloat16"


def test_an_hf_directory_computes_in_its_config_dtype_else_its_weights(bfloat16_export):
    assert load_model(hf_dir=str(bfloat16_export)).config.compute_dtype == "bfloat16"
    assert load_model(hf_dir=str(bfloat16_export), dtype="float32").config.compute_dtype == "float32"
    config_file = bfloat16_export / "config.json"
    fields = json.loads(config_file.read_text())
    try:
        config_file.write_text(json.dumps({**fields, "dtype": "float32", "torch_dtype": "float32"}))
        assert load_model(hf_dir=str(bfloat16_export)).config.compute_dtype == "float32"
        config_file.write_text(json.dumps({k: v for k, v in fields.items() if k not in ("dtype", "torch_dtype")}))
        assert load_model(hf_dir=str(bfloat16_export)).config.compute_dtype == "bfloat16"  # the weights'
    finally:
        config_file.write_text(json.dumps(fields))


@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_the_dtype_flag_reaches_the_loader(command, checkpoint, monkeypatch, capsys, tmp_path):
    seen = {}

    def record(**kwargs):
        seen.update(kwargs)
        raise BadInputError("recorded")

    monkeypatch.setattr(loading, "load_model", record)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("{}\n")
    args = {"generate": ["--prompt", "Hi?"], "evaluate": ["--manifest", str(manifest), "--out", str(tmp_path / "o")]}
    main = {"generate": generate_cli.main, "evaluate": evaluate_cli.main}[command]
    assert main(["--checkpoint", str(checkpoint / "ckpt"), "--dtype", "bfloat16", *args[command]]) == 2
    assert seen["dtype"] == "bfloat16" and "recorded" in capsys.readouterr().err
