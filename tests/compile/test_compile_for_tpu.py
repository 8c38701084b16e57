"""`python -m af_next_jax.compile` on this CPU host: the debug experiments compiled by libtpu for small
TPU v5p topologies, their per-device memory table, the Mosaic kernel in the compiled program, and
one-line errors for input that cannot compile.

The compiled steps are session fixtures (about 10 s and 15 s on 2 cores); the error tests fail
before anything compiles.
"""

import dataclasses
import functools
import io

import jax
import pytest

from af_next_jax.compile import cli
from af_next_jax.compile.report import bytes_per_device, memory_table
from af_next_jax.compile.topology import parse_topology, topology_devices
from af_next_jax import experiment


def _libtpu_devices(name):
    try:
        return topology_devices(parse_topology(name))
    except RuntimeError as error:  # libtpu missing: every test here needs the TPU compiler
        pytest.skip(f"libtpu cannot build a TPU topology here ({error}); `pip install -e \".[tpu]\"`")


def _compile(spec, topology, overrides=()):
    from af_next_jax.compile.steps import compile_experiment

    devices = _libtpu_devices(topology)
    config = experiment.load_config(spec, list(overrides))
    return config, parse_topology(topology), compile_experiment(config, devices)


@pytest.fixture(scope="session")
def debug_on_v5p_8():
    return _compile("experiments/debug.py", "v5p-8")


@functools.cache
def _long_context_debug_on_v5p_16():
    return _compile("experiments/long_context_debug.py", "v5p-16")


def _report(compiled, topology=None):
    config, default_topology, result = compiled
    out = io.StringIO()
    code = cli.print_report(config, topology or default_topology, result, out)
    return code, out.getvalue()


def test_debug_compiles_for_v5p_8_and_its_memory_table_adds_up(debug_on_v5p_8):
    config, topology, result = debug_on_v5p_8
    code, text = _report(debug_on_v5p_8)
    assert code == 0 and "fits:" in text
    for row in ("parameters", "optimizer state", "batch", "temporaries", "total", "HBM"):
        assert row in text
    assert result.mesh_sizes["fsdp"] == 4 and "mesh: fsdp=4" in text
    analysis = result.train.compiled.memory_analysis()
    # The table's inputs are the shards one device holds; the compiler's argument buffers hold at least
    # those (more: TPU layouts pad small arrays to (8, 128) tiles), and the peak holds them and the temporaries.
    inputs = sum(bytes_per_device(result.train.inputs[k]) for k in ("parameters", "optimizer state", "batch"))
    assert inputs <= analysis.argument_size_in_bytes
    table = memory_table(result.train, topology.hbm_bytes)
    assert table.total >= analysis.argument_size_in_bytes + analysis.temp_size_in_bytes > table.temporaries > 0
    # Parameters are FSDP-sharded: one device holds about a quarter of them, not all.
    whole = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(result.train.inputs["parameters"]))
    assert bytes_per_device(result.train.inputs["parameters"]) < whole / 2
    assert "train step compile time" in text and "eval step compile time" in text


def test_a_step_that_does_not_fit_exits_non_zero_and_names_the_knobs(debug_on_v5p_8):
    config, topology, result = debug_on_v5p_8
    tiny_hbm = parse_topology("v5p-8")
    object.__setattr__(tiny_hbm, "generation", dataclasses.replace(
        tiny_hbm.generation, hbm_bytes_per_chip=1 << 20))  # a 1 MiB chip
    code, text = _report(debug_on_v5p_8, tiny_hbm)
    assert code == 1 and "DOES NOT FIT" in text
    for knob in ("remat_policy", "batch_size", "fsdp", "max_windows_per_batch"):
        assert knob in text


def test_collectives_are_counted_by_kind(debug_on_v5p_8):
    _, text = _report(debug_on_v5p_8)
    assert "all-gather" in text  # FSDP gathers the parameters of each layer


