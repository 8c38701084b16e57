"""The training loop: `train(config, workdir)`. Re-running the same command resumes the run.

WORKDIR/
  config.json         the resolved experiment (+ model, data and mesh configs as built)
  checkpoints/STEP/   orbax: TrainState + data-iterator state (checkpointing.py)
  metrics.jsonl       every step's scalars and every evaluation (metrics.py)
  tensorboard/        event files
  train.log           the log lines (process 0; process i > 0 writes train.process_i.log)
  export/             the final parameters in the converter's layout (`convert to-hf` reads it)
  nonfinite_step_N.npz  the batch of a run stopped by non-finite losses (process 0's rows)

Per step: dispatch the jitted step, read the next batch from the pipeline while the device works,
then read the previous step's scalars (one step late: the host never waits for the device between
steps). SIGTERM (preemption) asks for a stop: the loop saves at the end of a
step and exits cleanly. With several processes (launch.py) every process runs this same loop on its
own share of each batch (host_data.py); the stop after a SIGTERM to any one of them, and the
non-finite stop, are decided together, so all save the same step. Metrics, TensorBoard, config.json
and the export's JSON are written by process 0 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections
import numpy as np

from af_next_jax.model.af_next import AFNextModel
from af_next_jax.batch import zeros_batch
from af_next_jax.parallel import logical_axis_rules, make_mesh, validate_sequence_parallel
from af_next_jax.train import experiment, multihost
from af_next_jax.train.checkpointing import Checkpointer, write_json
from af_next_jax.train.host_data import HostBatches, owned_shards, resolve_shard_count, saved_shard_count
from af_next_jax.train.flops import peak_flops_per_device, train_step_flops
from af_next_jax.train.metrics import MetricsWriter, format_log_line
from af_next_jax.train.optimizer import STAGES, make_optimizer, parameter_labels, trainable_mask
from af_next_jax.train.state import abstract_state, init_train_state, load_initial_params, sharded_setup, unbox
from af_next_jax.train.train_step import TrainState, make_eval_step, make_train_step

logger = logging.getLogger("af_next_jax.train")


class NonFiniteLossError(RuntimeError):
    """`max_nonfinite_streak` steps in a row had a non-finite loss or gradient."""


@dataclasses.dataclass
class RunResult:
    status: str            # "finished" | "preempted" | "nonfinite"
    step: int
    final_loss: float | None
    workdir: str


class _Preemption:
    """Whether to stop after this step because some process got SIGTERM (a preemption notice).

    One process: a SIGTERM handler sets a flag. Several processes: jax's preemption sync manager
    (started by `jax.distributed.initialize`, it catches SIGTERM itself) propagates a notice from any
    process to all and names the same step for everyone (`reached_preemption_sync_point`); without it
    (`jax_enable_preemption_service=False`) each process's flag is combined with a collective `any`
    every step. Either way all processes stop after the same step.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        self._sync_manager = False

    def __enter__(self):
        if multihost.is_multiprocess():
            from jax._src import distributed

            self._sync_manager = distributed.global_state.preemption_sync_manager is not None
        if not self._sync_manager:  # the sync manager's own SIGTERM handler must stay in place
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no signal handling
                self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._flag = True

    def should_stop(self, step: int) -> bool:
        """Call after every step, on every process, with the same step."""
        if self._sync_manager:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return multihost.agree_any(self._flag)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _setup_logging(workdir: str) -> None:
    """Process 0 logs INFO to the console and train.log; process i > 0 logs to train.process_i.log and
    only warnings and errors to the console (so a failing host is visible)."""
    root = logging.getLogger()
    index, count = jax.process_index(), jax.process_count()
    name = "train.log" if index == 0 else f"train.process_{index}.log"
    path = os.path.abspath(os.path.join(workdir, name))
    tag = f"[process {index}/{count}] " if count > 1 else ""
    for handler in [h for h in root.handlers if getattr(h, "af_next_train_log", None) not in (None, path)]:
        root.removeHandler(handler)  # an earlier run's log in this process (a notebook trains several runs)
        handler.close()
    if not any(getattr(h, "af_next_train_log", None) == path for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.af_next_train_log = path
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"))
        root.addHandler(handler)
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(message)s", "%H:%M:%S"))
        root.addHandler(stream)
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler and index > 0:
            handler.setLevel(logging.WARNING)
            handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(message)s", "%H:%M:%S"))
    root.setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stack_micro_batches(batches, count: int) -> dict:
    micro = [next(batches) for _ in range(count)]
    return {name: np.stack([m[name] for m in micro]) for name in micro[0]}


def _put(batch: dict, shardings: dict) -> dict:
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    return {name: jax.make_array_from_process_local_data(shardings[name], value) for name, value in batch.items()}


def train(config: ml_collections.ConfigDict, workdir: str, *, batches=None, eval_batches_factory=None) -> RunResult:
    """Run (or resume) the experiment `config` in `workdir`.

    `batches` (an iterator of numpy batches with get_state/set_state) and `eval_batches_factory`
    replace the data pipeline (tests feed synthetic batches); by default both come from config.data.
    With several processes (launch.py), every process calls this with the same arguments.
    """
    os.makedirs(workdir, exist_ok=True)
    _setup_logging(workdir)
    from af_next_jax.train import launch

    logger.info("%s", launch.describe(launch.current()))
    from af_next_jax.data import load_tokenizer, make_batch_iterator

    tokenizer_ids = None
    if batches is None:
        tokenizer = load_tokenizer(experiment.data_config_from(config).tokenizer)
        tokenizer_ids = tokenizer.model_config_ids()
    model_config = experiment.model_config_from(config, tokenizer_ids)
    if eval_batches_factory is None and config.eval_every and config.data.get("heldout_manifest"):
        heldout = experiment.data_config_from(config, "heldout")
        eval_batches_factory = lambda: make_batch_iterator(heldout, model_config)  # noqa: E731

    mesh_config = experiment.mesh_config_from(config)
    mesh = make_mesh(mesh_config)
    rules = logical_axis_rules(mesh_config)
    data = config.data
    validate_sequence_parallel(mesh_config, num_heads=model_config.decoder.num_heads,
                               num_kv_heads=model_config.decoder.num_kv_heads, sequence_length=data.seq_len,
                               batch_size=data.batch_size,
                               implementation=model_config.sequence_parallelism)

    model = AFNextModel(model_config)
    example = zeros_batch(model_config, batch_size=data.batch_size, seq_len=data.seq_len,
                          num_windows=data.max_windows_per_batch)
    accum = config.grad_accum_steps
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=config.checkpoint_every,
                                keep=config.keep_checkpoints, async_save=config.async_checkpointing)
    # Peak FLOP/s of the mesh's devices; measured (CPU, unknown kinds) on one local device, before the
    # mesh context, so hosts with several devices of any kind start.
    peak_flops, peak_source = peak_flops_per_device(config.peak_flops_per_device, mesh.devices.flat)
    # The rules table shards parameters, optimizer state and batches (explicit shardings of the jitted
    # step) and, as an `nn.logical_axis_rules` scope, the model's activation constraints (so the decoder
    # sequence stays sharded end to end). Sequence-parallel attention reads the mesh set here.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), _Preemption() as preemption:
        # Labels need only the tree structure: build them from the abstract parameters.
        abstract_params = unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), example))
        labels = parameter_labels(abstract_params, config.stage)
        optimizer, schedule = make_optimizer(config.optimizer, labels, config.total_steps)
        setup = sharded_setup(model, optimizer, example, mesh, rules)

        restored = checkpointer.restore_latest(abstract_state(setup, optimizer).to_dict())
        iterator_states = restored[2] if restored is not None else None
        _check_whole_rows_per_process(setup.step_batch_shardings["token_ids"],
                                      (accum, data.batch_size, data.seq_len))
        data_config = None
        if batches is None:
            batches, data_config = _host_batches(config, model_config, iterator_states,
                                                 restored[0] if restored is not None else None)
        elif iterator_states is not None:
            _restore_injected(batches, iterator_states)
        if jax.process_index() == 0:
            write_json(os.path.join(workdir, "config.json"), {
                "experiment": json.loads(config.to_json_best_effort()), "model": dataclasses.asdict(model_config),
                "mesh": mesh_config.axis_sizes(), "devices": jax.device_count(), "processes": jax.process_count(),
                "data_shards": getattr(batches, "num_shards", None),
                "data": dataclasses.asdict(data_config) if data_config else "injected batches"})
        if restored is not None:
            step, state_dict, _ = restored
            state = TrainState.from_dict(state_dict)
            logger.info("resumed from %s at step %d", checkpointer.directory, step)
            streak = int(state.nonfinite_streak.addressable_shards[0].data)  # replicated: same on every process
            if streak >= config.max_nonfinite_streak:
                # The run stopped for non-finite steps; resuming it is the user's decision to go on (new data
                # order, lower learning rate). A streak left at the limit would halt every step (train_step).
                logger.warning("step %d ended a run of %d non-finite steps; resuming with the streak reset",
                               step, streak)
                state = state.replace(nonfinite_streak=jnp.zeros_like(state.nonfinite_streak))
        else:
            initial = load_initial_params(config.init_from, setup.abstract_params) if config.init_from else None
            state = init_train_state(model, optimizer, setup, example, config.seed, initial)
            step = 0
            logger.info("started %s: %s model, stage %s (trains %s), %d devices in %d processes, mesh %s", workdir,
                        config.model.preset, config.stage, "+".join(STAGES[config.stage]), jax.device_count(),
                        jax.process_count(),
                        {k: v for k, v in mesh_config.axis_sizes().items() if v > 1} or "1 device")

        train_step = jax.jit(
            make_train_step(model, optimizer, schedule, trainable_mask(labels),
                            loss_chunk_length=config.loss_chunk_length,
                            max_nonfinite_streak=config.max_nonfinite_streak),
            in_shardings=(setup.state_shardings, setup.step_batch_shardings),
            out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(model, loss_chunk_length=config.loss_chunk_length),
                            in_shardings=(setup.param_shardings, setup.micro_batch_shardings))

        tokens_per_step = accum * data.batch_size * data.seq_len
        flops_per_step = accum * train_step_flops(
            model_config, batch_size=example["token_ids"].shape[0], seq_len=data.seq_len,
            num_windows=example["mel_valid_frames"].shape[0], trained_groups=STAGES[config.stage])
        logger.info("%.3g FLOPs per step (analytic); peak %.3g FLOP/s per device (%s)", flops_per_step,
                    peak_flops, peak_source)

        eval_cache = []
        result = RunResult("finished", step, None, workdir)
        batch = _stack_micro_batches(batches, accum) if step < config.total_steps else None
        reporter = _StepReporter(config, writer, batches, tokens_per_step, flops_per_step,
                                 peak_flops * jax.device_count(), run_start_step=step)
        pending = None  # the previous step, whose scalars are read while the device runs the next one
        while step < config.total_steps:
            state, device_metrics = train_step(state, _put(batch, setup.step_batch_shardings))
            step += 1
            dispatched = _DispatchedStep(step, device_metrics, batches.get_state(), batch)
            if step < config.total_steps:
                batch = _stack_micro_batches(batches, accum)  # overlaps the device's work
            if pending is not None and reporter.report(pending):
                # The step just dispatched was halted (its state is `pending`'s: see make_train_step).
                result = _stop_nonfinite(checkpointer, state, pending, workdir, config)
                pending = None
                break
            pending = dispatched
            if eval_batches_factory is not None and config.eval_every and (
                    step % config.eval_every == 0 or step == config.total_steps):
                # Evaluation waits for this step anyway: report it first, so its line precedes the eval's.
                if reporter.report(pending):
                    result = _stop_nonfinite(checkpointer, state, pending, workdir, config)
                    pending = None
                    break
                pending = None
                with reporter.paused():
                    _evaluate(eval_step, state.params, eval_batches_factory, eval_cache, config.eval_batches,
                              setup.micro_batch_shardings, writer, step)
            if preemption.should_stop(step):
                checkpointer.save(step, state.to_dict(), dispatched.iterator_state, force=True)
                checkpointer.wait()
                logger.warning("SIGTERM: saved step %d to %s; exiting (run the same command to resume)",
                               step, checkpointer.directory)
                result = RunResult("preempted", step, None, workdir)
                break
            with reporter.paused():
                checkpointer.save(step, state.to_dict(), dispatched.iterator_state,
                                  force=step == config.total_steps)
        else:
            result.step = step
        if pending is not None and reporter.report(pending) and result.status == "finished":
            result = _stop_nonfinite(checkpointer, state, pending, workdir, config)
        if result.status != "nonfinite":
            result.final_loss = reporter.last_loss

        checkpointer.close()
        if result.status == "finished" and config.get("export_at_end", True):
            export_params(workdir, state.params, model_config)
    writer.close()
    if hasattr(batches, "close"):
        batches.close()
    if result.status == "nonfinite":
        raise NonFiniteLossError(f"stopped at step {result.step}: {config.max_nonfinite_streak} non-finite steps "
                                 f"in a row; state saved in {checkpointer.directory}")
    return result


