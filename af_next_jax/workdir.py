"""A training run's directory: the one place that knows where each of its files lives.

    WORKDIR/
      config.json                 the run record: the experiment as loaded, the model, data and mesh as built
      checkpoints/STEP/state/     orbax: the TrainState (train/checkpointing.py)
      checkpoints/STEP/data/      the data pipeline's positions (JSON)
      corrupt_checkpoints/        unreadable steps set aside when restoring
      metrics.jsonl, tensorboard/ every step's scalars (train/metrics.py)
      train.log                   process 0's log; train.process_I.log for process I > 0
      export/                     the final parameters, a converted checkpoint (convert/orbax_io.py)
      nonfinite_step_N.npz        the batch of a run stopped by non-finite losses
      run.hold                    the running job's hold on the workdir (holder.py): one writer at a time

The trainer writes through it; `convert to-hf` / `verify`, `generate`, `evaluate` and a later
stage's `init_from` read a run through it (convert/sources.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"                    # checkpoints/STEP/state: the TrainState dict
DATA_ITEM = "data"                      # checkpoints/STEP/data: the iterator states
STATE_PARAMS = ("params",)              # where {"params": ...} sits inside the TrainState dict
EXPORT_DIR = "export"
TOKENIZER_FILE = "tokenizer.json"
HOLD_FILE = "run.hold"


class Workdir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).absolute()

    def __repr__(self) -> str:
        return f"Workdir({str(self.path)!r})"

    # ---------------------------------------------------------------- where things are

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def corrupt_checkpoints(self) -> Path:
        return self.path / "corrupt_checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def export(self) -> Path:
        return self.path / EXPORT_DIR

    def log_file(self, process_index: int) -> Path:
        return self.path / ("train.log" if process_index == 0 else f"train.process_{process_index}.log")

    def nonfinite_batch(self, step: int) -> Path:
        return self.path / f"nonfinite_step_{step}.npz"

    def step_state(self, step: int) -> Path:
        return self.checkpoints / str(step) / STATE_ITEM

    # ---------------------------------------------------------------- one writer

    @contextlib.contextmanager
    def hold(self):
        """Hold the workdir for this run, all its processes together (a collective: process 0 holds the
        file, every process learns whether it could). Raises holder.DirectoryHeld on every process when a
        live run holds it; nothing has been written then but the directory itself."""
        import jax

        from af_next_jax.holder import DirectoryHeld, Hold
        from af_next_jax.train import multihost

        self.path.mkdir(parents=True, exist_ok=True)
        hold, refusal = None, b""
        if jax.process_index() == 0:
            hold = Hold(self.path / HOLD_FILE, f"a training run of {jax.process_count()} process(es)")
            try:
                hold.acquire()
            except DirectoryHeld as error:
                hold, refusal = None, str(error).encode()
        refusal = multihost.allgather_bytes(refusal)[0]
        if refusal:
            raise DirectoryHeld(refusal.decode())
        try:
            yield hold
        finally:
            if hold is not None:
                hold.release()

    # ---------------------------------------------------------------- what is there

    @staticmethod
    def looks_like_one(path: str | os.PathLike) -> bool:
        """A run record and an export or checkpoints: what `python -m af_next_jax.train` leaves behind."""
        path = Path(path)
        return (path / CONFIG_FILE).is_file() and ((path / EXPORT_DIR).is_dir() or (path / CHECKPOINTS_DIR).is_dir())

    def has_export(self) -> bool:
        from af_next_jax.convert.orbax_io import MODEL_CONFIG_FILE

        return (self.export / MODEL_CONFIG_FILE).is_file()

    def saved_steps(self) -> list[int]:
        """Steps with a complete checkpoint (orbax renames a step's folder into place only when its save
        has finished, so half-written steps, `N.orbax-checkpoint-tmp-*`, are not listed)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit() and (p / STATE_ITEM).is_dir())

    # ---------------------------------------------------------------- the run record

    def write_record(self, record: dict) -> None:
        """config.json, atomically (a temporary file renamed into place)."""
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = self.config_file.with_name(f"{CONFIG_FILE}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        os.replace(temporary, self.config_file)

    def read_record(self) -> dict:
        from af_next_jax.convert.orbax_io import read_json_file

        return read_json_file(self.config_file, "training workdir config")

    def model_config(self):
        """The ModelConfig the run trained (config.json's "model")."""
        from af_next_jax.convert.errors import BadInputError
        from af_next_jax.convert.orbax_io import config_from_dict

        fields = self.read_record().get("model")
        if not isinstance(fields, dict):
            raise BadInputError(f"{self.config_file} has no 'model' entry (the ModelConfig that train() writes); "
                                f"is {self.path} a training workdir?")
        return config_from_dict(fields, f"{self.config_file} ('model')")

    def tokenizer(self) -> Path | None:
        """The tokenizer.json the run trained with (the record's data entry) if it still exists; None for
        runs fed injected batches. A relative path is tried as recorded, then beside the workdir."""
        try:
            data = self.read_record().get("data")
        except ValueError:
            return None
        recorded = data.get("tokenizer") if isinstance(data, dict) else None
        if not isinstance(recorded, str) or not recorded:
            return None
        for candidate in (Path(recorded), self.path / recorded, self.path.parent / recorded):
            if candidate.is_dir():
                candidate = candidate / TOKENIZER_FILE
            if candidate.is_file() and candidate.suffix in (".json", ".model"):
                return candidate
        return None
