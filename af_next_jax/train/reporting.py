"""What a run shows while it trains: the log files and console, and each step's scalars (one step late)."""

from __future__ import annotations

import contextlib
import logging
import time

import jax

from af_next_jax.train.metrics import format_log_line

logger = logging.getLogger("af_next_jax.train")


def setup_logging(workdir) -> None:
    """Process 0 logs INFO to the console and train.log; process i > 0 logs to train.process_i.log and
    only warnings and errors to the console (so a failing host is visible)."""
    root = logging.getLogger()
    index, count = jax.process_index(), jax.process_count()
    path = str(workdir.log_file(index))
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


class StepReporter:
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

    def report(self, done) -> bool:
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
