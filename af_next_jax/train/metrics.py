"""What a user sees: one concise log line, TensorBoard event files and a metrics.jsonl per run.

metrics.jsonl holds one JSON object per training step (and one per evaluation), appended; a
resumed run appends the steps it re-runs again, so readers keep the last record of each step
(`read_metrics`).
"""

from __future__ import annotations

import json

from af_next_jax.workdir import Workdir


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def format_log_line(step: int, total_steps: int, metrics: dict) -> str:
    """`step 40/160 | loss 3.215 | acc 0.41 | lr 2.9e-03 | gnorm 1.23 | 9.1k tok/s | MFU 3.1% | ...`."""
    parts = [f"step {step}/{total_steps}", f"loss {metrics['loss']:.4f}", f"acc {metrics['accuracy']:.3f}",
             f"lr {metrics['learning_rate']:.2e}", f"gnorm {metrics['grad_norm']:.3g}"]
    if "tokens_per_second" in metrics:
        parts.append(f"{metrics['tokens_per_second'] / 1e3:.1f}k tok/s")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    parts.append(f"data skips {int(metrics.get('data/skipped', 0))}")
    if metrics.get("nonfinite_total"):
        parts.append(f"non-finite steps {int(metrics['nonfinite_total'])}")
    if "eta_seconds" in metrics:
        parts.append(f"ETA {format_duration(metrics['eta_seconds'])}")
    return " | ".join(parts)


class MetricsWriter:
    """Scalars to WORKDIR/metrics.jsonl (every call) and to TensorBoard (when `tensorboard`)."""

    def __init__(self, workdir: Workdir, *, enabled: bool = True):
        self._enabled = enabled
        self._jsonl = open(workdir.metrics_file, "a", encoding="utf-8") if enabled else None
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(workdir.tensorboard), flush_secs=10)

    def write(self, step: int, scalars: dict, *, tensorboard: bool = True, prefix: str = "train") -> None:
        if not self._enabled:
            return
        record = {"step": step, "kind": prefix, **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if tensorboard:
            for name, value in scalars.items():
                tag = name if "/" in name else f"{prefix}/{name}"
                self._tensorboard.add_scalar(tag, float(value), step)

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tensorboard.close()


def read_metrics(workdir: str, kind: str = "train") -> dict[int, dict]:
    """{step: record} of WORKDIR/metrics.jsonl, the last record of each step winning."""
    records = {}
    with open(Workdir(workdir).metrics_file, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record["kind"] == kind:
                records[record["step"]] = record
    return records
