"""Experiment files: load `experiments/NAME.py[:ARG]` and apply `--config.key=value` overrides.

An experiment file defines `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision style):
plain data, overridable from the command line. settings.py turns it into typed, validated
dataclasses (`experiment_from`), the only form the rest of the code reads.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys

import ml_collections


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
