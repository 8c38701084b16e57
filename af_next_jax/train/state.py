"""Create the TrainState on the mesh: abstract init, shardings, random or `init_from` parameters.

Nothing is materialised before its sharding is known: the parameters' logical axes come from
`jax.eval_shape(model.init)`, the parallel package's rules map them to mesh axes, and the optimizer
state inherits the sharding of the parameter it belongs to (matched by tree path).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from af_next_jax.config import ModelConfig
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.parallel import batch_shardings, param_shardings
from af_next_jax.train.train_step import TrainState, new_train_state

logger = logging.getLogger(__name__)


def unbox(variables):
    """Plain arrays of a boxed variables tree, without sharding constraints (works under any rules)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, variables,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass
class ShardedSetup:
    """Everything with a sharding: abstract params, their shardings, the state and batch shardings."""

    abstract_params: dict
    param_shardings: dict
    state_shardings: TrainState
    micro_batch_shardings: dict        # one [B, L] micro-batch (eval batches)
    step_batch_shardings: dict         # the [A, B, L] batch of a training step


def sharded_setup(model: AFNextModel, optimizer: optax.GradientTransformation, example_batch: dict,
                  mesh: jax.sharding.Mesh, rules) -> ShardedSetup:
    """Call inside `jax.set_mesh(mesh)`; `rules` maps the logical axes of parameters and batches."""
    abstract_variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), example_batch)
    shardings = param_shardings(abstract_variables, mesh, rules)
    abstract_params = unbox(abstract_variables)
    replicated = NamedSharding(mesh, P())
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    opt_shardings = _optimizer_state_shardings(abstract_opt_state, shardings, replicated)
    state_shardings = TrainState(step=replicated, params=shardings, opt_state=opt_shardings, rng=replicated,
                                 nonfinite_streak=replicated, nonfinite_total=replicated)
    micro = batch_shardings(example_batch, mesh, rules)
    step = {name: NamedSharding(mesh, P(None, *sharding.spec)) for name, sharding in micro.items()}
    return ShardedSetup(abstract_params, shardings, state_shardings, micro, step)


def _optimizer_state_shardings(abstract_opt_state, shardings, replicated):
    """Each optimizer-state leaf whose path ends in a parameter's path (Adam's mu and nu) gets that
    parameter's sharding; the rest (step counters) is replicated. (`optax.tree_map_params` cannot see
    through the MaskedNodes that multi_transform leaves for other groups' parameters.)"""
    by_path = {tuple(path): sharding for path, sharding in jax.tree_util.tree_leaves_with_path(shardings)}
    root = jax.tree_util.DictKey("params")

    def one(path, leaf):
        path = tuple(path)
        starts = [i for i, key in enumerate(path) if key == root]
        sharding = by_path.get(path[starts[-1]:]) if starts else None
        if sharding is not None and len(sharding.spec) <= len(leaf.shape):
            return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def abstract_state(setup: ShardedSetup, optimizer: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs with shardings of the whole TrainState (the target of a restore)."""
    shapes = jax.eval_shape(lambda params: new_train_state(params, optimizer, jax.random.PRNGKey(0)),
                            setup.abstract_params)
    return jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
                        shapes, setup.state_shardings)


def init_train_state(model: AFNextModel, optimizer, setup: ShardedSetup, example_batch: dict, seed: int,
                     initial_params: dict | None = None) -> TrainState:
    """A fresh state: random parameters from `seed`, or `initial_params` (host arrays) placed on the mesh."""
    rng = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(rng)
    if initial_params is None:
        init = jax.jit(lambda key: unbox(model.init(key, example_batch)), out_shardings=setup.param_shardings)
        params = init(init_key)
    else:
        params = jax.device_put(initial_params, setup.param_shardings)
    make_state = jax.jit(lambda params, key: new_train_state(params, optimizer, key),
                         out_shardings=setup.state_shardings)
    return make_state(params, state_key)


def load_initial_params(path: str, abstract_params: dict) -> dict:
    """Parameters for `init_from`: a converted checkpoint (`convert from-hf`: CKPT/model_config.json +
    CKPT/params) or the workdir of a previous stage (its WORKDIR/export, written when a run finishes).

    Shapes must match this experiment's model; the error lists the first mismatches.
    """
    from af_next_jax.convert.orbax_io import MODEL_CONFIG_FILE, load_params

    candidates = [path, os.path.join(path, "export")]
    source = next((c for c in candidates if os.path.isfile(os.path.join(c, MODEL_CONFIG_FILE))), None)
    if source is None:
        raise FileNotFoundError(f"init_from={path!r} is neither a converted checkpoint (with {MODEL_CONFIG_FILE}) "
                                f"nor a finished training workdir (with export/{MODEL_CONFIG_FILE})")
    params = load_params(source)
    expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
    found = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    problems = [f"{key}: expected {shape}, found {found.get(key, 'nothing')}"
                for key, shape in expected.items() if found.get(key) != shape]
    problems += [f"{key}: not in this model" for key in found.keys() - expected.keys()]
    if problems:
        raise ValueError(f"init_from={source} does not fit this experiment's model ({len(problems)} problems): "
                         + "; ".join(problems[:5]))
    logger.info("initialising parameters from %s", source)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)
