"""What `to-hf --checkpoint PATH [--step N]` and `verify --checkpoint PATH [--step N]` read.

PATH is one of:
  a converted checkpoint  PATH/model_config.json + PATH/params (what `from-hf` writes);
  a training workdir      PATH/config.json (written by `python -m af_next_jax.train`, its "model" entry
                          is the ModelConfig) + PATH/export and/or PATH/checkpoints/STEP/state:
    without --step: the run's final export, PATH/export (already in the converted layout);
    --step N:       the saved training checkpoint PATH/checkpoints/N/state (orbax, the TrainState
                    dict); only its parameters are read, straight to host memory, whatever mesh
                    saved them. A stopped or preempted run is exported this way.
  A workdir without an export (the run has not finished) needs --step: the error lists the saved
  steps.
The model's tokenizer, for the processor files of `to-hf` (hf_processor.py): PATH/tokenizer.json
(from-hf --preset), PATH/hf_tokenizer/ (from-hf --hf-dir keeps the repository's files), or the
tokenizer.json a training workdir's run used (its config.json "data" entry). We do not pick the newest step silently: a running job keeps adding steps, and `to-hf`
  and a later `verify` of the same command line must read the same parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from af_next_jax.config import ModelConfig
from af_next_jax.convert import orbax_io
from af_next_jax.convert.errors import BadInputError

WORKDIR_CONFIG_FILE = "config.json"     # train() writes {"experiment", "model", "mesh", "devices", "data"}
EXPORT_DIR = "export"
CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"                    # as in train/checkpointing.py: the step's TrainState dict (orbax)
STATE_PARAMS = ("params",)              # where {"params": ...} sits inside the TrainState dict
TOKENIZER_FILE = "tokenizer.json"       # from-hf --preset writes CKPT/tokenizer.json
HF_TOKENIZER_DIR = "hf_tokenizer"       # from-hf --hf-dir: the source's tokenizer and processor files


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model to read: its config, and where its {"params": ...} tree sits in which orbax checkpoint."""
    description: str                    # for messages: what was read, and from where
    config: ModelConfig
    params_path: Path                   # an orbax PyTree checkpoint directory
    root: tuple[str, ...] = ()          # path of the {"params": ...} subtree inside it
    info: dict = dataclasses.field(default_factory=dict)  # conversion.json of a converted checkpoint
    # The model's tokenizer.json, where one is known: CKPT/tokenizer.json (from-hf writes it), else the
    # tokenizer a training workdir was trained with (its config.json "data"); None: unknown.
    tokenizer: Path | None = None
    # Tokenizer / processor files `from-hf --hf-dir` kept from the source repository (copied back as they are).
    tokenizer_dir: Path | None = None

    def parameter_shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
        """{path inside "params": shape}, from the checkpoint's metadata (no array data read)."""
        return orbax_io.tree_shapes(orbax_io.tree_metadata(self.params_path, self.root))

    def load_params(self) -> dict:
        """The whole {"params": ...} tree as numpy arrays in host memory."""
        return orbax_io.restore_numpy(self.params_path, self.root)

    def open_params(self) -> contextlib.AbstractContextManager:
        """A context manager yielding a lazy {"params": ...} view (one array restored at a time)."""
        return orbax_io.open_tree(self.params_path, self.root)


