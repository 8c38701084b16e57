"""The typed experiment: every section of an experiment file as a frozen, validated dataclass.

`experiment_from(config)` is the one boundary between the ml_collections ConfigDict of an experiment
file (config_files.py) and the code: nothing after it reads the ConfigDict.

  config.model                      -> ModelConfig (af_next_jax/config.py): preset + field overrides
  config.data                       -> DataSettings: global batch shape and sources; `.shard(...)` is
                                       one data shard's DataConfig (af_next_jax/data/pipeline.py)
  config.mesh                       -> MeshConfig (af_next_jax/parallel/mesh.py)
  config.optimizer                  -> OptimizerConfig
  stage, steps, logging, checkpoints -> TrainerConfig
  target_topology / target_slices   -> Target: the hardware `python -m af_next_jax.compile` compiles for
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from af_next_jax.config import ModelConfig, preset
from af_next_jax.parallel.mesh import MeshConfig
from af_next_jax.train.optimizer import PARAMETER_GROUPS, STAGES

MODEL_PARTS = ("encoder", "rote", "projector", "decoder")


class ExperimentError(ValueError):
    """An experiment that cannot run as configured (on these devices), with what to change. The trainer
    and the compile tool report it as one line and exit status 2."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ExperimentError(message)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay, global-norm clipping, per-group learning rates."""

    learning_rate: float = 3e-3
    warmup_steps: int = 10
    final_lr_fraction: float = 0.1     # the cosine ends at this fraction of learning_rate
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip_norm: float = 1.0        # 0 = no clipping
    lr_multipliers: tuple[tuple[str, float], ...] = ()  # (("encoder", 0.1),): a group's rate x this

    def __post_init__(self):
        _require(self.learning_rate > 0, f"optimizer.learning_rate must be positive, got {self.learning_rate}")
        _require(self.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.final_lr_fraction <= 1,
                 f"optimizer.final_lr_fraction is a fraction in [0, 1], got {self.final_lr_fraction}")
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"optimizer.b1 and b2 must lie in [0, 1), got "
                 f"{self.b1}, {self.b2}")
        _require(self.grad_clip_norm >= 0, f"optimizer.grad_clip_norm must be >= 0, got {self.grad_clip_norm}")
        unknown = sorted(set(dict(self.lr_multipliers)) - set(PARAMETER_GROUPS))
        _require(not unknown, f"optimizer.lr_multipliers has unknown groups {unknown}; valid: {PARAMETER_GROUPS}")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """What the trainer does besides the model and the data: the stage, the steps and their bookkeeping."""

    stage: str = "full"                # which groups train (STAGES)
    init_from: str = ""                # a converted checkpoint or the previous stage's workdir; "" = random
    total_steps: int = 80
    grad_accum_steps: int = 1          # micro-batches per step
    seed: int = 0
    loss_chunk_length: int = 4096      # tokens per row in one chunk of the chunked cross-entropy
    log_every: int = 10
    eval_every: int = 40               # 0 = never
    eval_batches: int = 4
    checkpoint_every: int = 20
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    export_at_end: bool = True         # write WORKDIR/export when the run finishes
    max_nonfinite_streak: int = 5      # stop after this many skipped (non-finite) steps in a row
    peak_flops_per_device: float = 0.0  # for MFU; 0 = from the device kind (train/flops.py)

    def __post_init__(self):
        _require(self.stage in STAGES, f"unknown training stage {self.stage!r}; valid stages: {sorted(STAGES)}")
        for name in ("total_steps", "grad_accum_steps", "loss_chunk_length", "log_every", "eval_batches",
                     "keep_checkpoints", "max_nonfinite_streak"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0 (0 = never), got {getattr(self, name)}")

    @property
    def trained_groups(self) -> tuple[str, ...]:
        return STAGES[self.stage]


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """config.data with paths resolved against `dir`. Batch sizes are global (every process together)."""

    train_manifests: tuple[str, ...]
    tokenizer: str
    heldout_manifest: str | None = None
    weights: tuple[float, ...] | None = None
    seq_len: int = 384
    batch_size: int = 4                # rows per micro-batch
    max_windows_per_batch: int = 8     # the static window axis of a micro-batch
    max_windows_per_audio: int | None = None  # None = the model's max_windows_per_audio
    num_workers: int = 0
    num_threads: int = 2
    seed: int = 0
    shards: int = 0                    # data shards the stream is split into; 0 = one per process (host_data.py)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "max_windows_per_batch"):
            _require(getattr(self, name) > 0, f"data.{name} must be positive, got {getattr(self, name)}")
        _require(self.max_windows_per_audio is None or self.max_windows_per_audio > 0,
                 f"data.max_windows_per_audio must be positive (or None for the model's), got "
                 f"{self.max_windows_per_audio}")
        _require(self.shards >= 0, f"data.shards must be >= 0 (0 = one per process), got {self.shards}")
        _require(self.max_windows_per_batch % self.batch_size == 0,
                 f"data.max_windows_per_batch={self.max_windows_per_batch} must be a multiple of data.batch_size="
                 f"{self.batch_size}: every row owns max_windows_per_batch / batch_size window slots (af_next_jax/"
                 f"batch.py); e.g. {-(-self.max_windows_per_batch // self.batch_size) * self.batch_size}")

    def shard(self, shard: int, num_shards: int, split: str = "train", slot_blocks: int = 1):
        """The DataConfig of data shard `shard` of `num_shards` (train/host_data.py): lines `shard::num_shards`
        of every source, `batch_size / num_shards` rows and `max_windows_per_batch / num_shards` windows,
        each row's windows in `slot_blocks` blocks (Program.slot_blocks)."""
        from af_next_jax.data import DataConfig

        for name in ("batch_size", "max_windows_per_batch"):
            _require(getattr(self, name) % num_shards == 0, f"config.data.{name}={getattr(self, name)} is global "
                     f"and must split evenly over {num_shards} data shards")
        common = dict(tokenizer=self.tokenizer, seq_len=self.seq_len, batch_size=self.batch_size // num_shards,
                      max_windows_per_batch=self.max_windows_per_batch // num_shards,
                      max_windows_per_audio=self.max_windows_per_audio, num_workers=self.num_workers,
                      num_threads=self.num_threads, seed=self.seed, process_index=shard, process_count=num_shards,
                      slot_blocks=slot_blocks)
        if split == "train":
            return DataConfig(manifests=self.train_manifests, weights=self.weights, **common)
        if split == "heldout":
            _require(self.heldout_manifest is not None, "the experiment has no data.heldout_manifest")
            return DataConfig(manifests=(self.heldout_manifest,), shuffle=False, num_epochs=1, **common)
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


@dataclasses.dataclass(frozen=True)
class Target:
    """The hardware an experiment is meant for: a Cloud TPU slice name (v5p-256, ...) and its slices."""

    topology: str = ""                 # "" = none declared (GPU meshes cannot be compiled on a CPU host)
    slices: int = 1


@dataclasses.dataclass(frozen=True)
class Experiment:
    model: ModelConfig
    data: DataSettings
    mesh: MeshConfig
    optimizer: OptimizerConfig
    trainer: TrainerConfig
    target: Target
    source: Any = dataclasses.field(default=None, compare=False)  # the ConfigDict it came from (config.json)

    def replace(self, **changes) -> "Experiment":
        return dataclasses.replace(self, **changes)


def model_config_from(model_section, tokenizer_ids: dict | None = None) -> ModelConfig:
    """`config.model`: `preset` plus field overrides; `encoder`/`decoder`/... sub-dicts override parts.

    `config.model.rote = None` switches RoTE off: the preset's model without rotary time embeddings,
    i.e. the Audio Flamingo 3 architecture (which also drops the <|sound_bos|>/<|sound_eos|> markers
    around each audio, data/conversation.py). notebooks/rote_ablation.ipynb trains the tiny model both ways.
    """
    fields = dict(model_section.to_dict() if hasattr(model_section, "to_dict") else model_section)
    model = preset(fields.pop("preset"))
    parts = {}
    if "rote" in fields and fields["rote"] is None:
        parts["rote"] = fields.pop("rote")
    for part in MODEL_PARTS:
        changes = fields.pop(part, None)
        if changes:
            current = getattr(model, part)
            if current is None:
                raise ValueError(f"config.model.{part} overrides a part that preset has disabled (None)")
            parts[part] = dataclasses.replace(current, **dict(changes))
    model = model.replace(**parts, **fields)
    if tokenizer_ids:
        model = model.replace(**tokenizer_ids)
    return model


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) or not base else os.path.join(base, path)


