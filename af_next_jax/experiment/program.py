"""What is compiled for an experiment: `build_program(experiment, devices) -> Program`, read top to bottom.

The trainer (train/loop.py), `python -m af_next_jax.compile`, the memory planner and the benchmarks
all take their mesh, shardings and jitted steps from here, so a compile report that says "fits" is
about exactly the step the trainer runs. In order:

  1. the mesh of `devices` (MeshConfig), the logical-axis rules table, the model with the numerics of
     the devices' platform (model/numerics.py: the CPU gets its own matmul and attention layouts);
  2. the parameter groups of the stage, the optimizer and its learning-rate schedule;
  3. shardings: parameters and optimizer state (the optimizer's moments follow their parameter),
     the [B, L] micro-batch and the [A, B, L] step batch of `grad_accum_steps` micro-batches;
  4. every check, before anything is compiled (checks.py): sequence-parallel degrees against the
     heads and the sequence, windows dividing their devices, how the processes feed the rows
     (feeding.py: processes that hold slices of the same rows form a row group), and every parameter
     or batch dimension a mesh axis cannot split (replicated: refused when the experiment declares a
     target, reported otherwise);
  5. the jitted steps: `train_step(state, step_batch) -> (state, metrics)` with the state donated,
     and `eval_step(params, micro_batch) -> sums`; the analytic FLOPs of one train step.

`abstract=True` builds for devices this host cannot run (libtpu's compile-only TPU topology): the
model is traced under the abstract mesh, so everything traced sees the target's platform, and the
steps can only be lowered and compiled (`Program.lower`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from af_next_jax.batch import abstract_batch
from af_next_jax.experiment import checks
from af_next_jax.experiment.feeding import FeedingPlan, plan_for_mesh
from af_next_jax.experiment.settings import Experiment, ExperimentError
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.audio_merge import slot_blocks
from af_next_jax.model.numerics import numerics_for_platform
from af_next_jax.parallel import batch_shardings, logical_axis_rules, make_mesh, param_shardings, \
    validate_sequence_parallel
from af_next_jax.parallel.mesh import MESH_AXES
from af_next_jax.train.flops import train_step_flops
from af_next_jax.train.optimizer import make_optimizer, parameter_labels, trainable_mask
from af_next_jax.train.train_step import TrainState, make_eval_step, make_train_step, new_train_state

logger = logging.getLogger(__name__)


def unbox(variables):
    """Plain arrays of a boxed variables tree, without sharding constraints (works under any rules)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, variables,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))