@dataclasses.dataclass
class _DispatchedStep:
    step: int
    device_metrics: dict      # still on the device until the reporter reads them
    iterator_state: object    # the pipeline position after this step's batches
    batch: dict               # this step's host batch (kept for the non-finite dump)


class _StepReporter:
    """Reads a step's scalars one step late, so the host never waits for the device between steps.

    The loop dispatches step N+1 before it reads step N's scalars: reading them then blocks only until
    step N is done, while N+1 is already queued. Writes metrics.jsonl / TensorBoard / the log line, the
    throughput figures, and says whether the non-finite streak reached `max_nonfinite_streak`
    (`nonfinite_streak` is a replicated output of the one SPMD step, so every process reads the same
    value and takes the same decision without an extra collective).
    """

    def __init__(self, config, writer, batches, tokens_per_step: int, flops_per_step: float, peak_flops: float,
                 *, run_start_step: int):
        self._config, self._writer, self._batches = config, writer, batches
        self._tokens_per_step, self._flops_per_step, self._peak_flops = tokens_per_step, flops_per_step, peak_flops
        self._run_start_step = run_start_step
        self._timer_start, self._timed_steps = None, 0
        self.last_loss = None

    def report(self, done: _DispatchedStep) -> bool:
        """Record `done`'s scalars; True when the run must stop for non-finite steps."""
        config, step = self._config, done.step
        metrics = {k: float(v) for k, v in jax.device_get(done.device_metrics).items()}
        now = time.perf_counter()
        if self._timer_start is None:  # the first step compiles: time from the end of it
            self._timer_start = now
        else:
            self._timed_steps += 1
            seconds_per_step = (now - self._timer_start) / self._timed_steps
            metrics["tokens_per_second"] = self._tokens_per_step / seconds_per_step
            metrics["mfu"] = self._flops_per_step / seconds_per_step / self._peak_flops
            metrics["eta_seconds"] = seconds_per_step * (config.total_steps - step)
        metrics.update(self._batches.metrics() if hasattr(self._batches, "metrics") else {})
        self.last_loss = metrics["loss"]
        log_now = step % config.log_every == 0 or step == config.total_steps or step == self._run_start_step + 1
        self._writer.write(step, metrics, tensorboard=log_now)
        if log_now:
            logger.info(format_log_line(step, config.total_steps, metrics))
        return metrics["nonfinite_streak"] >= config.max_nonfinite_streak

    @contextlib.contextmanager
    def paused(self):
        """Evaluation and checkpoint saving do not count as step time."""
        pause = time.perf_counter()
        try:
            yield
        finally:
            if self._timer_start is not None:
                self._timer_start += time.perf_counter() - pause


