"""The memory planner (benchmarks/memory_plan.py) against libtpu's compiled figures, cached in
benchmarks/compiled_memory.json, and docs/SCALING.md as benchmarks/scaling.py generates it.

Fast: nothing is compiled here (the 7B compiles are minutes each; tests/compile/test_7b_targets.py
compiles them under `slow`). A changed 7B config makes its cached figures stale: the fingerprint test
says to run `python benchmarks/scaling.py --recompile NAME`.
"""

import functools
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@functools.cache
def _scaling():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _plan(name):
    scaling = _scaling()
    config = scaling.load_config(name)
    topology = scaling.parse_topology(config.target_topology, config.target_slices)
    return scaling.memory_plan.plan(config, topology.devices_total)


SEVEN_B = ("af_next_captioner", "af_next_stage1_projector", "af_next_stage2_encoder", "af_next_stage3_full",
           "af_next_stage4_long_context", "af_next_think")


def test_every_7b_experiment_is_planned_and_cached():
    scaling = _scaling()
    assert tuple(scaling.seven_b_experiments()) == SEVEN_B
    assert sorted(scaling.load_cache()["tpu"]) == list(SEVEN_B)


@pytest.mark.parametrize("name", SEVEN_B)
def test_cached_figures_were_compiled_from_this_config(name):
    scaling = _scaling()
    entry = scaling.load_cache()["tpu"][name]
    config = scaling.load_config(name)
    assert entry["topology"] == config.target_topology and entry["slices"] == config.target_slices
    assert entry["config_fingerprint"] == scaling.fingerprint(config), \
        f"{name} changed since it was compiled: python benchmarks/scaling.py --recompile {name}"


@pytest.mark.parametrize("name", SEVEN_B)
def test_planner_is_within_10_percent_of_the_compiled_live_peak(name):
    scaling = _scaling()
    compiled = scaling.load_cache()["tpu"][name]["train"]["peak_memory_in_bytes"]
    ratio = _plan(name).peak / compiled
    assert abs(ratio - 1) <= scaling.TOLERANCE, f"{name}: planner / compiled = {ratio:.3f}"


def test_scaling_page_is_what_scaling_py_generates_from_the_cache():
    scaling = _scaling()
    page = (ROOT / "docs" / "SCALING.md").read_text()
    assert page == scaling.page(scaling.load_cache()), \
        "regenerate: python benchmarks/scaling.py --write docs/SCALING.md"


def test_every_7b_target_fits_its_hbm_with_10_percent_spare_in_the_cached_compile():
    scaling = _scaling()
    for name, entry in scaling.load_cache()["tpu"].items():
        assert scaling.remat_choice.fits_with_spare(entry, scaling.allocated), name
