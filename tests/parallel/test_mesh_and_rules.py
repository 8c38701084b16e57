"""MeshConfig resolution and validation, the mesh itself, and the logical-axis rules table."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from af_next_jax.config import tiny
from af_next_jax.model import axes
from af_next_jax.parallel import (MESH_AXES, MeshConfig, batch_shardings, logical_axis_rules, make_mesh,
                                  param_shardings, validate_sequence_parallel)
from af_next_jax.parallel.mesh import kv_replication
from af_next_jax.parallel.rules import fit_spec


def test_minus_one_fills_the_remaining_devices():
    assert MeshConfig(data=2, fsdp=-1, ring=2).resolved(8).fsdp == 2
    assert MeshConfig(data=1, fsdp=1, ulysses=-1, dcn_ring=2).resolved(8).ulysses == 4


def test_product_not_matching_the_device_count_names_numbers_and_a_fix():
    with pytest.raises(ValueError, match=r"multiply to 16 but there are 8 devices.*Try fsdp=1"):
        MeshConfig(data=2, fsdp=2, ring=4).resolved(8)


def test_fill_axis_that_cannot_divide_is_rejected_with_valid_products():
    with pytest.raises(ValueError, match=r"not divisible by 3.*\[1, 2, 4, 8\]"):
        MeshConfig(fsdp=-1, ring=3).resolved(8)


def test_two_fill_axes_are_rejected():
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(data=-1, fsdp=-1)


def test_make_mesh_has_every_axis_with_the_configured_sizes():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, ring=2, ulysses=2))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "ring": 2, "ulysses": 2, "tensor": 1}


def test_dcn_axes_multiply_the_ici_axes():
    # One process here, so two "slices" cannot be told apart by process; check the arithmetic only.
    assert MeshConfig(data=1, fsdp=1, ulysses=4, dcn_ring=2).axis_sizes(8) == {
        "data": 1, "fsdp": 1, "ring": 2, "ulysses": 4, "tensor": 1}


@pytest.mark.parametrize("mesh_config,kwargs,message", [
    (MeshConfig(fsdp=1, ulysses=8), dict(num_heads=28, num_kv_heads=4, implementation="ulysses"),
     r"28 query heads / tensor=1 = 28 do not split over ulysses=8; valid ulysses degrees: \[1, 2, 4, 7, 14, 28\]"),
    (MeshConfig(fsdp=1, tensor=8), dict(num_heads=32, num_kv_heads=4, implementation="none"),
     r"4 K/V heads do not split over tensor=8; valid tensor sizes: \[1, 2, 4\]"),
    (MeshConfig(fsdp=1, ring=8), dict(num_heads=28, num_kv_heads=4, implementation="ring", sequence_length=1000),
     r"sequence length 1000 must be a multiple of 16 .* 992 or 1008"),
    (MeshConfig(fsdp=2, ring=4), dict(num_heads=28, num_kv_heads=4, implementation="ring", batch_size=3),
     r"batch size 3 does not split over data x fsdp = 2"),
    (MeshConfig(fsdp=1, ring=2, ulysses=4), dict(num_heads=28, num_kv_heads=4, implementation="ring"),
     r"use implementation='hybrid', or ring=8, ulysses=1"),
    (MeshConfig(fsdp=1, ring=8), dict(num_heads=28, num_kv_heads=4, implementation="none"),
     r"choose one of \('ring', 'ulysses', 'hybrid'\)"),
])
def test_invalid_sequence_parallel_setups_fail_with_numbers_and_alternatives(mesh_config, kwargs, message):
    arguments = dict(sequence_length=4096, batch_size=8, num_devices=8) | kwargs
    with pytest.raises(ValueError, match=message):
        validate_sequence_parallel(mesh_config, **arguments)


@pytest.mark.parametrize("kernel_name", ["xla", "pallas", "auto"])
def test_a_kernel_name_is_not_a_sequence_parallelism(kernel_name):
    """The strategy is config.sequence_parallelism; kernel names (config.attention_kernel) are refused."""
    with pytest.raises(ValueError, match=rf"unknown sequence parallelism '{kernel_name}'; valid: "
                                         r"\('none', 'ring', 'ulysses', 'hybrid'\)"):
        validate_sequence_parallel(MeshConfig(fsdp=8), num_heads=28, num_kv_heads=4, sequence_length=4096,
                                   batch_size=8, implementation=kernel_name, num_devices=8)


def test_valid_af_next_hybrid_setup_passes():
    # AF-Next-7B decoder on one 8-GPU node: Ulysses 4 (= K/V heads) x ring 2 at 128K.
    validate_sequence_parallel(MeshConfig(fsdp=1, ring=2, ulysses=4), num_heads=28, num_kv_heads=4,
                               sequence_length=131072, batch_size=1, implementation="hybrid", num_devices=8)


def test_fit_spec_drops_mesh_axes_that_do_not_divide_so_the_array_is_replicated_over_them():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, ring=2, ulysses=2))
    spec = P(("fsdp", "ring"), "ulysses")
    assert fit_spec(spec, (8, 8), mesh) == spec
    # 6 rows split over fsdp = 2 but not over fsdp x ring = 4: ring is dropped, with no error.
    assert fit_spec(spec, (6, 8), mesh) == P("fsdp", "ulysses")
    assert fit_spec(spec, (8, 3), mesh) == P(("fsdp", "ring"), None)
    # An axis an earlier dimension used, one the mesh lacks, and size-1 axes (tensor) are dropped too.
    assert fit_spec(P("fsdp", ("fsdp", "ring"), ("no_such_axis",), "tensor"), (8, 8, 8, 8), mesh) == P(
        "fsdp", None, None, None)


def test_kv_heads_are_replicated_only_when_the_ulysses_degree_exceeds_them():
    assert kv_replication(4, 4) == 1
    assert kv_replication(4, 2) == 1
    assert kv_replication(4, 8) == 2
    assert kv_replication(2, 8) == 4


def test_rules_table_maps_every_logical_axis_once():
    rules = logical_axis_rules(MeshConfig())
    names = [name for name, _ in rules]
    assert sorted(names) == sorted(axes.ALL_LOGICAL_AXES)
    table = dict(rules)
    assert table[axes.LENGTH] == ("ring", "ulysses")
    assert table[axes.BATCH] == ("data", "fsdp")
    assert table[axes.EMBED] == ("fsdp", "ring", "ulysses")
    assert dict(logical_axis_rules(MeshConfig(shard_params_over_sequence=False)))[axes.EMBED] == ("fsdp",)


def test_param_shardings_follow_the_logical_names_of_the_model():
    from af_next_jax.model.af_next import AFNextModel
    from af_next_jax.model.synthetic import synthetic_batch

    config = tiny()
    mesh_config = MeshConfig(data=1, fsdp=2, ring=2, ulysses=1, tensor=2)
    mesh = make_mesh(mesh_config)
    batch = synthetic_batch(config, audio_frames_per_example=[[400], [300]], seq_len=256)
    abstract = jax.eval_shape(AFNextModel(config).init, jax.random.key(0), batch)
    shardings = param_shardings(abstract, mesh, logical_axis_rules(mesh_config))
    decoder = shardings["params"]["decoder"]
    assert decoder["embed_tokens"].spec == P("tensor", ("fsdp", "ring"))
    assert decoder["layers"]["q_proj"]["kernel"].spec == P(None, ("fsdp", "ring"), "tensor", None)
    batch_spec = batch_shardings(batch, mesh, logical_axis_rules(mesh_config))
    assert batch_spec["token_ids"].spec == P("fsdp", "ring")
    # Windows (2 here) split over fsdp only: a mesh axis that does not divide a dimension is dropped.
    assert batch_spec["mel_windows"].spec == P("fsdp", None, None)
