"""`build_program` is the one builder of what is compiled for an experiment: the trainer and
`python -m af_next_jax.compile` build the same Program (shardings, donation, the lowered steps), and every
check raises from it, whoever calls it.

The programs are built for libtpu's compile-only TPU devices (abstract: lowered here, never run).
"""

import pytest

from af_next_jax.compile import cli
from af_next_jax.compile.steps import compile_tool_program
from af_next_jax.compile.topology import parse_topology, topology_devices
from af_next_jax.experiment import ExperimentError, build_program, experiment_from, load_config
from af_next_jax.train import loop


def _tpu_devices(name):
    try:
        return topology_devices(parse_topology(name))
    except RuntimeError as error:  # libtpu missing
        pytest.skip(f"libtpu cannot build a TPU topology here ({error}); `pip install -e \".[tpu]\"`")


def _specs(program):
    """Every sharding of the program, as partition specs (comparable across two builds)."""
    import jax

    trees = {"params": program.param_shardings, "state": program.state_shardings,
             "micro batch": {k: v.sharding for k, v in program.micro_batch.items()},
             "step batch": {k: v.sharding for k, v in program.step_batch.items()}}
    return {name: jax.tree.map(lambda s: (s.spec, s.mesh.shape_tuple), tree) for name, tree in trees.items()}


SEVEN_B = "experiments/af_next_stage4_long_context.py"


@pytest.mark.parametrize("spec", ["experiments/debug.py", "experiments/long_context_debug.py",
                                  pytest.param(SEVEN_B, marks=pytest.mark.slow)])
def test_the_trainer_and_the_compile_tool_build_the_same_program(spec, demo_data):
    seven_b = spec == SEVEN_B
    config = load_config(spec, [] if seven_b else [f"--config.data.dir={demo_data}"])
    devices = _tpu_devices(config.target_topology)
    # The trainer reads the tokenizer's audio ids when it trains on the data pipeline; the 7B tokenizer
    # is not on this host, and the compile tool keeps the preset's ids then, as the trainer does without it.
    trainer = loop.trainer_program(config, devices, data_pipeline=not seven_b)
    tool = compile_tool_program(config, devices)
    assert trainer.abstract and tool.abstract and trainer.platform == tool.platform == "tpu"
    assert trainer.experiment == tool.experiment
    assert _specs(trainer) == _specs(tool)
    assert trainer.feeding == tool.feeding
    assert trainer.flops_per_step == tool.flops_per_step
    for step in ("train", "eval"):
        trainer_text, tool_text = trainer.lower(step).as_text(), tool.lower(step).as_text()
        assert trainer_text == tool_text, f"the {step} steps differ"
    # The state is donated to the train step: its buffers alias the new state's.
    assert "tf.aliasing_output" in trainer.lower("train").as_text()


# (overrides, the words every caller's error contains). batch_size 8 splits over the trainer's 8 fake
# CPU devices and over v5p-8's 4 chips alike, so each case trips exactly its own check.
VALIDATIONS = {
    "heads over tensor": (["--config.mesh.fsdp=-1", "--config.mesh.tensor=4"], "K/V heads do not split over tensor=4"),
    "windows over the devices": (["--config.data.max_windows_per_batch=6"], "max_windows_per_batch=6"),
    "a replicated parameter on a declared target": ([], "would be replicated instead of sharded"),
}


def _invalid_config(name, demo_data):
    overrides, _ = VALIDATIONS[name]
    config = load_config("experiments/debug.py", [f"--config.data.dir={demo_data}", "--config.data.batch_size=8",
                                                  *overrides])
    if name == "a replicated parameter on a declared target":
        config.model.decoder = {"hidden_size": 62}  # divides neither 8 devices nor v5p-8's 4 chips
    return config


@pytest.mark.parametrize("name", sorted(VALIDATIONS))
def test_every_check_stops_the_trainer(name, demo_data, tmp_path):
    # Injected (empty) batches: the check must stop the run before any batch is read.
    with pytest.raises(ExperimentError, match=VALIDATIONS[name][1]):
        loop.train(_invalid_config(name, demo_data), str(tmp_path / "run"), batches=iter([]))


@pytest.mark.parametrize("name", sorted(VALIDATIONS))
def test_every_check_stops_the_compile_tool_with_one_line(name, demo_data, monkeypatch, capsys):
    _tpu_devices("v5p-8")
    config = _invalid_config(name, demo_data)
    monkeypatch.setattr("af_next_jax.experiment.load_config", lambda spec, overrides: config)
    code = cli.main(["--config", "experiments/debug.py", "--topology", "v5p-8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and VALIDATIONS[name][1] in err


def test_a_replicated_dimension_is_reported_where_no_target_is_declared(demo_data):
    config = _invalid_config("a replicated parameter on a declared target", demo_data)
    config.target_topology = ""
    program = build_program(experiment_from(config), 8)  # an abstract mesh of 8 devices: fsdp 8
    assert program.replicated, "hidden size 62 cannot split over fsdp=8"
    assert all("fsdp=8" in line for line in program.replicated)
    assert any("['params']['decoder']['embed_tokens'] dimension 1 (embed, size 62)" in line
               for line in program.replicated)


def test_the_trainer_reads_windows_placed_in_the_block_of_their_slice(demo_data):
    """long_context_debug (FSDP 2 x ring 2 x Ulysses 2, 8 fake CPU devices, 512 tokens a row): each row's 8 window slots
    form 4 blocks, one per sequence slice, and the trainer's data puts every window in the block of the
    slice holding its first <sound> token (model/audio_merge.py merges it from one hop away)."""
    import numpy as np

    from af_next_jax.config import encoder_tokens_for_frames

    config = load_config("experiments/long_context_debug.py", [f"--config.data.dir={demo_data}",
                                                               "--config.data.max_windows_per_batch=16",
                                                               "--config.data.seq_len=512"])
    program = loop.trainer_program(config)
    assert program.slot_blocks == 4
    batches, data_config = loop._host_batches(program, None, None)
    assert data_config.slot_blocks == 4
    batch = next(batches)
    rows, seq_len = batch["token_ids"].shape
    per_row = len(batch["mel_valid_frames"]) // rows
    placed = 0
    for row in range(rows):
        frames = batch["mel_valid_frames"][row * per_row:(row + 1) * per_row]
        slots = np.flatnonzero(frames)
        tokens = encoder_tokens_for_frames(frames[slots].astype(np.int64))
        sound = np.flatnonzero(batch["token_ids"][row] == program.experiment.model.audio_token_id)
        first_slices = sound[np.cumsum(tokens) - tokens] // (seq_len // 4)
        assert (slots // (per_row // 4)).tolist() == first_slices.tolist()
        placed += len(slots)
    assert placed > 0