def _section(config: ml_collections.ConfigDict, name: str) -> dict:
    section = config.get(name)
    return dict(section.to_dict() if hasattr(section, "to_dict") else section or {})


def _fields_of(cls, values: dict, where: str) -> dict:
    """`values` restricted to `cls`'s fields; an unknown key is an error naming the valid ones."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _require(not unknown, f"{where}: unknown keys {unknown}; valid keys: {sorted(known)}")
    return values


def data_settings_from(section: dict) -> DataSettings:
    section = dict(section)
    base = section.pop("dir", "")
    heldout = section.pop("heldout_manifest", None)
    section["train_manifests"] = tuple(_resolve(base, m) for m in section.get("train_manifests", ()))
    section["tokenizer"] = _resolve(base, section.get("tokenizer", ""))
    section["weights"] = tuple(section["weights"]) if section.get("weights") else None
    return DataSettings(heldout_manifest=_resolve(base, heldout) if heldout else None,
                        **_fields_of(DataSettings, section, "config.data"))


def tokenizer_ids(config: ml_collections.ConfigDict, *, required: bool = True) -> dict | None:
    """The audio token ids of the experiment's tokenizer (`Tokenizer.model_config_ids()`), which the model
    takes in place of the preset's when it trains on that data. Not `required`: None when the file is
    not on this host (compiling for a target whose data lives elsewhere keeps the preset's ids)."""
    path = data_settings_from(_section(config, "data")).tokenizer
    if not required and not os.path.exists(path):
        return None
    from af_next_jax.data import load_tokenizer

    return load_tokenizer(path).model_config_ids()


TRAINER_KEYS = tuple(field.name for field in dataclasses.fields(TrainerConfig))


def experiment_from(config: ml_collections.ConfigDict, tokenizer_ids: dict | None = None) -> Experiment:
    """The typed Experiment of an experiment file's ConfigDict; `tokenizer_ids` (the audio token ids of
    the tokenizer the data uses, `Tokenizer.model_config_ids()`) replace the preset's."""
    try:
        return _experiment_from(config, tokenizer_ids)
    except ExperimentError:
        raise
    except (ValueError, TypeError) as error:  # a section's own validation (ModelConfig, MeshConfig, ...)
        raise ExperimentError(str(error)) from None


def _experiment_from(config, tokenizer_ids):
    optimizer = _section(config, "optimizer")
    optimizer["lr_multipliers"] = tuple(sorted(dict(optimizer.get("lr_multipliers") or {}).items()))
    known_top = set(TRAINER_KEYS) | {"model", "data", "mesh", "optimizer", "target_topology", "target_slices"}
    unknown = sorted(set(config.keys()) - known_top)
    _require(not unknown, f"experiment config: unknown top-level keys {unknown}; valid: {sorted(known_top)}")
    return Experiment(
        model=model_config_from(config.model, tokenizer_ids),
        data=data_settings_from(_section(config, "data")),
        mesh=MeshConfig(**_section(config, "mesh")),
        optimizer=OptimizerConfig(**_fields_of(OptimizerConfig, optimizer, "config.optimizer")),
        trainer=TrainerConfig(**{key: config[key] for key in TRAINER_KEYS if key in config}),
        target=Target(config.get("target_topology", ""), config.get("target_slices", 1)),
        source=config)
