"""The experiment's train and eval steps, built as the trainer builds them, from abstract values only.

Same model config, mesh config, logical rules, optimizer, shardings and donation as
`af_next_jax.train.loop.train`; the devices are the compile-only devices of a TPU topology, so
`lower().compile()` runs libtpu's compiler on this host and nothing is allocated.
"""

from __future__ import annotations

import dataclasses
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from af_next_jax.batch import zeros_batch
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.parallel import logical_axis_rules, make_mesh, validate_sequence_parallel
from af_next_jax.train import experiment
from af_next_jax.train.flops import train_step_flops
from af_next_jax.train.optimizer import STAGES, make_optimizer, parameter_labels, trainable_mask
from af_next_jax.train.state import abstract_state, sharded_setup, unbox
from af_next_jax.train.train_step import make_eval_step, make_train_step


@dataclasses.dataclass
class CompiledStep:
    name: str                      # "train" | "eval"
    compiled: object               # jax.stages.Compiled
    seconds: float                 # lower + compile wall time
    inputs: dict                   # {"parameters": tree, "optimizer state": tree, "batch": tree} of abstract arrays


@dataclasses.dataclass
class CompiledExperiment:
    mesh_sizes: dict
    model_config: object
    analytic_flops: float          # one train step, whole mesh
    train: CompiledStep
    eval: CompiledStep | None


def abstract_batch(model_config, *, batch_size: int, seq_len: int, num_windows: int, leading=()) -> dict:
    """ShapeDtypeStructs of a batch (zeros_batch's layout) without allocating it: the 7B mel windows
    alone are gigabytes."""
    shapes = jax.eval_shape(lambda: {name: jnp.asarray(value) for name, value in
                                     zeros_batch(model_config, batch_size=1, seq_len=1, num_windows=1).items()})
    sizes = {"token_ids": (batch_size, seq_len), "mel_windows": (num_windows,), "mel_valid_frames": (num_windows,),
             "window_index": (num_windows,)}
    batch = {}
    for name, shape in shapes.items():
        head = sizes.get(name, (batch_size, seq_len))
        batch[name] = jax.ShapeDtypeStruct(tuple(leading) + head + shape.shape[len(head):], shape.dtype)
    return batch


def check_windows_divide(num_windows: int, sharding, rules) -> None:
    """Refuse a window axis that the mesh would silently replicate: the rules drop mesh axes that do not
    divide a dimension, and every device would then encode windows it does not own."""
    from af_next_jax.model import axes

    mesh = sharding.mesh
    wanted_axes = dict(rules).get(axes.WINDOWS) or ()
    wanted_axes = (wanted_axes,) if isinstance(wanted_axes, str) else tuple(wanted_axes)
    wanted = math.prod(mesh.shape[a] for a in wanted_axes if a in mesh.shape)
    got_axes = sharding.spec[0] if len(sharding.spec) else None
    got_axes = (got_axes,) if isinstance(got_axes, str) else tuple(got_axes or ())
    got = math.prod(mesh.shape[a] for a in got_axes)
    if got < wanted:
        padded = -(-num_windows // wanted) * wanted
        raise ValueError(f"max_windows_per_batch={num_windows} does not split over the {wanted} devices of the "
                         f"window axes {wanted_axes} (only over {got}), so devices would encode windows they do "
                         f"not own; pad it to a multiple of {wanted}: --config.data.max_windows_per_batch={padded}")


def compile_experiment(config: ml_collections.ConfigDict, devices, *, with_eval: bool = True) -> CompiledExperiment:
    model_config = experiment.model_config_from(config)
    mesh_config = experiment.mesh_config_from(config)
    data = config.data
    mesh_sizes = mesh_config.axis_sizes(len(devices))
    validate_sequence_parallel(mesh_config, num_heads=model_config.decoder.num_heads,
                               num_kv_heads=model_config.decoder.num_kv_heads, sequence_length=data.seq_len,
                               batch_size=data.batch_size, implementation=model_config.sequence_parallelism,
                               num_devices=len(devices))
    mesh = make_mesh(mesh_config, devices)
    rules = logical_axis_rules(mesh_config)
    model = AFNextModel(model_config)
    accum = config.grad_accum_steps
    example = abstract_batch(model_config, batch_size=data.batch_size, seq_len=data.seq_len,
                             num_windows=data.max_windows_per_batch)
    # The abstract mesh, not `jax.set_mesh`: the trainer's set-up makes a few eager values (PRNG keys)
    # that must run on this host, while everything traced sees the TPU mesh (and so picks its kernels).
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
        abstract_params = unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), example))
        labels = parameter_labels(abstract_params, config.stage)
        optimizer, schedule = make_optimizer(config.optimizer, labels, config.total_steps)
        setup = sharded_setup(model, optimizer, example, mesh, rules)
        check_windows_divide(data.max_windows_per_batch, setup.micro_batch_shardings["mel_windows"], rules)
        state = abstract_state(setup, optimizer)
        step_batch = {name: jax.ShapeDtypeStruct((accum,) + value.shape, value.dtype,
                                                 sharding=setup.step_batch_shardings[name])
                      for name, value in example.items()}
        train_step = jax.jit(make_train_step(model, optimizer, schedule, trainable_mask(labels),
                                             loss_chunk_length=config.loss_chunk_length,
                                             max_nonfinite_streak=config.max_nonfinite_streak),
                             in_shardings=(setup.state_shardings, setup.step_batch_shardings),
                             out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
        platform = devices[0].platform  # "tpu" for libtpu's compile-only devices, "cpu" for fake CPU meshes
        train = _compile("train", train_step, (state, step_batch), platform,
                         {"parameters": state.params, "optimizer state": state.opt_state, "batch": step_batch})
        evaluation = None
        if with_eval:
            eval_step = jax.jit(make_eval_step(model, loss_chunk_length=config.loss_chunk_length),
                                in_shardings=(setup.param_shardings, setup.micro_batch_shardings))
            micro_batch = {name: jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                      sharding=setup.micro_batch_shardings[name])
                           for name, value in example.items()}
            evaluation = _compile("eval", eval_step, (state.params, micro_batch), platform,
                                  {"parameters": state.params, "optimizer state": {}, "batch": micro_batch})
    analytic = accum * train_step_flops(model_config, batch_size=data.batch_size, seq_len=data.seq_len,
                                        num_windows=data.max_windows_per_batch, trained_groups=STAGES[config.stage])
    return CompiledExperiment(mesh_sizes, model_config, analytic, train, evaluation)


def _compile(name: str, jitted, args, platform: str, inputs) -> CompiledStep:
    start = time.perf_counter()
    compiled = jitted.trace(*args).lower(lowering_platforms=(platform,)).compile()
    return CompiledStep(name, compiled, time.perf_counter() - start, inputs)
