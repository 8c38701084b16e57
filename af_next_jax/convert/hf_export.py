"""Write our parameters as a transformers directory: config.json, sharded safetensors + index,
generation_config.json and (optionally) the tokenizer files.

Shards are planned from shapes alone (huggingface_hub's splitter), every shard's header is written
first, then each tensor is converted and appended to its shard as it is produced, so the only extra
host memory is one tensor. The file format (safetensors): little-endian u64 header length, a JSON
header {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded with
spaces to a multiple of 8, then the raw little-endian tensor bytes, back to back.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from huggingface_hub import split_state_dict_into_shards_factory

from af_next_jax.config import ModelConfig
from af_next_jax.convert.checks import expected_shapes
from af_next_jax.convert.hf_config import to_hf_config
from af_next_jax.convert.hf_import import CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE
from af_next_jax.convert.mapping import model_rules, tensors_from_params
from af_next_jax.convert.errors import BadInputError

EXPORT_DTYPES = {"float32": (np.dtype(np.float32), "F32"), "bfloat16": (np.dtype(ml_dtypes.bfloat16), "BF16"),
                 "float16": (np.dtype(np.float16), "F16")}
# Files a tokenizer / processor directory may hold; weights and config.json are never copied.
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                      "*.tiktoken", "*.model", "chat_template*", "preprocessor_config.json",
                      "processor_config.json")


def hf_tensor_specs(config: ModelConfig, dtype: str) -> dict[str, jax.ShapeDtypeStruct]:
    """Key -> transformers shape and dtype of every tensor, in the order `tensors_from_params` yields;
    from the config alone (abstract shapes, no memory)."""
    np_dtype = EXPORT_DTYPES[dtype][0]
    shapes = expected_shapes(config)
    specs = {}
    for rule in model_rules(config):
        per_tensor = shapes[rule.path][1:] if rule.num_layers else shapes[rule.path]
        shape = jax.eval_shape(rule.to_hf, jax.ShapeDtypeStruct(per_tensor, np.float32)).shape
        for key in rule.hf_keys():
            specs[key] = jax.ShapeDtypeStruct(shape, np_dtype)
    return specs


def _nbytes(spec: jax.ShapeDtypeStruct) -> int:
    return int(np.prod(spec.shape)) * spec.dtype.itemsize


def plan_shards(specs: dict[str, jax.ShapeDtypeStruct], max_shard_size: int | str) -> dict[str, list[str]]:
    """Shard file name -> keys, always named model-0000i-of-0000K.safetensors (one shard included)."""
    try:
        split = split_state_dict_into_shards_factory(specs, get_storage_size=_nbytes, max_shard_size=max_shard_size,
                                                     filename_pattern="model{suffix}.safetensors")
    except ValueError as error:
        raise BadInputError(f"--max-shard-size {max_shard_size!r}: {error} (use e.g. 5GB or 500MB)") from None
    groups = list(split.filename_to_tensors.values())
    return {f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors": keys for i, keys in enumerate(groups)}


def _header_bytes(keys: list[str], specs: dict[str, jax.ShapeDtypeStruct], safetensors_dtype: str) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in keys:
        end = offset + _nbytes(specs[key])
        header[key] = {"dtype": safetensors_dtype, "shape": list(specs[key].shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def write_weights(directory: Path, params, config: ModelConfig, dtype: str, max_shard_size: int | str,
                  progress: bool = True) -> dict:
    """Stream every tensor into its shard; write model.safetensors.index.json; return the index.

    `params` is {"params": ...} of arrays, or an `orbax_io.LazyParams` that restores one stacked array
    when it is first needed: then peak memory is one stacked array plus one tensor, not the model."""
    from tqdm import tqdm
    if dtype not in EXPORT_DTYPES:
        raise BadInputError(f"--dtype {dtype!r} is not supported; choose one of {sorted(EXPORT_DTYPES)}")
    np_dtype, safetensors_dtype = EXPORT_DTYPES[dtype]
    specs = hf_tensor_specs(config, dtype)
    shards = plan_shards(specs, max_shard_size)
    file_of = {key: name for name, keys in shards.items() for key in keys}
    pending = {name: list(reversed(keys)) for name, keys in shards.items()}  # next expected key at the end
    handles = {}
    try:
        for name, keys in shards.items():
            handles[name] = open(directory / name, "wb")
            handles[name].write(_header_bytes(keys, specs, safetensors_dtype))
        with tqdm(total=len(specs), desc=f"writing tensors ({dtype})", unit="tensor", disable=not progress) as bar:
            for key, value in tensors_from_params(params, config):
                name = file_of[key]
                if pending[name].pop() != key:  # the header's order is the write order; never reorder
                    raise RuntimeError(f"tensor {key!r} arrived out of its shard's header order")
                value = np.ascontiguousarray(value.astype(np_dtype, copy=False))
                if value.shape != specs[key].shape:
                    raise RuntimeError(f"tensor {key!r} has shape {value.shape}, planned {specs[key].shape}")
                handles[name].write(value.reshape(-1).view(np.uint8).data)
                bar.update()
    finally:
        for handle in handles.values():
            handle.close()
    index = {"metadata": {"total_size": sum(_nbytes(s) for s in specs.values()),
                          "total_parameters": sum(int(np.prod(s.shape)) for s in specs.values())},
             "weight_map": dict(sorted(file_of.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return index


def tokenizer_files(tokenizer_dir: str | Path) -> list[Path]:
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise BadInputError(f"--tokenizer-dir {tokenizer_dir} is not a directory")
    files = sorted({p for pattern in TOKENIZER_PATTERNS for p in tokenizer_dir.glob(pattern) if p.is_file()})
    if not files:
        raise BadInputError(f"--tokenizer-dir {tokenizer_dir} holds no tokenizer files "
                            f"(looked for {list(TOKENIZER_PATTERNS)})")
    return files


def copy_tokenizer_files(hf_dir: str | Path, folder: Path) -> list[str]:
    """Copy the tokenizer / processor files of `hf_dir` (if any) into `folder`; returns their names."""
    files = sorted({p for pattern in TOKENIZER_PATTERNS for p in Path(hf_dir).glob(pattern) if p.is_file()})
    if files:
        folder.mkdir()
        for path in files:
            shutil.copy2(path, folder / path.name)
    return [p.name for p in files]


def write_hf_directory(directory: Path, params, config: ModelConfig, *, dtype: str = "float32",
                       max_shard_size: int | str = "5GB", tokenizer_dir: str | Path | None = None,
                       tokenizer_json: str | Path | None = None, generation_config: dict | None = None,
                       progress: bool = True) -> dict:
    """Everything `from_pretrained` and `AutoProcessor.from_pretrained` need, into an existing empty
    `directory`. Returns a summary.

    Files that `tokenizer_dir` holds are copied. The processor files (hf_processor.py) are then written
    from `tokenizer_json`, or from `tokenizer_dir/tokenizer.json`, over the copies (a copied
    tokenizer_config.json is merged into ours), unless `tokenizer_dir` is already a complete processor.
    Without a tokenizer only the weights, config.json and generation_config.json are written."""
    from af_next_jax.convert import hf_processor
    copied = tokenizer_files(tokenizer_dir) if tokenizer_dir else []  # fail before writing weights
    if tokenizer_dir and (Path(tokenizer_dir) / hf_processor.TOKENIZER_FILE).is_file():
        tokenizer_json = Path(tokenizer_dir) / hf_processor.TOKENIZER_FILE
    index = write_weights(directory, params, config, dtype, max_shard_size, progress)
    (directory / CONFIG_FILE).write_text(json.dumps(to_hf_config(config, dtype), indent=2) + "\n")
    # The source's generation config when the checkpoint came from HF; else what save_pretrained writes
    # for a model without one (the processor files below add the stop tokens when a tokenizer is known).
    generation = generation_config or {"_from_model_config": True}
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
    written = []
    # A tokenizer directory that is already a complete processor (kept from an HF repository by
    # from-hf) is copied as it is: its template and settings are the model's, not ours to rewrite.
    complete = {hf_processor.TOKENIZER_CONFIG_FILE, hf_processor.PREPROCESSOR_FILE} <= {p.name for p in copied}
    for path in copied:
        shutil.copy2(path, directory / path.name)
    if tokenizer_json is not None and not complete:  # its tokenizer_config.json fields are merged, not lost
        written = hf_processor.write_processor_files(directory, config, Path(tokenizer_json), generation_config)
    return {"shards": len(set(index["weight_map"].values())), "tensors": len(index["weight_map"]),
            "bytes": index["metadata"]["total_size"],
            "tokenizer_files": sorted({p.name for p in copied} | set(written)),
            "processor": bool(written) or complete}
