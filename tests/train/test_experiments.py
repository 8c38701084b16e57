"""Experiment configs: every file in experiments/ gives a valid typed Experiment and Program; overrides are typed."""

import glob
import os

import pytest

from af_next_jax.experiment import ExperimentError, build_program, experiment_from, load_config
from af_next_jax.parallel import MeshConfig
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
def test_every_experiment_builds_a_program_for_the_devices_it_is_meant_for(spec):
    experiment = experiment_from(load_config(spec))
    mesh_name = spec.rpartition(":")[2] if ":" in os.path.basename(spec) else None
    devices = DEVICES.get(mesh_name, 8 if "long_context" in spec else 1)
    program = build_program(experiment, devices)  # every check, on an abstract mesh of that many devices
    assert program.replicated == ()
    model, data = experiment.model, experiment.data
    if model.decoder.vocab_size > 100_000:  # the 7B stages: window caps and context fit the model
        assert data.max_windows_per_audio <= model.max_windows_per_audio
        assert data.seq_len <= model.decoder.max_position_embeddings
        assert experiment.trainer.init_from, "every 7B stage starts from the previous stage or the converter"


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
    assert experiment_from(config).model.remat_policy == "full"


def test_unknown_override_key_names_the_valid_keys():
    with pytest.raises(KeyError, match="learning_rate"):
        load_config(os.path.join(REPO, "experiments", "debug.py"), ["--config.optimizer.lr=1e-4"])


def test_a_section_with_an_unknown_key_is_an_error_naming_the_valid_ones():
    config = load_config(os.path.join(REPO, "experiments", "debug.py"))
    config.optimizer.lr = 1e-4  # set in Python (an override would be refused earlier)
    with pytest.raises(ExperimentError, match="learning_rate"):
        experiment_from(config)


def test_a_bad_value_is_an_experiment_error_saying_what_is_valid():
    config = load_config(os.path.join(REPO, "experiments", "debug.py"), ["--config.stage=everything"])
    with pytest.raises(ExperimentError, match="valid stages"):
        experiment_from(config)


@pytest.mark.parametrize("weights,expected_share_of_second", [("(3.0, 1.0)", 0.25), ("()", 0.5)])
def test_mixture_weights_reach_the_pipeline_through_the_data_settings(tmp_path, weights, expected_share_of_second):
    """`--config.data.weights` -> DataConfig.weights -> the share of each manifest in the record stream."""
    from af_next_jax.data.pipeline import manifest_records

    for name in ("first.jsonl", "second.jsonl"):
        (tmp_path / name).write_text("".join(f'{{"line": {i}}}\n' for i in range(7)))
    config = load_config(os.path.join(REPO, "experiments", "debug.py"), [
        f"--config.data.dir={tmp_path}", "--config.data.train_manifests=('first.jsonl', 'second.jsonl')",
        f"--config.data.weights={weights}"])
    data_config = experiment_from(config).data.shard(0, 1)
    assert data_config.manifests == (str(tmp_path / "first.jsonl"), str(tmp_path / "second.jsonl"))
    assert data_config.weights == (None if weights == "()" else (3.0, 1.0))
    records = manifest_records(data_config)
    sources = [os.path.basename(records[index][0]) for index in range(800)]
    assert sources.count("second.jsonl") / len(sources) == pytest.approx(expected_share_of_second, abs=0.02)