def _stop_nonfinite(checkpointer, state, stopped: _DispatchedStep, workdir: str, config) -> RunResult:
    """Save `stopped`'s step (its state, which `state` equals: a halted step changes nothing) and batch."""
    checkpointer.save(stopped.step, state.to_dict(), stopped.iterator_state, force=True)
    path = os.path.join(workdir, f"nonfinite_step_{stopped.step}.npz")
    if jax.process_index() == 0:
        np.savez(path, **stopped.batch)
    logger.error("%d non-finite steps in a row (max_nonfinite_streak); stopping at step %d with the state saved "
                 "and the last batch in %s", config.max_nonfinite_streak, stopped.step, path)
    return RunResult("nonfinite", stopped.step, None, workdir)


def _check_whole_rows_per_process(sharding, shape) -> None:
    """Each process must own whole batch rows that no other process holds: it reads its own rows.

    A mesh that splits the sequence across processes (dcn_ring / dcn_ulysses > 1, or ring/ulysses
    axes spanning hosts) gives several processes slices of the same rows; the pipeline cannot feed
    that yet (each process would need the same rows), so stop before training on wrong data.
    """
    if jax.process_count() == 1:
        return
    rows: dict[int, set] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        rows.setdefault(device.process_index, set()).add(index[1].indices(shape[1])[:2])
    owners: dict[tuple, set] = {}
    for process, slices in rows.items():
        for row_slice in slices:
            owners.setdefault(row_slice, set()).add(process)
    shared = {row_slice: processes for row_slice, processes in owners.items() if len(processes) > 1}
    if shared:
        row_slice, processes = next(iter(shared.items()))
        raise ValueError(
            f"the mesh splits batch rows across processes (rows {row_slice[0]}-{row_slice[1] - 1} live on processes "
            f"{sorted(processes)}): the sequence-parallel axes span hosts (dcn_ring / dcn_ulysses, or ring x ulysses "
            f"larger than one host's devices). The data pipeline gives each process whole rows of its own, so this "
            f"layout is not supported across processes yet; keep ring and ulysses inside a host and use "
            f"dcn_fsdp / dcn_data across hosts.")


