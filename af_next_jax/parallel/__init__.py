"""Meshes, the logical-axis rules table, the zigzag layout, and what ring / Ulysses / hybrid cost per
device (compiled_cost.py). The sequence-parallel attention itself lives in af_next_jax/attention/."""

from af_next_jax.parallel.layout import from_load_balanced, to_load_balanced
from af_next_jax.parallel.mesh import MESH_AXES, MeshConfig, make_mesh, validate_sequence_parallel
from af_next_jax.parallel.rules import batch_shardings, logical_axis_rules, param_shardings

__all__ = ["MESH_AXES", "MeshConfig", "make_mesh", "validate_sequence_parallel", "logical_axis_rules",
           "param_shardings", "batch_shardings", "to_load_balanced", "from_load_balanced"]
