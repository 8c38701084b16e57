"""The training loop: `train(config, workdir)`. Re-running the same command resumes the run.

WORKDIR/
  config.json         the resolved experiment (+ model, data and mesh configs as built)
  checkpoints/STEP/   orbax: TrainState + data-iterator state (checkpointing.py)
  metrics.jsonl       every step's scalars and every evaluation (metrics.py)
  tensorboard/        event files
  train.log           the log lines
  export/             the final parameters in the converter's layout (`convert to-hf` reads it)
  nonfinite_step_N.npz  the batch of a run stopped by non-finite losses

Per step: dispatch the jitted step, read the next batch from the pipeline while the device works,
then read the step's scalars. SIGTERM (preemption) sets a flag; the loop saves at the end of the
step it is in and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time

import jax
import flax.linen as nn
import ml_collections
import numpy as np

from af_next_jax.model.af_next import AFNextModel
from af_next_jax.batch import zeros_batch
from af_next_jax.parallel import logical_axis_rules, make_mesh, validate_sequence_parallel
from af_next_jax.train import experiment
from af_next_jax.train.checkpointing import Checkpointer, write_json
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


class _PreemptionFlag:
    """Set by SIGTERM; the loop checks it after every step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _setup_logging(workdir: str) -> None:
    root = logging.getLogger()
    path = os.path.abspath(os.path.join(workdir, "train.log"))
    if not any(getattr(h, "baseFilename", None) == path for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        root.addHandler(stream)
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
    """
    os.makedirs(workdir, exist_ok=True)
    _setup_logging(workdir)
    from af_next_jax.data import load_tokenizer, make_batch_iterator

    tokenizer_ids = None
    if batches is None:
        tokenizer = load_tokenizer(experiment.data_config_from(config).tokenizer)
        tokenizer_ids = tokenizer.model_config_ids()
    model_config = experiment.model_config_from(config, tokenizer_ids)
    data_config = experiment.data_config_from(config) if batches is None else None
    if batches is None:
        batches = make_batch_iterator(data_config, model_config)
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
                               implementation=model_config.attention_implementation)
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "config.json"), {
            "experiment": json.loads(config.to_json_best_effort()), "model": dataclasses.asdict(model_config),
            "mesh": mesh_config.axis_sizes(), "devices": jax.device_count(),
            "data": dataclasses.asdict(data_config) if data_config else "injected batches"})

    model = AFNextModel(model_config)
    example = zeros_batch(model_config, batch_size=data.batch_size, seq_len=data.seq_len,
                          num_windows=data.max_windows_per_batch)
    accum = config.grad_accum_steps
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=config.checkpoint_every,
                                keep=config.keep_checkpoints, async_save=config.async_checkpointing)
    # The rules table shards parameters, optimizer state and batches (explicit shardings of the jitted
    # step) and, as an `nn.logical_axis_rules` scope, the model's activation constraints (so the decoder
    # sequence stays sharded end to end). Sequence-parallel attention reads the mesh set here.
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), _PreemptionFlag() as preemption:
        # Labels need only the tree structure: build them from the abstract parameters.
        abstract_params = unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), example))
        labels = parameter_labels(abstract_params, config.stage)
        optimizer, schedule = make_optimizer(config.optimizer, labels, config.total_steps)
        setup = sharded_setup(model, optimizer, example, mesh, rules)

        restored = checkpointer.restore_latest(abstract_state(setup, optimizer).to_dict())
        if restored is not None:
            step, state_dict, iterator_state = restored
            state = TrainState.from_dict(state_dict)
            if iterator_state is not None:
                batches.set_state(iterator_state)
            logger.info("resumed from %s at step %d", checkpointer.directory, step)
        else:
            initial = load_initial_params(config.init_from, setup.abstract_params) if config.init_from else None
            state = init_train_state(model, optimizer, setup, example, config.seed, initial)
            step = 0
            logger.info("started %s: %s model, stage %s (trains %s), %d devices, mesh %s", workdir,
                        config.model.preset, config.stage, "+".join(STAGES[config.stage]), jax.device_count(),
                        {k: v for k, v in mesh_config.axis_sizes().items() if v > 1} or "1 device")

        train_step = jax.jit(
            make_train_step(model, optimizer, schedule, trainable_mask(labels),
                            loss_chunk_length=config.loss_chunk_length),
            in_shardings=(setup.state_shardings, setup.step_batch_shardings),
            out_shardings=(setup.state_shardings, None), donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(model, loss_chunk_length=config.loss_chunk_length),
                            in_shardings=(setup.param_shardings, setup.micro_batch_shardings))

        tokens_per_step = accum * data.batch_size * data.seq_len
        flops_per_step = accum * train_step_flops(
            model_config, batch_size=example["token_ids"].shape[0], seq_len=data.seq_len,
            num_windows=example["mel_valid_frames"].shape[0], trained_groups=STAGES[config.stage])
        peak_flops, peak_source = peak_flops_per_device(config.peak_flops_per_device)
        logger.info("%.3g FLOPs per step (analytic); peak %.3g FLOP/s per device (%s)", flops_per_step,
                    peak_flops, peak_source)

        eval_cache = []
        result = RunResult("finished", step, None, workdir)
        batch = _stack_micro_batches(batches, accum) if step < config.total_steps else None
        timer_start, timer_steps, run_start_step = None, 0, step
        while step < config.total_steps:
            state, metrics = train_step(state, _put(batch, setup.step_batch_shardings))
            step += 1
            iterator_state = batches.get_state()  # the pipeline position after this step's batches
            last_batch = batch
            if step < config.total_steps:
                batch = _stack_micro_batches(batches, accum)  # overlaps the device's work
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.perf_counter()
            if timer_start is None:  # the first step compiles: time from the end of it
                timer_start = now
            else:
                timer_steps += 1
                seconds_per_step = (now - timer_start) / timer_steps
                metrics["tokens_per_second"] = tokens_per_step / seconds_per_step
                metrics["mfu"] = flops_per_step / seconds_per_step / (peak_flops * jax.device_count())
                metrics["eta_seconds"] = seconds_per_step * (config.total_steps - step)
            metrics.update(batches.metrics() if hasattr(batches, "metrics") else {})
            result.final_loss = metrics["loss"]
            log_now = step % config.log_every == 0 or step == config.total_steps or step == run_start_step + 1
            writer.write(step, metrics, tensorboard=log_now)
            if log_now:
                logger.info(format_log_line(step, config.total_steps, metrics))

            if metrics["nonfinite_streak"] >= config.max_nonfinite_streak:
                checkpointer.save(step, state.to_dict(), iterator_state, force=True)
                path = os.path.join(workdir, f"nonfinite_step_{step}.npz")
                np.savez(path, **last_batch)
                logger.error("%d non-finite steps in a row (max_nonfinite_streak); stopping at step %d with the "
                             "state saved and the last batch in %s", int(metrics["nonfinite_streak"]), step, path)
                result = RunResult("nonfinite", step, metrics["loss"], workdir)
                break
            if eval_batches_factory is not None and config.eval_every and (
                    step % config.eval_every == 0 or step == config.total_steps):
                pause = time.perf_counter()
                _evaluate(eval_step, state.params, eval_batches_factory, eval_cache, config.eval_batches,
                          setup.micro_batch_shardings, writer, step)
                if timer_start is not None:
                    timer_start += time.perf_counter() - pause
            if preemption.requested:
                checkpointer.save(step, state.to_dict(), iterator_state, force=True)
                checkpointer.wait()
                logger.warning("SIGTERM: saved step %d to %s; exiting (run the same command to resume)",
                               step, checkpointer.directory)
                result = RunResult("preempted", step, metrics["loss"], workdir)
                break
            pause = time.perf_counter()
            checkpointer.save(step, state.to_dict(), iterator_state, force=step == config.total_steps)
            if timer_start is not None:
                timer_start += time.perf_counter() - pause
        else:
            result.step = step

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


def _evaluate(eval_step, params, factory, cache: list, max_batches: int, shardings, writer, step: int) -> dict:
    """Loss and token accuracy over the held-out set (its first `max_batches` batches, cached on device)."""
    if not cache:
        batches = factory()
        for _, batch in zip(range(max_batches), batches):
            cache.append(_put(batch, shardings))
        if hasattr(batches, "close"):
            batches.close()
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


def export_params(workdir: str, params, model_config) -> str | None:
    """WORKDIR/export in the converter's layout (params + model_config.json) for `convert to-hf`."""
    if jax.process_index() != 0:
        return None
    from af_next_jax.convert.orbax_io import atomic_directory, save_checkpoint

    out = os.path.join(workdir, "export")
    host_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    with atomic_directory(out, overwrite=True) as staging:
        save_checkpoint(staging, host_params, model_config, {"source": "af_next_jax.train", "workdir": workdir})
    logger.info("exported parameters to %s", out)
    return out
