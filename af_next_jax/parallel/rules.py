"""The one rules table: logical axis name (af_next_jax/model/axes.py) -> mesh axes (mesh.py).

Use it as flax's logical-partitioning context around init / apply / the train step:

    mesh = make_mesh(mesh_config)
    rules = logical_axis_rules(mesh_config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        ...

The trainer does exactly this: parameters, optimizer state and batches get explicit shardings from
the functions below, and the scope applies the model's activation constraints.

`param_shardings` turns the logical metadata of `jax.eval_shape(model.init, ...)` into a tree of
NamedShardings (dropping any mesh axis that does not divide a dimension, so tiny test models still
shard: `fit_spec`, which replicates silently); `batch_shardings` does the same for a batch dict
(af_next_jax/batch.py).
"""

from __future__ import annotations

import jax
import flax.linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from af_next_jax.batch import AUDIO_FIELDS, TEXT_FIELDS
from af_next_jax.model import axes
from af_next_jax.parallel.mesh import BATCH_AXES, SEQUENCE_AXES, MeshConfig


def logical_axis_rules(mesh_config: MeshConfig) -> tuple[tuple[str, tuple[str, ...] | str | None], ...]:
    """Rules for `nn.logical_axis_rules`: every logical axis of axes.py, in one table.

    Parameters: FSDP shards the embedding dimension (over the sequence axes too when
    `shard_params_over_sequence`, since those devices otherwise hold full replicas); tensor
    parallelism shards heads, MLP width and vocabulary. Activations: batch over data x fsdp, the
    decoder sequence over ring x ulysses end to end, heads / MLP / vocab over tensor; the encoder's
    windows over data x fsdp (and the sequence axes when `shard_windows_over_sequence`).
    """
    param_fsdp = BATCH_AXES[1:] + (SEQUENCE_AXES if mesh_config.shard_params_over_sequence else ())
    windows = BATCH_AXES + (SEQUENCE_AXES if mesh_config.shard_windows_over_sequence else ())
    return (
        # Parameters.
        (axes.LAYERS, None),
        (axes.VOCAB, "tensor"),
        (axes.EMBED, param_fsdp),
        (axes.MLP, "tensor"),
        (axes.Q_HEADS, "tensor"),
        (axes.KV_HEADS, "tensor"),
        (axes.HEAD_DIM, None),
        (axes.AUDIO_EMBED, param_fsdp),
        (axes.AUDIO_MLP, "tensor"),
        (axes.AUDIO_HEADS, "tensor"),
        (axes.MEL, None),
        (axes.CONV_WIDTH, None),
        (axes.AUDIO_POSITIONS, None),
        # Activations.
        (axes.BATCH, BATCH_AXES),
        (axes.LENGTH, SEQUENCE_AXES),
        (axes.ACT_EMBED, None),
        (axes.ACT_HEADS, "tensor"),
        (axes.ACT_KV_HEADS, "tensor"),
        (axes.ACT_MLP, "tensor"),
        (axes.ACT_VOCAB, "tensor"),
        (axes.WINDOWS, windows),
        (axes.WINDOW_LENGTH, None),
        (axes.ACT_AUDIO_EMBED, None),
    )


def _as_tuple(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def fit_spec(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """`spec` with every mesh axis that cannot shard `shape` DROPPED: the array is then replicated over
    that axis, silently, not refused. A caller that must not replicate (a 7B parameter, a sequence
    that has to be split) compares the result with `spec` and fails or reports itself.

    Per dimension, keeps the longest prefix of the named mesh axes whose product divides the dimension
    and that no earlier dimension used (a mesh axis may shard one dimension only); drops the rest of
    that dimension's axes, axes the mesh does not have, and size-1 axes (they shard nothing)."""
    fitted, used = [], set()
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        kept, product = [], 1
        for name in _as_tuple(entry):
            if name in used or name not in mesh.axis_names or dim % (product * mesh.shape[name]):
                break
            if mesh.shape[name] == 1:  # size-1 axes shard nothing; leave them out of the spec
                continue
            kept.append(name)
            product *= mesh.shape[name]
        used.update(kept)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*fitted)


def logical_sharding(logical_names, shape, mesh, rules) -> NamedSharding:
    """NamedSharding for one array with logical axis names (None = replicated dimension).

    Unlike `nn.logical_to_mesh_axes` this accepts a logical name repeated on two dimensions (square
    weights such as [audio_embed, audio_embed]): the first dimension takes the mesh axes.
    """
    table = dict(rules)
    spec = P(*(table.get(name) if name is not None else None for name in logical_names))
    return NamedSharding(mesh, fit_spec(spec, tuple(shape), mesh))


def param_shardings(abstract_variables, mesh: jax.sharding.Mesh, rules):
    """NamedShardings for a variables tree from `jax.eval_shape(model.init, ...)`.

    Leaves boxed as nn.LogicallyPartitioned / nn.Partitioned get their logical names mapped by
    `rules`; unboxed leaves are replicated. The result has the *unboxed* tree structure, ready for
    `jax.jit(..., out_shardings=...)` of an init wrapped in `nn.unbox`, or for `jax.device_put`.
    """
    def one(leaf):
        if isinstance(leaf, nn.spmd.LogicallyPartitioned):
            return logical_sharding(leaf.names, leaf.value.shape, mesh, rules)
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, fit_spec(P(*leaf.names), leaf.value.shape, mesh))
        return NamedSharding(mesh, P())
    return jax.tree.map(one, abstract_variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_shardings(batch, mesh: jax.sharding.Mesh, rules) -> dict:
    """NamedShardings for a batch dict: text fields [B, L] as (batch, length), audio by windows."""
    shardings = {}
    for name, value in batch.items():
        shape = tuple(value.shape)
        if name in TEXT_FIELDS:
            names = (axes.BATCH, axes.LENGTH)
        elif name in AUDIO_FIELDS:
            names = (axes.WINDOWS,) + (None,) * (len(shape) - 1)
        else:
            names = (None,) * len(shape)
        shardings[name] = logical_sharding(names, shape, mesh, rules)
    return shardings
