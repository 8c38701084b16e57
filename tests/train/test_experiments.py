"""Experiment configs: every file in experiments/ builds valid typed configs; overrides are typed."""

import glob
import os

import pytest

from af_next_jax.parallel import MeshConfig, validate_sequence_parallel
from af_next_jax.train.experiment import load_config, mesh_config_from, model_config_from
from af_next_jax.train.optimizer import STAGES
from trainer_helpers import REPO

EXPERIMENTS = sorted(p for p in glob.glob(os.path.join(REPO, "experiments", "*.py"))
                     if os.path.basename(p) != "common.py")
# Device counts the 7B meshes are meant for: a v5p-256 slice (128 chips), 16 H100 nodes (128 GPUs).
DEVICES = {"tpu_v5p": 128, "h100": 128}


def _specs():
    for path in EXPERIMENTS:
        name = os.path.basename(path)
        if name.startswith("af_next_"):
            yield from (f"{path}:{mesh}" for mesh in DEVICES)
        else:
            yield path


@pytest.mark.parametrize("spec", list(_specs()), ids=lambda s: os.path.basename(s))
def test_every_experiment_builds_a_valid_model_stage_and_mesh(spec):
    config = load_config(spec)
    model = model_config_from(config)
    assert config.stage in STAGES
    mesh_name = spec.rpartition(":")[2] if ":" in os.path.basename(spec) else None
    devices = DEVICES.get(mesh_name, 8 if "long_context" in spec else 1)
    mesh = mesh_config_from(config)
    validate_sequence_parallel(mesh, num_heads=model.decoder.num_heads, num_kv_heads=model.decoder.num_kv_heads,
                               sequence_length=config.data.seq_len,
                               batch_size=config.data.batch_size,
                               implementation=model.sequence_parallelism, num_devices=devices)
    if model.decoder.vocab_size > 100_000:  # the 7B stages: window caps and context fit the model
        assert config.data.max_windows_per_audio <= model.max_windows_per_audio
        assert config.data.seq_len <= model.decoder.max_position_embeddings
        assert config.init_from, "every 7B stage starts from the previous stage or the converter"


def test_long_context_stage_reaches_128k_tokens_and_60_windows_with_hybrid_attention():
    config = load_config(os.path.join(REPO, "experiments", "af_next_stage4_long_context.py:h100"))
    assert (config.data.seq_len, config.data.max_windows_per_audio) == (131072, 60)
    assert config.model.sequence_parallelism == "hybrid" and config.stage == "long_context"
    sizes = MeshConfig(**config.mesh.to_dict()).axis_sizes(128)
    assert sizes["ulysses"] == 4 and sizes["ring"] == 8  # Ulysses inside a node, ring across nodes
    assert config.init_from.endswith("stage3_full")


def test_command_line_overrides_are_typed_like_the_defaults():
    config = load_config(os.path.join(REPO, "experiments", "debug.py"), [
        "--config.optimizer.learning_rate=1e-4", "--config.total_steps=7", "--config.data.dir=/tmp/x",
        "--config.model.remat_policy=full", "--config.async_checkpointing=False"])
    assert config.optimizer.learning_rate == 1e-4 and config.total_steps == 7
    assert config.data.dir == "/tmp/x" and config.model.remat_policy == "full"
    assert config.async_checkpointing is False
    assert model_config_from(config).remat_policy == "full"


def test_unknown_override_key_names_the_valid_keys():
    with pytest.raises(KeyError, match="learning_rate"):
        load_config(os.path.join(REPO, "experiments", "debug.py"), ["--config.optimizer.lr=1e-4"])


@pytest.mark.parametrize("weights,expected_share_of_second", [("(3.0, 1.0)", 0.25), ("()", 0.5)])
def test_mixture_weights_reach_the_pipeline_through_data_config_from(tmp_path, weights, expected_share_of_second):
    """`--config.data.weights` -> DataConfig.weights -> the share of each manifest in the record stream."""
    from af_next_jax.data.pipeline import manifest_records
    from af_next_jax.train.experiment import data_config_from

    for name in ("first.jsonl", "second.jsonl"):
        (tmp_path / name).write_text("".join(f'{{"line": {i}}}\n' for i in range(7)))
    config = load_config(os.path.join(REPO, "experiments", "debug.py"), [
        f"--config.data.dir={tmp_path}", "--config.data.train_manifests=('first.jsonl', 'second.jsonl')",
        f"--config.data.weights={weights}"])
    data_config = data_config_from(config)
    assert data_config.manifests == (str(tmp_path / "first.jsonl"), str(tmp_path / "second.jsonl"))
    assert data_config.weights == (None if weights == "()" else (3.0, 1.0))
    records = manifest_records(data_config)
    sources = [os.path.basename(records[index][0]) for index in range(800)]
    assert sources.count("second.jsonl") / len(sources) == pytest.approx(expected_share_of_second, abs=0.02)
