"""The checks `build_program` runs on an experiment's shardings before anything is compiled.

Each returns a description of what is wrong (or raises with what to change); program.py decides.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from af_next_jax.experiment.settings import ExperimentError
from af_next_jax.model import axes


def _mesh_axes(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _devices_over(entry, mesh) -> int:
    """How many devices a spec entry (mesh axis names) splits a dimension over."""
    return math.prod(mesh.shape[name] for name in _mesh_axes(entry) if name in mesh.shape)


def dropped_axes(path: str, logical_names, shape, sharding, rules) -> list[str]:
    """Dimensions of one array that the rules ask to split over more devices than its sharding does:
    `parallel.rules.fit_spec` drops a mesh axis that does not divide the dimension, so the array is
    replicated over it (more memory per device than planned, silently)."""
    table = dict(rules)
    mesh = sharding.mesh
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    found = []
    for dim, (name, size, got) in enumerate(zip(logical_names, shape, spec)):
        wanted_axes = tuple(axis for axis in _mesh_axes(table.get(name) if name else None)
                            if axis in mesh.shape and mesh.shape[axis] > 1)
        wanted, kept = _devices_over(wanted_axes, mesh), _devices_over(got, mesh)
        if kept < wanted:
            lost = [axis for axis in wanted_axes if axis not in _mesh_axes(got)]
            found.append(f"{path} dimension {dim} ({name}, size {size}) is not split over "
                         f"{' x '.join(f'{axis}={mesh.shape[axis]}' for axis in lost)}: the size does not divide, "
                         f"so it is replicated there")
    return found


def replicated_parameters(abstract_variables, param_shardings, rules) -> list[str]:
    """`dropped_axes` of every parameter (optimizer moments share their parameter's sharding)."""
    boxed = jax.tree_util.tree_leaves_with_path(abstract_variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    shardings = jax.tree.leaves(param_shardings)
    found = []
    for (path, leaf), sharding in zip(boxed, shardings, strict=True):
        if isinstance(leaf, nn.Partitioned):
            found += dropped_axes(jax.tree_util.keystr(path), leaf.names, leaf.value.shape, sharding, rules)
    return found


def replicated_batch_fields(example_batch: dict, shardings: dict, rules) -> list[str]:
    """`dropped_axes` of every batch field (text [B, L] as (batch, length), audio by windows)."""
    from af_next_jax.batch import AUDIO_FIELDS, TEXT_FIELDS

    found = []
    for name, value in example_batch.items():
        if name in TEXT_FIELDS:
            names = (axes.BATCH, axes.LENGTH)
        elif name in AUDIO_FIELDS:
            names = (axes.WINDOWS,) + (None,) * (len(value.shape) - 1)
        else:
            continue
        found += dropped_axes(f"batch field {name}", names, value.shape, shardings[name], rules)
    return found


def check_windows_divide(num_windows: int, sharding, rules) -> None:
    """Refuse a window axis the mesh would replicate: every device would encode windows it does not own."""
    mesh = sharding.mesh
    wanted_axes = tuple(axis for axis in _mesh_axes(dict(rules).get(axes.WINDOWS)) if axis in mesh.shape)
    wanted = _devices_over(wanted_axes, mesh)
    got = _devices_over(sharding.spec[0] if len(sharding.spec) else None, mesh)
    if got < wanted:
        padded = -(-num_windows // wanted) * wanted
        raise ExperimentError(f"max_windows_per_batch={num_windows} does not split over the {wanted} devices of the "
                         f"window axes {wanted_axes} (only over {got}), so devices would encode windows they do "
                         f"not own; pad it to a multiple of {wanted}: --config.data.max_windows_per_batch={padded}")
