"""`slow`: every AF-Next 7B experiment compiles for the TPU slice it declares, fits its HBM, and the
memory planner is within 10% of the compiled live peak.

Minutes each on a 2-core host (libtpu compiles the real 7B train and eval steps for up to 128 chips).
    python -m pytest -m slow tests/compile/test_7b_targets.py
"""

import importlib.util
import io
from pathlib import Path

import pytest

from af_next_jax.compile import cli
from af_next_jax.compile.topology import parse_topology, topology_devices
from af_next_jax import experiment

SEVEN_B = ("af_next_stage1_projector", "af_next_stage2_encoder", "af_next_stage3_full",
           "af_next_stage4_long_context", "af_next_think", "af_next_captioner")


@pytest.mark.parametrize("name", SEVEN_B)
def test_every_7b_experiment_names_a_tpu_target_for_its_tpu_mesh(name):
    config = experiment.load_config(f"experiments/{name}.py")
    topology = parse_topology(config.target_topology)
    sizes = experiment.experiment_from(config).mesh.axis_sizes(topology.devices_total)  # the mesh fits the chips
    windows = sizes["data"] * sizes["fsdp"] * sizes["ring"] * sizes["ulysses"]
    assert config.data.max_windows_per_batch % windows == 0, "windows would be replicated, not sharded"
    assert experiment.load_config(f"experiments/{name}.py:h100").target_topology == ""  # GPUs: not compilable


@pytest.mark.slow
@pytest.mark.parametrize("name", SEVEN_B)
def test_every_7b_experiment_compiles_for_its_target_and_fits(name):
    from af_next_jax.compile.steps import compile_experiment

    config = experiment.load_config(f"experiments/{name}.py")
    topology = parse_topology(config.target_topology, config.target_slices)
    try:
        devices = topology_devices(topology)
    except RuntimeError as error:
        pytest.skip(f"libtpu cannot build {topology.name} here ({error})")
    result = compile_experiment(config, devices)
    out = io.StringIO()
    code = cli.print_report(config, topology, result, out)
    print(out.getvalue())
    assert code == 0, out.getvalue()
    assert "tpu_custom_call" in result.train.compiled.as_text()  # attention_kernel "auto" = Mosaic on a TPU
    # The memory planner (benchmarks/memory_plan.py) agrees with what was just compiled.
    scaling = _scaling()
    compiled_peak = result.train.compiled.memory_analysis().peak_memory_in_bytes
    planned = scaling.memory_plan.plan(config, topology.devices_total).peak
    assert abs(planned / compiled_peak - 1) <= scaling.TOLERANCE, (planned, compiled_peak)


def _scaling():
    spec = importlib.util.spec_from_file_location("scaling", Path(__file__).parents[2] / "benchmarks" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