@dataclasses.dataclass(frozen=True)
class Program:
    """An experiment's mesh, model, optimizer, shardings and jitted steps on one set of devices."""

    experiment: Experiment
    platform: str                      # "cpu" | "gpu" | "tpu": what the steps are compiled for
    abstract: bool                     # built for compile-only devices (lower and compile, never run)
    mesh: jax.sharding.Mesh            # an AbstractMesh when built from a device count
    rules: tuple
    model: AFNextModel
    labels: Any                        # per parameter: its group, or "frozen" (train/optimizer.py)
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_params: Any               # ShapeDtypeStructs of {"params": ...}, unsharded
    param_shardings: Any
    state_shardings: TrainState
    micro_batch: dict                  # ShapeDtypeStructs with shardings: one [B, L] batch (evaluation)
    step_batch: dict                   # ... and the [A, B, L] batch of a training step
    train_step: Any                    # jit: (TrainState, step_batch) -> (TrainState, metrics); state donated
    eval_step: Any                     # jit: (params, micro_batch) -> {"loss_sum", "correct", "tokens"}
    flops_per_step: float              # analytic model FLOPs of one train step, whole mesh (train/flops.py)
    replicated: tuple[str, ...]        # dimensions a mesh axis could not split (see checks.dropped_axes)
    feeding: FeedingPlan | None        # which processes build which rows (feeding.py); None on a device count

    @property
    def mesh_sizes(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def slot_blocks(self) -> int:
        """Blocks of a row's window slots the data should place windows in (model/audio_merge.py
        `slot_blocks`, data/packing.py): the sequence slices of a row when the windows are split over them."""
        data = self.experiment.data
        with self.context():
            return slot_blocks(data.batch_size, data.seq_len, data.max_windows_per_batch)

    @contextlib.contextmanager
    def context(self):
        """The mesh and the rules table, around anything that traces or runs the model."""
        mesh = jax.sharding.use_abstract_mesh(_as_abstract(self.mesh)) if self.abstract else jax.set_mesh(self.mesh)
        with mesh, nn.logical_axis_rules(self.rules):
            yield

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings of the whole TrainState (the target of a restore)."""
        shapes = jax.eval_shape(lambda params: new_train_state(params, self.optimizer, jax.random.PRNGKey(0)),
                                self.abstract_params)
        return jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
                            shapes, self.state_shardings)

    def init_state(self, seed: int, initial_params: dict | None = None) -> TrainState:
        """A fresh state on the mesh: random parameters from `seed`, or `initial_params` (host arrays)."""
        init_key, state_key = jax.random.split(jax.random.PRNGKey(seed))

        def random_params(key):
            # Zeros made inside the jit: a closed-over host batch would be baked into the program as a constant.
            example = {name: jax.numpy.zeros(value.shape, value.dtype) for name, value in self.micro_batch.items()}
            return unbox(self.model.init(key, example))

        with self.context():
            if initial_params is None:
                params = jax.jit(random_params, out_shardings=self.param_shardings)(init_key)
            else:
                params = jax.device_put(initial_params, self.param_shardings)
            make_state = jax.jit(lambda params, key: new_train_state(params, self.optimizer, key),
                                 out_shardings=self.state_shardings)
            return make_state(params, state_key)

    def lower(self, step: str):
        """The lowered `train` or `eval` step for the program's abstract inputs and its platform."""
        jitted, args = ((self.train_step, (self.abstract_state(), self.step_batch)) if step == "train" else
                        (self.eval_step, (self.abstract_state().params, self.micro_batch)))
        with self.context():
            return jitted.trace(*args).lower(lowering_platforms=(self.platform,))


def _abstract_mesh(mesh_config, num_devices: int) -> AbstractMesh:
    sizes = mesh_config.axis_sizes(num_devices)
    return AbstractMesh(tuple(sizes[axis] for axis in MESH_AXES), MESH_AXES,
                        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _as_abstract(mesh) -> AbstractMesh:
    return mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh


def _platform(devices) -> str:
    platform = devices[0].platform
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def build_program(experiment: Experiment, devices=None, *, abstract: bool | None = None,
                  platform: str | None = None) -> Program:
    """The Program of `experiment` on `devices` (default: all of this job's devices); see the module docstring.

    `abstract` (default: whether `devices` are other than this job's, e.g. a TPU topology's compile-only
    devices) traces under the abstract mesh; such a Program can be lowered and compiled, not run.
    `devices` may also be a device count: an abstract mesh of that size for `platform` (default "tpu"),
    whose shardings and shapes are exact but which cannot be lowered (the memory planner).

    Raises ExperimentError, naming what to change, for every layout that cannot run: the trainer and the
    compile tool refuse the same experiments.
    """
    model_config, data, trainer = experiment.model, experiment.data, experiment.trainer
    if isinstance(devices, int):  # a device count only: shardings and shapes (the planner), nothing to lower
        num_devices, platform, abstract = devices, platform or "tpu", True
    else:
        devices = list(jax.devices() if devices is None else devices)
        num_devices, platform = len(devices), _platform(devices)
        if abstract is None:
            abstract = not set(devices) <= set(jax.devices())

    # 1. Mesh, rules, model.
    try:
        validate_sequence_parallel(experiment.mesh, num_heads=model_config.decoder.num_heads,
                                   num_kv_heads=model_config.decoder.num_kv_heads, sequence_length=data.seq_len,
                                   batch_size=data.batch_size, implementation=model_config.sequence_parallelism,
                                   num_devices=num_devices)
    except ValueError as error:
        raise ExperimentError(str(error)) from None
    mesh = _abstract_mesh(experiment.mesh, devices) if isinstance(devices, int) else make_mesh(experiment.mesh, devices)
    rules = logical_axis_rules(experiment.mesh)
    model = AFNextModel(model_config, numerics=numerics_for_platform(platform))
    example = abstract_batch(model_config, batch_size=data.batch_size, seq_len=data.seq_len,
                             num_windows=data.max_windows_per_batch)

    scope = jax.sharding.use_abstract_mesh(_as_abstract(mesh)) if abstract else jax.set_mesh(mesh)
    with scope, nn.logical_axis_rules(rules):
        # 2. Parameter groups and optimizer: labels need only the tree structure.
        abstract_variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), example)
        abstract_params = unbox(abstract_variables)
        labels = parameter_labels(abstract_params, trainer.stage)
        optimizer, schedule = make_optimizer(experiment.optimizer, labels, trainer.total_steps)

        # 3. Shardings.
        shardings = param_shardings(abstract_variables, mesh, rules)
        replicated_everywhere = NamedSharding(mesh, P())
        opt_shardings = _optimizer_state_shardings(jax.eval_shape(optimizer.init, abstract_params), shardings,
                                                   replicated_everywhere)
        state_shardings = TrainState(step=replicated_everywhere, params=shardings, opt_state=opt_shardings,
                                     rng=replicated_everywhere, nonfinite_streak=replicated_everywhere,
                                     nonfinite_total=replicated_everywhere)
        micro_shardings = batch_shardings(example, mesh, rules)
        step_shardings = {name: NamedSharding(mesh, P(None, *sharding.spec)) for name, sharding in micro_shardings.items()}
        micro_batch = {name: value.update(sharding=micro_shardings[name]) for name, value in example.items()}
        step_batch = abstract_batch(model_config, batch_size=data.batch_size, seq_len=data.seq_len,
                                    num_windows=data.max_windows_per_batch, leading=(trainer.grad_accum_steps,),
                                    shardings=step_shardings)

        # 4. Checks.
        checks.check_windows_divide(data.max_windows_per_batch, micro_shardings["mel_windows"], rules)
        feeding = None if isinstance(mesh, AbstractMesh) else plan_for_mesh(
            mesh, micro_shardings, data.batch_size, data.max_windows_per_batch)
        replicated = tuple(checks.replicated_parameters(abstract_variables, shardings, rules)
                           + checks.replicated_batch_fields(example, micro_shardings, rules))
        if replicated and experiment.target.topology:
            raise ExperimentError(f"{len(replicated)} dimensions would be replicated instead of sharded, which the "
                             f"memory planned for the target {experiment.target.topology} does not allow: "
                             + "; ".join(replicated[:4]) + (f"; ... {len(replicated) - 4} more" if len(replicated) > 4
                                                             else "")
                             + ". Choose mesh sizes that divide these dimensions (--config.mesh.*), or clear "
                             "--config.target_topology= to accept the replication.")
        if replicated:
            logger.warning("%d dimensions are replicated, not sharded: %s", len(replicated), "; ".join(replicated))

        # 5. The jitted steps.
        train_step = jax.jit(
            make_train_step(model, optimizer, schedule, trainable_mask(labels), loss_chunk_length=trainer.loss_chunk_length,
                            max_nonfinite_streak=trainer.max_nonfinite_streak),
            in_shardings=(state_shardings, step_shardings), out_shardings=(state_shardings, None), donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(model, loss_chunk_length=trainer.loss_chunk_length),
                            in_shardings=(shardings, micro_shardings))

    flops = step_flops(experiment, model_config)
    return Program(experiment, platform, abstract, mesh, rules, model, labels, optimizer, schedule, abstract_params,
                   shardings, state_shardings, micro_batch, step_batch, train_step, eval_step, flops, replicated,
                   feeding)


def step_flops(experiment: Experiment, model_config=None, *, attention: bool = True) -> float:
    """Analytic FLOPs of one train step, whole mesh (train/flops.py); `attention=False` leaves out the
    attention cores (what a compiled HLO shows when they run as kernels)."""
    data, trainer = experiment.data, experiment.trainer
    return trainer.grad_accum_steps * train_step_flops(
        model_config or experiment.model, batch_size=data.batch_size, seq_len=data.seq_len,
        num_windows=data.max_windows_per_batch, trained_groups=trainer.trained_groups, attention=attention)


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
