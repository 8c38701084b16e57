"""Experiment configs: load `experiments/NAME.py[:ARG]`, apply `--config.key=value`, build typed configs.

An experiment file defines `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision style).
The ConfigDict is plain data; this module turns its sections into the typed, validated dataclasses
the rest of the code uses:

  config.model     preset name + overrides      -> af_next_jax.config.ModelConfig
  config.data      manifests, tokenizer, shapes -> af_next_jax.data.DataConfig (train and held-out)
  config.mesh      axis sizes                   -> af_next_jax.parallel.MeshConfig
  config.optimizer lr, schedule, clipping, ...  -> af_next_jax.train.optimizer
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import sys

import ml_collections

from af_next_jax.config import ModelConfig, preset

MODEL_PARTS = ("encoder", "rote", "projector", "decoder")


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """`spec` is `path/to/file.py` or `path/to/file.py:arg`; overrides are `key.sub=value` strings."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"experiment config {path!r} does not exist (expected experiments/NAME.py)")
    module_spec = importlib.util.spec_from_file_location(f"experiment_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    # Experiment files share pieces through experiments/common.py: import it from beside the file.
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    config = module.get_config(arg or None)
    for override in overrides:
        apply_override(config, override)
    return config


def _parse_value(text: str, current):
    """A Python literal typed like `current` (strings stay raw text when the current value is a string)."""
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"expected True or False, got {text!r}")
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Set `a.b.c=value`; the value is parsed as a Python literal, typed like the current value."""
    key, separator, text = override.partition("=")
    key = key.removeprefix("--").removeprefix("config.")
    if not separator:
        raise ValueError(f"override {override!r} must look like --config.key=value")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        if name not in node:
            raise KeyError(f"--config.{key}: no section {name!r}; sections here: {sorted(node.keys())}")
        node = node[name]
    if leaf not in node:
        raise KeyError(f"--config.{key}: unknown key {leaf!r}; keys here: {sorted(node.keys())}")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(f"--config.{key} is a section; set one of its keys {sorted(current.keys())}")
    with node.ignore_type():
        node[leaf] = _parse_value(text, current)


def model_config_from(config: ml_collections.ConfigDict, tokenizer_ids: dict | None = None) -> ModelConfig:
    """`config.model`: `preset` plus field overrides; `encoder`/`decoder`/... sub-dicts override parts.

    `config.model.rote = None` switches RoTE off: the preset's model without rotary time embeddings,
    i.e. the Audio Flamingo 3 architecture (which also drops the <|sound_bos|>/<|sound_eos|> markers
    around each audio, data/conversation.py). notebooks/rote_ablation.ipynb trains the tiny model both ways.
    """
    fields = dict(config.model.to_dict() if hasattr(config.model, "to_dict") else config.model)
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


def resolve_path(base: str, path: str) -> str:
    return path if os.path.isabs(path) or not base else os.path.join(base, path)


def process_count() -> int:
    import jax

    return jax.process_count()


def data_config_from(config: ml_collections.ConfigDict, split: str = "train", *, shard: int | None = None,
                     num_shards: int | None = None):
    """DataConfig of the training mixture (`split="train"`) or the held-out manifest (`"heldout"`).

    `config.data.batch_size` and `max_windows_per_batch` are global. By default the result is this
    process's part of them (its share of the stream, `jax.process_index()` of `jax.process_count()`);
    with `shard`/`num_shards` it is data shard `shard` of `num_shards` (train/host_data.py).
    """
    from af_next_jax.data import DataConfig

    data = config.data
    if num_shards is None:
        hosts, index = process_count(), None
        what = f"{hosts} hosts"
    else:
        hosts, index = num_shards, shard
        what = f"{num_shards} data shards"
    for name in ("batch_size", "max_windows_per_batch"):
        if data[name] % hosts:
            raise ValueError(f"config.data.{name}={data[name]} is global and must split evenly over {what}")
    common = dict(tokenizer=resolve_path(data.dir, data.tokenizer), seq_len=data.seq_len,
                  batch_size=data.batch_size // hosts, max_windows_per_batch=data.max_windows_per_batch // hosts,
                  num_workers=data.num_workers, num_threads=data.num_threads, seed=data.seed,
                  max_windows_per_audio=data.get("max_windows_per_audio") or None,
                  process_index=index, process_count=None if index is None else hosts)
    if split == "train":
        return DataConfig(manifests=tuple(resolve_path(data.dir, m) for m in data.train_manifests),
                          weights=tuple(data.weights) if data.get("weights") else None, **common)
    if split == "heldout":
        return DataConfig(manifests=(resolve_path(data.dir, data.heldout_manifest),), shuffle=False, num_epochs=1,
                          **common)
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def mesh_config_from(config: ml_collections.ConfigDict):
    from af_next_jax.parallel import MeshConfig

    return MeshConfig(**config.mesh.to_dict())