# The encoder's attention is not sequence-parallel: its Mosaic kernel must run per shard
# (attention/kernel_over_mesh.py), or XLA refuses to partition it.
def test_long_context_debug_compiles_the_mosaic_kernel():
    long_context_debug_on_v5p_16 = _long_context_debug_on_v5p_16()
    config, topology, result = long_context_debug_on_v5p_16
    assert result.mesh_sizes == {"data": 1, "fsdp": 2, "ring": 2, "ulysses": 2, "tensor": 1}
    train_hlo, eval_hlo = result.train.compiled.as_text(), result.eval.compiled.as_text()
    assert "tpu_custom_call" in train_hlo and "tpu_custom_call" in eval_hlo
    code, text = _report(long_context_debug_on_v5p_16)
    assert code == 0 and "all-to-all" in text and "collective-permute" in text  # Ulysses and the ring


def _one_line_error(capsys, argv):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    return err


def test_unknown_topology_is_a_one_line_error_naming_valid_ones(capsys):
    err = _one_line_error(capsys, ["--config", "experiments/debug.py", "--topology", "v5q-8"])
    assert "v5q-8" in err and "v5p-8" in err and all(f"'{g}'" in err for g in ("v4", "v5e", "v5p", "v6e"))
    err = _one_line_error(capsys, ["--config", "experiments/debug.py", "--topology", "v5p-12"])
    assert "v5p-16" in err


def test_a_mesh_that_does_not_match_the_chip_count_is_a_one_line_error(capsys):
    _libtpu_devices("v5p-8")
    err = _one_line_error(capsys, ["--config", "experiments/long_context_debug.py", "--topology", "v5p-8"])
    assert "4" in err and "fsdp" in err  # 2 x 2 x 2 axes on 4 chips


def test_heads_that_do_not_split_are_a_one_line_error(capsys):
    _libtpu_devices("v5p-8")
    err = _one_line_error(capsys, ["--config", "experiments/debug.py", "--topology", "v5p-8",
                                   "--config.mesh.fsdp=1", "--config.mesh.tensor=4"])
    assert "K/V heads do not split over tensor=4" in err and "valid tensor sizes" in err


def test_windows_that_do_not_divide_the_mesh_fail_instead_of_replicating(capsys):
    _libtpu_devices("v5p-16")
    err = _one_line_error(capsys, ["--config", "experiments/long_context_debug.py", "--topology", "v5p-16",
                                   "--config.data.max_windows_per_batch=6"])
    assert "max_windows_per_batch=6" in err and "max_windows_per_batch=8" in err


@pytest.mark.parametrize("name, grid", [("v5p-8", (2, 2, 1)), ("v5p-256", (4, 4, 8)), ("v5p-12288", (16, 16, 24)),
                                        ("v5e-16", (4, 4)), ("v6e-8", (2, 4)), ("v4-32", (2, 2, 4))])
def test_user_topology_names_translate_to_libtpu_grids(name, grid):
    topology = parse_topology(name)
    assert topology.grid == grid and topology.libtpu_name == f"{name.split('-')[0]}:{'x'.join(map(str, grid))}"


def test_the_compile_command_prints_no_libtpu_start_up_errors_on_a_host_without_a_tpu(tmp_path):
    """libtpu loads to build the topology; on a CPU host it would print its TPU VM start-up errors
    (af_next_jax/process_setup.py `compile_only_libtpu`). A windows error stops the command right after the
    topology is built: stderr must hold that one line and nothing from libtpu."""
    import os
    import subprocess
    import sys

    _libtpu_devices("v5p-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    result = subprocess.run([sys.executable, "-m", "af_next_jax.compile", "--config", "experiments/debug.py",
                             "--topology", "v5p-8", "--config.data.max_windows_per_batch=6"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                   if line.startswith("error: data.max_windows_per_batch=6")]


def test_compile_only_libtpu_leaves_tpu_hosts_and_the_users_choice_alone():
    from af_next_jax.process_setup import compile_only_libtpu

    environ = {}
    assert compile_only_libtpu("v5p-64", environ, tpu_chips=lambda: 0)
    assert environ == {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": "v5p-64"}
    on_a_tpu_vm, users = {}, {"TPU_ACCELERATOR_TYPE": "v5p-8"}
    assert not compile_only_libtpu("v5p-64", on_a_tpu_vm, tpu_chips=lambda: 4) and on_a_tpu_vm == {}
    assert not compile_only_libtpu("v5p-64", users, tpu_chips=lambda: 0) and users == {"TPU_ACCELERATOR_TYPE": "v5p-8"}