def resolve(checkpoint: str | os.PathLike, step: int | None = None) -> ModelSource:
    """The ModelSource that `--checkpoint checkpoint [--step step]` names (see the module docstring)."""
    path = Path(checkpoint)
    if (path / orbax_io.MODEL_CONFIG_FILE).is_file():
        if step is not None:
            raise BadInputError(f"--step {step}: {path} is a converted checkpoint (it has "
                                f"{orbax_io.MODEL_CONFIG_FILE}), not a training workdir; drop --step")
        # WORKDIR/export named directly: the run's tokenizer still belongs to it.
        parent_is_workdir = path.name == EXPORT_DIR and (path.parent / WORKDIR_CONFIG_FILE).is_file()
        return converted_checkpoint(path, tokenizer=workdir_tokenizer(path.parent) if parent_is_workdir else None)
    if (path / WORKDIR_CONFIG_FILE).is_file() and ((path / EXPORT_DIR).is_dir() or (path / CHECKPOINTS_DIR).is_dir()):
        return training_workdir(path, step)
    for step_folder in (path, path.parent):  # WORKDIR/checkpoints/N or WORKDIR/checkpoints/N/state
        if step_folder.name.isdigit() and step_folder.parent.name == CHECKPOINTS_DIR:
            raise BadInputError(f"{path} is inside a training checkpoint; pass the workdir and the step: "
                                f"--checkpoint {step_folder.parent.parent} --step {step_folder.name}")
    raise BadInputError(
        f"{path} is neither a converted checkpoint ({orbax_io.MODEL_CONFIG_FILE} + params/, written by "
        f"`python -m af_next_jax.convert from-hf`) nor a training workdir ({WORKDIR_CONFIG_FILE} + export/ or "
        f"checkpoints/, written by `python -m af_next_jax.train`)")


def converted_checkpoint(path: Path, description: str | None = None, tokenizer: Path | None = None) -> ModelSource:
    own, kept = path / TOKENIZER_FILE, path / HF_TOKENIZER_DIR
    return ModelSource(description or f"converted checkpoint {path}", orbax_io.load_config(path),
                       orbax_io.params_path(path), (), orbax_io.load_conversion_info(path),
                       own if own.is_file() else tokenizer, kept if kept.is_dir() else None)


def workdir_tokenizer(workdir: Path) -> Path | None:
    """The tokenizer.json the run in `workdir` trained with (train() records its data config), if it
    still exists; None for runs fed injected batches."""
    data = orbax_io.read_json_file(workdir / WORKDIR_CONFIG_FILE, "training workdir config").get("data")
    path = Path(data["tokenizer"]) if isinstance(data, dict) and data.get("tokenizer") else None
    if path is not None and path.is_dir():
        path = path / TOKENIZER_FILE
    return path if path is not None and path.is_file() and path.suffix == ".json" else None


def saved_steps(workdir: Path) -> list[int]:
    """Steps with a complete training checkpoint (orbax renames a step's folder into place only when
    its save has finished, so half-written steps, `N.orbax-checkpoint-tmp-*`, are not listed)."""
    folder = workdir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / STATE_ITEM).is_dir())


def training_workdir(workdir: Path, step: int | None) -> ModelSource:
    steps = saved_steps(workdir)
    if step is None:
        export = workdir / EXPORT_DIR
        if (export / orbax_io.MODEL_CONFIG_FILE).is_file():
            return converted_checkpoint(export, f"final export {export} of training workdir {workdir}",
                                        workdir_tokenizer(workdir))
        raise BadInputError(f"training workdir {workdir} has no final export ({export}: the run has not "
                            f"finished); export a saved training step with --step N. {_steps_phrase(steps)}")
    if step not in steps:
        raise BadInputError(f"--step {step}: training workdir {workdir} has no saved checkpoint at step {step}. "
                            f"{_steps_phrase(steps)}")
    config_path = workdir / WORKDIR_CONFIG_FILE
    fields = orbax_io.read_json_file(config_path, "training workdir config").get("model")
    if not isinstance(fields, dict):
        raise BadInputError(f"{config_path} has no 'model' entry (the ModelConfig that train() writes); "
                            f"is {workdir} a training workdir?")
    config = orbax_io.config_from_dict(fields, f"{config_path} ('model')")
    state = workdir / CHECKPOINTS_DIR / str(step) / STATE_ITEM
    return ModelSource(f"training step {step} of workdir {workdir} ({state})", config, state.absolute(),
                       STATE_PARAMS, {"source": "af_next_jax.train", "workdir": str(workdir.absolute()), "step": step},
                       workdir_tokenizer(workdir))


def _steps_phrase(steps: list[int]) -> str:
    if not steps:
        return "It has no saved training checkpoints yet (checkpoints/STEP/state)."
    return f"Saved steps: {', '.join(map(str, steps))}."
