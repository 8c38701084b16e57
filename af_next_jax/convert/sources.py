"""Where a model is: what `--checkpoint PATH [--step N]` names, for `to-hf`, `verify`, `generate`,
`evaluate` and a stage's `init_from`.

PATH is one of:
  a converted checkpoint  PATH/model_config.json + PATH/params (what `from-hf` writes, and a run's export);
  a training workdir      read through af_next_jax/workdir.py:
    without --step: the run's final export, WORKDIR/export;
    --step N:       the saved training checkpoint WORKDIR/checkpoints/N/state (the TrainState dict); only
                    its parameters are read, straight to host memory, whatever mesh saved them. A
                    stopped or preempted run is exported this way.
  A workdir without an export (the run has not finished) needs --step: the error lists the saved
  steps. We do not pick the newest step silently: a running job keeps adding steps, and `to-hf` and a
  later `verify` of the same command line must read the same parameters.
The model's tokenizer: PATH/tokenizer.json (from-hf --preset), PATH/hf_tokenizer/ (from-hf --hf-dir keeps
the repository's files), or the tokenizer the training run used (the workdir's run record).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from af_next_jax.config import ModelConfig
from af_next_jax.convert import orbax_io
from af_next_jax.convert.errors import BadInputError
from af_next_jax.workdir import EXPORT_DIR, STATE_PARAMS, Workdir

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
    # The model's tokenizer (tokenizer.json or a SentencePiece .model), where one is known:
    # CKPT/tokenizer.json (from-hf writes it), else the one a training run was trained with; None: unknown.
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
        parent_is_workdir = path.name == EXPORT_DIR and Workdir.looks_like_one(path.parent)
        return converted_checkpoint(path, tokenizer=Workdir(path.parent).tokenizer() if parent_is_workdir else None)
    if Workdir.looks_like_one(path):
        return training_workdir(Workdir(path), step)
    for step_folder in (path, path.parent):  # WORKDIR/checkpoints/N or WORKDIR/checkpoints/N/state
        if step_folder.name.isdigit() and Workdir.looks_like_one(step_folder.parent.parent):
            raise BadInputError(f"{path} is inside a training checkpoint; pass the workdir and the step: "
                                f"--checkpoint {step_folder.parent.parent} --step {step_folder.name}")
    raise BadInputError(
        f"{path} is neither a converted checkpoint ({orbax_io.MODEL_CONFIG_FILE} + params/, written by "
        f"`python -m af_next_jax.convert from-hf`) nor a training workdir (config.json + export/ or "
        f"checkpoints/, written by `python -m af_next_jax.train`)")


def converted_checkpoint(path: Path, description: str | None = None, tokenizer: Path | None = None) -> ModelSource:
    own, kept = path / TOKENIZER_FILE, path / HF_TOKENIZER_DIR
    return ModelSource(description or f"converted checkpoint {path}", orbax_io.load_config(path),
                       orbax_io.params_path(path), (), orbax_io.load_conversion_info(path),
                       own if own.is_file() else tokenizer, kept if kept.is_dir() else None)


def training_workdir(workdir: Workdir, step: int | None) -> ModelSource:
    steps = workdir.saved_steps()
    if step is None:
        if workdir.has_export():
            return converted_checkpoint(workdir.export, f"final export {workdir.export} of training workdir "
                                        f"{workdir.path}", workdir.tokenizer())
        raise BadInputError(f"training workdir {workdir.path} has no final export ({workdir.export}: the run has "
                            f"not finished); export a saved training step with --step N. {_steps_phrase(steps)}")
    if step not in steps:
        raise BadInputError(f"--step {step}: training workdir {workdir.path} has no saved checkpoint at step "
                            f"{step}. {_steps_phrase(steps)}")
    state = workdir.step_state(step)
    return ModelSource(f"training step {step} of workdir {workdir.path} ({state})", workdir.model_config(), state,
                       STATE_PARAMS, {"source": "af_next_jax.train", "workdir": str(workdir.path), "step": step},
                       workdir.tokenizer())


def _steps_phrase(steps: list[int]) -> str:
    if not steps:
        return "It has no saved training checkpoints yet (checkpoints/STEP/state)."
    return f"Saved steps: {', '.join(map(str, steps))}."