def _host_batches(config, model_config, iterator_states, saved_step):
    """This process's HostBatches (its data shards), positioned where the checkpoint left them."""
    from af_next_jax.data import make_batch_iterator

    data = config.data
    num_shards = resolve_shard_count(data.get("shards", 0), jax.process_count(), data.batch_size,
                                     data.max_windows_per_batch, saved_shard_count(iterator_states), saved_step)
    shards = owned_shards(num_shards, jax.process_index(), jax.process_count())
    configs = {shard: experiment.data_config_from(config, shard=shard, num_shards=num_shards) for shard in shards}
    batches = HostBatches({shard: make_batch_iterator(c, model_config) for shard, c in configs.items()}, num_shards)
    if iterator_states is not None:
        batches.set_global_state(iterator_states)
    logger.info("data: %d shards, this process reads shards %d-%d", num_shards, shards.start, shards.stop - 1)
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


def _evaluate(eval_step, params, factory, cache: list, max_batches: int, shardings, writer, step: int) -> dict:
    """Loss and token accuracy over the held-out set (its first `max_batches` batches, cached on device).

    With several processes each reads its own share of the held-out manifest; all use as many
    batches as the process with the fewest has (every batch is one collective step)."""
    if not cache:
        batches = factory()
        host_batches = [batch for _, batch in zip(range(max_batches), batches)]
        if hasattr(batches, "close"):
            batches.close()
        count = multihost.agree_min(len(host_batches))
        cache.extend(_put(batch, shardings) for batch in host_batches[:count])
    totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for batch in cache:
        sums = jax.device_get(eval_step(params, batch))
        totals = {k: totals[k] + float(sums[k]) for k in totals}
    tokens = max(totals["tokens"], 1.0)
    scalars = {"loss": totals["loss_sum"] / tokens, "accuracy": totals["correct"] / tokens, "tokens": totals["tokens"]}
    writer.write(step, scalars, prefix="eval")
    logger.info("eval at step %d | loss %.4f | acc %.3f | %d tokens", step, scalars["loss"], scalars["accuracy"],
                int(scalars["tokens"]))
    return scalars


