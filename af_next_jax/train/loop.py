"""The training loop: `train(config, workdir)`. Re-running the same command resumes the run.

What is compiled comes from `af_next_jax.experiment.build_program`; where files go from
`af_next_jax.workdir.Workdir`. This module restores or initialises the state, runs the steps and
leaves by one exit path.

Per step: dispatch the jitted step, read the next batch from the pipeline while the device works,
then read the previous step's scalars (one step late: the host never waits for the device between
steps; reporting.py). SIGTERM (preemption) asks for a stop: the loop saves at the end of a step and
exits cleanly. With several processes (launch.py) every process runs this same loop on its own share
of each batch (host_data.py); the stop after a SIGTERM to any one of them, and the non-finite stop,
are decided together, so all save the same step. Metrics, TensorBoard, config.json and the export's
JSON are written by process 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from af_next_jax.experiment import Program, build_program, experiment_from
from af_next_jax.experiment.settings import tokenizer_ids
from af_next_jax.train import multihost
from af_next_jax.train.checkpointing import Checkpointer
from af_next_jax.train.flops import peak_flops_per_device
from af_next_jax.batch import TEXT_FIELDS
from af_next_jax.train.host_data import (HostBatches, batch_fingerprint, check_group_agreement, owned_shards,
                                         resolve_shard_count, saved_shard_count)
from af_next_jax.train.metrics import MetricsWriter
from af_next_jax.train.preemption import Preemption
from af_next_jax.holder import describe
from af_next_jax.train.reporting import StepReporter, setup_logging
from af_next_jax.train.state import load_initial_params
from af_next_jax.train.train_step import TrainState
from af_next_jax.workdir import Workdir

logger = logging.getLogger("af_next_jax.train")


class NonFiniteLossError(RuntimeError):
    """`max_nonfinite_streak` steps in a row had a non-finite loss or gradient."""


@dataclasses.dataclass
class RunResult:
    status: str            # "finished" | "preempted" | "nonfinite"
    step: int
    final_loss: float | None
    workdir: str


@dataclasses.dataclass
class _DispatchedStep:
    step: int
    device_metrics: dict      # still on the device until the reporter reads them
    iterator_state: object    # the pipeline position after this step's batches
    batch: dict               # this step's host batch (kept for the non-finite dump)


def train(config: ml_collections.ConfigDict, workdir: str, *, batches=None, eval_batches_factory=None) -> RunResult:
    """Run (or resume) the experiment `config` in `workdir`.

    `batches` (an iterator of numpy batches with get_state/set_state) and `eval_batches_factory`
    replace the data pipeline (tests feed synthetic batches); by default both come from config.data.
    With several processes (launch.py), every process calls this with the same arguments.
    """
    run = Workdir(workdir)
    with run.hold() as hold:
        return _train(run, config, batches, eval_batches_factory, hold)


def _train(run: Workdir, config, batches, eval_batches_factory, hold=None) -> RunResult:
    setup_logging(run)
    if hold is not None and hold.took_over is not None:  # warned before train.log existed: record it there
        logger.warning("took over %s from %s (its hold was stale)", run.path, describe(hold.took_over))
    from af_next_jax.train import launch

    logger.info("%s", launch.describe(launch.current()))
    program = trainer_program(config, data_pipeline=batches is None)
    experiment, trainer = program.experiment, program.experiment.trainer
    if eval_batches_factory is None and trainer.eval_every and experiment.data.heldout_manifest:
        eval_batches_factory = _heldout_batches(program)
    writer = MetricsWriter(run, enabled=jax.process_index() == 0)
    checkpointer = Checkpointer(str(run.checkpoints), save_every=trainer.checkpoint_every,
                                keep=trainer.keep_checkpoints, async_save=trainer.async_checkpointing)
    # Measured (CPU, unknown kinds) on one local device, before the mesh context.
    peak_flops, peak_source = peak_flops_per_device(trainer.peak_flops_per_device, program.mesh.devices.flat)
    with program.context(), Preemption() as preemption:
        state, step, iterator_states = _restore_or_init(program, checkpointer, run)
        batches, data_record = _position_batches(program, batches, iterator_states, step)
        logger.info("%s", program.feeding.describe())
        if jax.process_index() == 0:
            run.write_record(_run_record(experiment, program, batches, data_record))
        logger.info("%.3g FLOPs per step (analytic); peak %.3g FLOP/s per device (%s)", program.flops_per_step,
                    peak_flops, peak_source)
        reporter = StepReporter(trainer, writer, batches, trainer.grad_accum_steps * experiment.data.batch_size
                                * experiment.data.seq_len, program.flops_per_step, peak_flops * jax.device_count(),
                                run_start_step=step)
        state, result, stopped = _run_steps(program, state, step, batches, eval_batches_factory, checkpointer,
                                            writer, reporter, preemption, run)
        if stopped is not None:  # the one non-finite stop: save the stopping step and its batch
            checkpointer.save(stopped.step, state.to_dict(), stopped.iterator_state, force=True)
            if jax.process_index() == 0:
                np.savez(run.nonfinite_batch(stopped.step), **stopped.batch)
            logger.error("%d non-finite steps in a row (max_nonfinite_streak); stopping at step %d with the state "
                         "saved and the last batch in %s", trainer.max_nonfinite_streak, stopped.step,
                         run.nonfinite_batch(stopped.step))
        if result.status != "nonfinite":
            result.final_loss = reporter.last_loss
        checkpointer.close()
        if result.status == "finished" and trainer.export_at_end:
            export_params(run, state.params, experiment.model)
    writer.close()
    if hasattr(batches, "close"):
        batches.close()
    if result.status == "nonfinite":
        raise NonFiniteLossError(f"stopped at step {result.step}: {trainer.max_nonfinite_streak} non-finite steps "
                                 f"in a row; state saved in {checkpointer.directory}")
    return result


def trainer_program(config: ml_collections.ConfigDict, devices=None, *, data_pipeline: bool = True) -> Program:
    """The Program `train` runs on `devices` (default: the job's): with the data pipeline, the model takes
    the tokenizer's audio token ids."""
    return build_program(experiment_from(config, tokenizer_ids(config) if data_pipeline else None), devices)


def _heldout_batches(program: Program):
    """The held-out set read by row group, as the training data is (every member the same batches)."""
    from af_next_jax.data import make_batch_iterator

    group = program.feeding.group_of(jax.process_index())
    heldout = program.experiment.data.shard(group.index, program.feeding.num_groups, "heldout", program.slot_blocks)
    return lambda: make_batch_iterator(heldout, program.experiment.model)


def _restore_or_init(program: Program, checkpointer: Checkpointer, run: Workdir):
    """(state, step, saved iterator states or None): the newest readable checkpoint, else a fresh state."""
    trainer = program.experiment.trainer
    restored = checkpointer.restore_latest(program.abstract_state().to_dict())
    if restored is None:
        initial = load_initial_params(trainer.init_from, program.abstract_params) if trainer.init_from else None
        state = program.init_state(trainer.seed, initial)
        sizes = {axis: size for axis, size in program.mesh_sizes.items() if size > 1}
        logger.info("started %s: stage %s (trains %s), %d devices in %d processes, mesh %s", run.path, trainer.stage,
                    "+".join(trainer.trained_groups), jax.device_count(), jax.process_count(), sizes or "1 device")
        return state, 0, None
    step, state_dict, iterator_states = restored
    state = TrainState.from_dict(state_dict)
    logger.info("resumed from %s at step %d", checkpointer.directory, step)
    streak = int(state.nonfinite_streak.addressable_shards[0].data)  # replicated: same on every process
    if streak >= trainer.max_nonfinite_streak:
        # The run stopped for non-finite steps; resuming it is the user's decision to go on (new data
        # order, lower learning rate). A streak left at the limit would halt every step (train_step).
        logger.warning("step %d ended a run of %d non-finite steps; resuming with the streak reset", step, streak)
        state = state.replace(nonfinite_streak=jnp.zeros_like(state.nonfinite_streak))
    return state, step, iterator_states


def _position_batches(program: Program, batches, iterator_states, step: int):
    """(this process's batches positioned where the checkpoint left them, the DataConfig recorded or None)."""
    if batches is None:
        return _host_batches(program, iterator_states, step if iterator_states is not None else None)
    if iterator_states is not None:
        _restore_injected(batches, iterator_states)
    return batches, None


def _run_record(experiment, program: Program, batches, data_config) -> dict:
    """config.json: the experiment as loaded, and what was built from it."""
    data = dataclasses.asdict(data_config) if data_config else "injected batches"
    if data_config:
        data["tokenizer"] = os.path.abspath(data_config.tokenizer)  # readers may run from another directory
    return {"experiment": json.loads(experiment.source.to_json_best_effort()),
            "model": dataclasses.asdict(experiment.model), "mesh": program.mesh_sizes,
            "devices": jax.device_count(), "processes": jax.process_count(),
            "data_shards": getattr(batches, "num_shards", None), "data": data}


def _run_steps(program: Program, state, step: int, batches, eval_batches_factory, checkpointer, writer, reporter,
               preemption, run: Workdir):
    """Train from `step` to the end, a preemption, or a non-finite stop.

    Returns (state, RunResult, the dispatched step that ended a non-finite streak or None)."""
    trainer = program.experiment.trainer
    eval_cache, start = [], step
    batch = _stack_micro_batches(batches, trainer.grad_accum_steps) if step < trainer.total_steps else None
    pending = None  # the previous step, whose scalars are read while the device runs the next one
    while step < trainer.total_steps:
        if step == start or (step + 1) % trainer.log_every == 0:  # cheap: one small collective
            check_group_agreement(program.feeding, batch_fingerprint(batch), step + 1)
        state, device_metrics = program.train_step(state, _put(batch, program, program.step_batch))
        step += 1
        dispatched = _DispatchedStep(step, device_metrics, batches.get_state(), batch)
        if step < trainer.total_steps:
            batch = _stack_micro_batches(batches, trainer.grad_accum_steps)  # overlaps the device's work
        evaluate_now = eval_batches_factory is not None and trainer.eval_every and (
            step % trainer.eval_every == 0 or step == trainer.total_steps)
        # Evaluation waits for this step anyway: report it first, so its line precedes the eval's.
        for done in ([pending, dispatched] if evaluate_now else [pending]):
            if done is not None and reporter.report(done):
                # Halted (see make_train_step): the state is still `done`'s.
                return state, RunResult("nonfinite", done.step, None, str(run.path)), done
        pending = None if evaluate_now else dispatched
        if evaluate_now:
            with reporter.paused():
                _evaluate(program, state.params, eval_batches_factory, eval_cache, trainer.eval_batches, writer, step)
        if preemption.should_stop(step):
            checkpointer.save(step, state.to_dict(), dispatched.iterator_state, force=True)
            if pending is not None:  # the saved step's scalars: a resumed run starts after it
                reporter.report(pending)
            checkpointer.wait()
            logger.warning("SIGTERM: saved step %d to %s; exiting (run the same command to resume)", step,
                           checkpointer.directory)
            return state, RunResult("preempted", step, None, str(run.path)), None
        with reporter.paused():
            checkpointer.save(step, state.to_dict(), dispatched.iterator_state, force=step == trainer.total_steps)
    if pending is not None and reporter.report(pending):
        return state, RunResult("nonfinite", pending.step, None, str(run.path)), pending
    return state, RunResult("finished", step, None, str(run.path)), None


def _stack_micro_batches(batches, count: int) -> dict:
    micro = [next(batches) for _ in range(count)]
    return {name: np.stack([m[name] for m in micro]) for name in micro[0]}


def _put(batch: dict, program: Program, abstract_batch: dict) -> dict:
    """Global arrays from this process's host batch: the rows and windows of its row group (feeding.py).

    Every device takes its block of the group's rows (and of their sequence) and of their window
    slots; the members of a group hand over the same host batch, each for its own devices."""
    group = program.feeding.group_of(jax.process_index())
    leading = abstract_batch["token_ids"].ndim - 2  # the micro-batch axis of a training step's batch
    arrays = {}
    for name, value in batch.items():
        target = abstract_batch[name]
        kind = "rows" if name in TEXT_FIELDS else "windows"

        def device_block(index, value=value, kind=kind, size=target.shape[leading]):
            index = list(index)
            start, stop, _ = index[leading].indices(size)
            local = group.local_start(kind, start)
            index[leading] = slice(local, local + stop - start)
            return value[tuple(index)]

        arrays[name] = jax.make_array_from_callback(target.shape, target.sharding, device_block)
    return arrays


def _host_batches(program: Program, iterator_states, saved_step):
    """This process's HostBatches: the data shards of its row group, positioned where the checkpoint left them."""
    from af_next_jax.data import make_batch_iterator

    data, plan = program.experiment.data, program.feeding
    num_shards = resolve_shard_count(data.shards, plan.num_groups, data.batch_size, data.max_windows_per_batch,
                                     saved_shard_count(iterator_states), saved_step)
    group = plan.group_of(jax.process_index())
    shards = owned_shards(num_shards, group.index, plan.num_groups)
    configs = {shard: data.shard(shard, num_shards, slot_blocks=program.slot_blocks) for shard in shards}
    batches = HostBatches({shard: make_batch_iterator(c, program.experiment.model) for shard, c in configs.items()},
                          num_shards)
    if iterator_states is not None:
        batches.set_global_state(iterator_states)
    logger.info("data: %d shards, this process (row group %d) reads shards %d-%d", num_shards, group.index,
                shards.start, shards.stop - 1)
    return batches, configs[shards.start]


def _restore_injected(batches, iterator_states: list) -> None:
    if hasattr(batches, "set_global_state"):
        batches.set_global_state(iterator_states)
        return
    if len(iterator_states) != jax.process_count():
        raise ValueError(f"the checkpoint holds the iterator states of {len(iterator_states)} processes, this run "
                         f"has {jax.process_count()}; resume with {len(iterator_states)} processes")
    state = iterator_states[jax.process_index()]
    if state is not None:
        batches.set_state(state)


def _evaluate(program: Program, params, factory, cache: list, max_batches: int, writer, step: int) -> dict:
    """Loss and token accuracy over the held-out set (its first `max_batches` batches, cached on device).

    With several processes each reads its own share of the held-out manifest; all use as many
    batches as the process with the fewest has (every batch is one collective step)."""
    if not cache:
        batches = factory()
        host_batches = [batch for _, batch in zip(range(max_batches), batches)]
        if hasattr(batches, "close"):
            batches.close()
        count = multihost.agree_min(len(host_batches))
        cache.extend(_put(batch, program, program.micro_batch) for batch in host_batches[:count])
    totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for batch in cache:
        sums = jax.device_get(program.eval_step(params, batch))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    tokens = max(totals["tokens"], 1.0)
    scalars = {"loss": totals["loss_sum"] / tokens, "accuracy": totals["correct"] / tokens, "tokens": totals["tokens"]}
    writer.write(step, scalars, prefix="eval")
    logger.info("eval at step %d | loss %.4f | acc %.3f | %d tokens", step, scalars["loss"], scalars["accuracy"],
                int(scalars["tokens"]))
    return scalars


def export_params(run: Workdir, params, model_config) -> str:
    """WORKDIR/export: the final parameters as a converted checkpoint (`convert to-hf` reads it).

    A collective (convert/orbax_io.export_checkpoint): each process writes its own shards."""
    from af_next_jax.convert.orbax_io import export_checkpoint

    out = export_checkpoint(run.export, params, model_config, {
        "source": "af_next_jax.train", "workdir": str(run.path), "processes": jax.process_count()})
    logger.info("exported parameters to %s", out)
    return str(out)
