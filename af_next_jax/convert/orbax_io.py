"""Our converted checkpoint on disk: an orbax checkpoint of the parameters + the ModelConfig as JSON.

Layout of a checkpoint directory CKPT (what `convert from-hf` writes and `to-hf`/`verify` read):

  CKPT/params/            orbax PyTree checkpoint {"params": {"encoder", "projector", "decoder"}}: float32,
                          layers stacked on axis 0 (the nn.scan layout); plain zarr (not OCDBT), 32 MiB
                          chunks. Any orbax reader restores it (StandardCheckpointer, CheckpointManager
                          items, or `load_params` here).
  CKPT/model_config.json  our ModelConfig (dataclasses as nested dicts), so later commands need no flags
  CKPT/conversion.json    where the weights came from: source directories, the source dtype (the default
                          dtype of `to-hf`) and the source's generation_config.json, if any

Directories are written under a temporary sibling and renamed into place at the end, so a failed
conversion never leaves a partial CKPT (or HF directory) behind. A full disk there (disk_space.py)
removes the partial directory, keeps the previous one, and raises `DiskFull` naming what was needed.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from af_next_jax.config import (DecoderConfig, EncoderConfig, ModelConfig, ProjectorConfig, RoteConfig,
                                drop_stored_legacy_attention)
from af_next_jax.convert.errors import BadInputError, config_from_fields
from af_next_jax.disk_space import DiskFull, disk_full_error, format_bytes, is_disk_full

PARAMS_DIR = "params"
MODEL_CONFIG_FILE = "model_config.json"
CONVERSION_FILE = "conversion.json"
CHUNK_BYTES = 32 * 2**20  # one zarr chunk file; bounds the memory tensorstore holds while writing
# XLA's CPU client aliases (does not copy) host buffers with this alignment.
HOST_ALIGNMENT = 64

_PART_CLASSES = {"encoder": EncoderConfig, "rote": RoteConfig, "projector": ProjectorConfig,
                 "decoder": DecoderConfig}


def config_to_dict(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(fields: dict, where: str = "model config") -> ModelConfig:
    """Inverse of `config_to_dict`; unknown fields are an error (a config written by a newer version).
    `where` names the file in the error messages."""
    try:  # configs stored by earlier versions carry the removed attention_implementation
        fields = drop_stored_legacy_attention(fields)
    except ValueError as error:
        raise BadInputError(f"{where}: {error}") from None
    known = {field.name for field in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BadInputError(f"{where}: unknown model config fields {unknown}; known fields: {sorted(known)}")

    def build() -> ModelConfig:
        for name, cls in _PART_CLASSES.items():
            if fields.get(name) is not None:
                fields[name] = cls(**fields[name])
        return ModelConfig(**fields)

    return config_from_fields(build, where)


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from `path`; a missing or malformed file is bad input, named with `what`."""
    if not path.is_file():
        raise BadInputError(f"{what} not found: {path}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside `out`; on success it is renamed to `out`, on error removed.
    `out` is held meanwhile (holder.py): a second conversion onto it stops naming this one."""
    from af_next_jax.holder import DirectoryHeld, Hold

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        hold = Hold(out.parent / f".{out.name}.hold", f"a conversion writing {out}", target=out)
        hold.acquire()
    except DirectoryHeld as error:
        raise BadInputError(str(error)) from None
    try:
        with _staged(out, overwrite) as staging:
            yield staging
    finally:
        hold.release()


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool):
    if out.exists() and not overwrite:
        raise BadInputError(f"output {out} already exists; choose another path or pass --overwrite")
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if out.exists():  # overwrite: move the old one aside first so the swap is quick
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except Exception as error:
        if isinstance(error, DiskFull) or not is_disk_full(error):
            raise
        # The total is not known here (the writer streams it); what was written is a lower bound.
        written = checkpoint_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)
        kept = f"{out} was left as it was" if out.exists() else f"nothing was written to {out}"
        raise disk_full_error(out.name, out.parent, f"more than the {format_bytes(written)} written before the "
                              f"disk filled", f"The partial output was removed and {kept}; free space there and "
                              f"run the same command again.") from error
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """np.empty whose data starts on a HOST_ALIGNMENT boundary, so jax.device_put on CPU can alias it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + HOST_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def save_checkpoint(directory: str | os.PathLike, params: dict, config: ModelConfig,
                    conversion: dict | None = None) -> None:
    """Write params + config into an existing, empty `directory` (use inside `atomic_directory`).
    One process; `export_checkpoint` is the same writer for a run's sharded parameters."""
    _save_params(Path(directory).absolute(), params)
    _write_metadata(Path(directory).absolute(), config, conversion)


def export_checkpoint(out: str | os.PathLike, params: dict, config: ModelConfig, conversion: dict) -> Path:
    """`save_checkpoint` for parameters sharded over the devices of several processes (a run's export).

    A collective: every process calls it. Each writes its own shards of the parameters into one orbax
    checkpoint, so nothing is gathered onto one host; process 0 writes the JSON files and swaps the
    new checkpoint into place (the old one stays readable until then)."""
    import jax

    from af_next_jax.train import multihost

    out = Path(out).absolute()
    staging = out.parent / f".{out.name}.partial"
    primary = jax.process_index() == 0
    if primary:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    multihost.barrier("af_next_export_staging")
    failure = None
    try:
        _save_params(staging, params)
        if primary:
            _write_metadata(staging, config, conversion)
    except Exception as error:  # noqa: BLE001 -- only a full disk is handled; anything else re-raised
        if not is_disk_full(error):
            raise
        failure = error
    if multihost.agree_any(failure is not None):  # every process stops, the previous export untouched
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
        needed = sum(int(np.prod(leaf.shape)) * 4 for leaf in jax.tree.leaves(params))  # written as float32
        kept = f"the previous {out.name}/ is intact" if out.exists() else f"no {out.name}/ was written"
        raise disk_full_error(f"the export {out}", out.parent, f"about {format_bytes(needed)}",
                              f"The partial export was removed and {kept}; every checkpoint is complete, so after "
                              f"freeing space the same command resumes at the last step and only exports.") from failure
    if primary:
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    multihost.barrier("af_next_export_done")
    return out


def _save_params(directory: Path, params: dict) -> None:
    """CKPT/params: float32, plain zarr with bounded chunks.

    Peak host memory while saving host (numpy) parameters, measured (benchmarks/convert_memory.py):
    orbax copies numpy leaves (+1x the model) but not CPU jax arrays, and device_put of a
    64-byte-aligned numpy array to the CPU aliases it (`aligned_empty`); OCDBT buffers all encoded data
    until its commit (+~1x), plain zarr with bounded chunks writes chunk by chunk (+ a few chunks).
    Restoring reads either layout. Device (jax) arrays are cast on their devices and written shard by
    shard by the processes that hold them."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    # Host arrays go to the CPU device explicitly: on a GPU host the default device would copy the model there.
    cpu = jax.devices("cpu")[0]
    params = jax.tree.map(lambda x: (x if x.dtype == jnp.float32 else x.astype(jnp.float32))
                          if isinstance(x, jax.Array) else jax.device_put(x, cpu), params)
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params, save_args=save_args)


def _write_metadata(directory: Path, config: ModelConfig, conversion: dict | None) -> None:
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    (directory / CONVERSION_FILE).write_text(json.dumps(conversion or {}, indent=2) + "\n")


def load_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise BadInputError(f"{directory} is not a converted checkpoint: {MODEL_CONFIG_FILE} is missing "
                            f"(write one with `python -m af_next_jax.convert from-hf`)")
    return config_from_dict(read_json_file(path, MODEL_CONFIG_FILE), str(path))


def load_conversion_info(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONVERSION_FILE
    return read_json_file(path, CONVERSION_FILE) if path.is_file() else {}


def params_path(directory) -> Path:
    """CKPT/params of a converted checkpoint (an orbax PyTree checkpoint)."""
    path = Path(directory).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise BadInputError(f"{directory} has no orbax parameters at {path}")
    return path


# Reading an orbax PyTree checkpoint: a converted checkpoint's CKPT/params ({"params": ...} at the
# root), or a training checkpoint's STEP/state (the TrainState dict, {"params": ...} under "params").
# `root` is the path of the {"params": ...} subtree. Leaves are restored as numpy arrays in host memory:
# a numpy restore ignores the shardings the arrays were saved with, so a checkpoint written by any
# mesh (8 GPUs, a TPU pod) reads on any host with any device count, and nothing outside `root` (a
# training state's optimizer moments) is read.

def tree_metadata(path: Path, root: tuple[str, ...] = ()) -> dict:
    """The metadata (shapes, dtypes; no array data) of the subtree at `root`."""
    import orbax.checkpoint as ocp
    # The handler's own metadata, not Checkpointer.metadata: that also looks for the step metadata file,
    # which a training step keeps one folder up (STEP/, not STEP/state/), and warns when it is absent.
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return _subtree(handler.metadata(path).tree, root, path)
    finally:
        handler.close()


def _subtree(tree, root: tuple[str, ...], path: Path):
    for name in root:
        if not isinstance(tree, collections.abc.Mapping) or name not in tree:
            raise BadInputError(f"{path}: the orbax checkpoint has no {'/'.join(root)!r} subtree")
        tree = tree[name]
    return tree


def _nested(root: tuple[str, ...], value):
    for name in reversed(root):
        value = {name: value}
    return value


def restore_numpy(path: Path, root: tuple[str, ...] = ()) -> dict:
    """The subtree at `root`, every leaf a numpy array in host memory."""
    import jax
    import orbax.checkpoint as ocp
    tree = tree_metadata(path, root)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        if not root:
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=_nested(root, jax.tree.map(lambda _: np.zeros(0), tree)),
            restore_args=_nested(root, restore_args), partial_restore=True))
        return _subtree(restored, root, path)


def tree_shapes(tree: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path inside "params": shape} of a {"params": ...} metadata tree."""
    import jax
    flat = jax.tree_util.tree_flatten_with_path(tree.get("params", {}))[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_params(directory: str | os.PathLike) -> dict:
    """The whole {"params": ...} tree of a converted checkpoint as float32 numpy arrays (no device memory)."""
    return restore_numpy(params_path(directory))


def parameter_shapes(directory: str | os.PathLike) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path inside "params": shape} from a converted checkpoint's metadata; reads no array data."""
    return tree_shapes(tree_metadata(params_path(directory)))


class LazyParams(collections.abc.Mapping):
    """A read-only {"params": ...} view of a checkpoint that restores a leaf only when it is indexed,
    so an exporter holds one stacked array at a time instead of the whole model. `prefix` is where
    `node` sits in the checkpoint's tree."""

    def __init__(self, checkpointer, path: Path, node: dict, prefix: tuple[str, ...] = ()):
        self._checkpointer, self._path, self._node, self._prefix = checkpointer, path, node, prefix

    def __getitem__(self, name):
        child = self._node[name]
        if isinstance(child, collections.abc.Mapping):
            return LazyParams(self._checkpointer, self._path, child, self._prefix + (name,))
        return self._restore_leaf(self._prefix + (name,))

    def __iter__(self):
        return iter(self._node)

    def __len__(self):
        return len(self._node)

    def __contains__(self, name):
        return name in self._node

    def _restore_leaf(self, path: tuple[str, ...]) -> np.ndarray:
        import orbax.checkpoint as ocp
        restored = self._checkpointer.restore(self._path, args=ocp.args.PyTreeRestore(
            item=_nested(path, np.zeros(0)), restore_args=_nested(path, ocp.RestoreArgs(restore_type=np.ndarray)),
            partial_restore=True))
        for name in path:
            restored = restored[name]
        return restored


@contextlib.contextmanager
def open_tree(path: Path, root: tuple[str, ...] = ()):
    """Yield a LazyParams over the subtree at `root` of the orbax checkpoint at `path`."""
    import orbax.checkpoint as ocp
    tree = tree_metadata(path, root)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        yield LazyParams(checkpointer, path, tree, root)


def open_params(directory: str | os.PathLike):
    """A context manager yielding a LazyParams over a converted checkpoint's parameters."""
    return open_tree(params_path(directory))


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