def export_params(workdir: str, params, model_config) -> str:
    """WORKDIR/export in the converter's layout (params + model_config.json) for `convert to-hf`.

    A collective: every process calls it. Each writes its own shards of the (possibly
    cross-host-sharded) parameters into one orbax checkpoint (plain zarr, float32), so nothing is
    gathered onto one host; process 0 writes the JSON files and swaps the new export into place.
    """
    import orbax.checkpoint as ocp

    from af_next_jax.convert.orbax_io import (CHUNK_BYTES, CONVERSION_FILE, MODEL_CONFIG_FILE, PARAMS_DIR,
                                              config_to_dict)

    out = os.path.abspath(os.path.join(workdir, "export"))
    staging = os.path.abspath(os.path.join(workdir, ".export.partial"))
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    multihost.barrier("af_next_export_staging")
    params = jax.tree.map(lambda x: x if x.dtype == jnp.float32 else x.astype(jnp.float32), params)
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
        checkpointer.save(os.path.join(staging, PARAMS_DIR), params, save_args=save_args)
    multihost.barrier("af_next_export_written")
    if primary:
        with open(os.path.join(staging, MODEL_CONFIG_FILE), "w", encoding="utf-8") as handle:
            handle.write(json.dumps(config_to_dict(model_config), indent=2) + "\n")
        with open(os.path.join(staging, CONVERSION_FILE), "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"source": "af_next_jax.train", "workdir": os.path.abspath(workdir),
                                     "processes": jax.process_count()}, indent=2) + "\n")
        old = f"{out}.old-{os.getpid()}"
        if os.path.exists(out):
            os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    multihost.barrier("af_next_export_done")
    logger.info("exported parameters to %s", out)
    return out
