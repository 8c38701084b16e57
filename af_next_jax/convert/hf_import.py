"""Read a local Hugging Face directory into our parameter tree, streaming one tensor at a time.

Two steps, so bad input fails before any tensor data is read:
  1. plan  - read config.json and the safetensors headers (index + per-file headers, no data), match
             every key to a `TensorRule`, check missing / unexpected keys, shapes and dtypes;
  2. read  - preallocate each stacked float32 array once and fill it tensor by tensor from
             the safetensors files, so peak host memory stays near one copy of the model.

Sources: a whole MusicFlamingo / AF3 / AF-Next directory, or a bare Qwen2 directory (the decoder) +
a Whisper or AF3-encoder directory (the encoder) to initialise a new model with a random projector.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from af_next_jax.config import ModelConfig, RoteConfig
from af_next_jax.convert import hf_config
from af_next_jax.convert.base_models import plan_base_models
from af_next_jax.convert.checks import expected_shapes
from af_next_jax.convert.mapping import TensorRule, canonical_key, decoder_rules, encoder_rules, model_rules
from af_next_jax.convert.errors import BadInputError, config_from_fields
from af_next_jax.convert.orbax_io import aligned_empty, read_json_file

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
# safetensors dtype name -> numpy dtype and the name transformers writes in config.json.
FLOAT_DTYPES = {"F32": (np.float32, "float32"), "BF16": (ml_dtypes.bfloat16, "bfloat16"),
                "F16": (np.float16, "float16"), "F64": (np.float64, "float64")}
# Where a Whisper encoder can live inside a checkpoint, most specific first.
WHISPER_ENCODER_PREFIXES = ("model.encoder.", "encoder.", "model.audio_tower.", "audio_tower.", "")


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """One tensor as its safetensors header describes it (no data)."""
    file: Path
    key: str                 # the key inside the file
    shape: tuple[int, ...]
    dtype: str               # safetensors name: F32, BF16, ...
    offset: int              # byte offset of the data in the file
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Assignment:
    """Copy `header` (through `rule.to_ours`) into layer `layer` (None: the whole array) of `rule.path`."""
    header: TensorHeader
    rule: TensorRule
    layer: int | None


@dataclasses.dataclass
class ImportPlan:
    config: ModelConfig
    shapes: dict[tuple[str, ...], tuple[int, ...]]  # every parameter of the model (checks.expected_shapes)
    assignments: list[Assignment]
    # Parameters that do not come from a file (the randomly initialised projector of a new model).
    initialised: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)
    # `from-hf --preset`: the checks done and the vocabulary resize to apply after reading (base_models.py).
    base_models: object | None = None

    @property
    def source_bytes(self) -> int:
        return sum(a.header.nbytes for a in self.assignments)


def read_headers(hf_dir: str | Path) -> dict[str, TensorHeader]:
    """Every tensor of a directory (sharded with an index, or one model.safetensors), headers only."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise BadInputError(f"{hf_dir} is not a directory")
    index_path, single_path = hf_dir / INDEX_FILE, hf_dir / SINGLE_FILE
    if index_path.is_file():
        weight_map = read_json_file(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BadInputError(f"{index_path} has no 'weight_map' {{key: file}}")
        files = sorted(set(weight_map.values()))
    elif single_path.is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        found = sorted(p.name for p in hf_dir.iterdir())
        raise BadInputError(f"{hf_dir} has neither {INDEX_FILE} nor {SINGLE_FILE} (found {found}); "
                            f"only safetensors checkpoints are supported")
    headers: dict[str, TensorHeader] = {}
    for name in files:
        path = hf_dir / name
        if not path.is_file():
            raise BadInputError(f"{index_path} names shard {name!r} but {path} does not exist")
        data_start, entries = read_safetensors_header(path)
        for key, entry in entries.items():
            begin, end = entry["data_offsets"]
            headers[key] = TensorHeader(path, key, tuple(entry["shape"]), entry["dtype"], data_start + begin,
                                        end - begin)
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in headers or headers[key].file.name != name:
                raise BadInputError(f"{index_path} maps {key!r} to {name!r} but that shard does not hold it")
    return headers


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(byte offset where tensor data starts, {key: {"dtype", "shape", "data_offsets"}}) of one file.

    Format: little-endian u64 header length, then the JSON header; `data_offsets` are relative to its end.
    """
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= 100 * 2**20:
            raise BadInputError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadInputError(f"{path}: unreadable safetensors header ({error})") from None
    header.pop("__metadata__", None)
    data_end = 8 + length + max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if data_end > path.stat().st_size:
        raise BadInputError(f"{path} is truncated: its header needs {data_end} bytes, the file has "
                            f"{path.stat().st_size}")
    return 8 + length, header


def _hf_shape(rule: TensorRule, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The transformers shape of one tensor of `rule`, from our (per-layer) shape; abstract, no memory."""
    per_tensor = our_shape[1:] if rule.num_layers else our_shape
    return tuple(jax.eval_shape(rule.to_hf, jax.ShapeDtypeStruct(per_tensor, np.float32)).shape)


def match_rules(headers: dict[str, TensorHeader], rules: list[TensorRule], shapes: dict,
                where: str) -> list[Assignment]:
    """Check keys, shapes and dtypes of `headers` (keyed by rule key) against `rules` and our parameter
    `shapes` (`checks.expected_shapes`); no tensor data is read."""
    expected_keys = {key for rule in rules for key in rule.hf_keys()}
    missing = [key for rule in rules for key in rule.hf_keys() if key not in headers]
    unexpected = sorted(set(headers) - expected_keys)
    if missing:
        more = f" (and {len(missing) - 1} more, e.g. {missing[1:4]})" if len(missing) > 1 else ""
        raise BadInputError(f"{where}: missing tensor {missing[0]!r}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more, e.g. {unexpected[1:4]})" if len(unexpected) > 1 else ""
        raise BadInputError(f"{where}: unexpected tensor {headers[unexpected[0]].key!r}{more}; "
                            f"it does not belong to a model with this config.json")
    assignments = []
    for rule in rules:
        want = _hf_shape(rule, shapes[rule.path])
        for layer, key in enumerate(rule.hf_keys()):
            header = headers[key]
            if header.shape != want:
                raise BadInputError(f"{where}: tensor {header.key!r} has shape {list(header.shape)} but "
                                    f"config.json implies {list(want)} (in {header.file.name})")
            if header.dtype not in FLOAT_DTYPES:
                raise BadInputError(f"{where}: tensor {header.key!r} has dtype {header.dtype}; "
                                    f"supported: {sorted(FLOAT_DTYPES)}")
            assignments.append(Assignment(header, rule, layer if rule.num_layers else None))
    return assignments


def _source_dtype(assignments: list[Assignment]) -> str:
    """The dtype holding most of the bytes (the dtype `to-hf` writes back by default)."""
    counts = collections.Counter()
    for a in assignments:
        counts[a.header.dtype] += int(np.prod(a.header.shape))
    return FLOAT_DTYPES[counts.most_common(1)[0][0]][1]


def _generation_config(hf_dir: Path) -> dict | None:
    path = hf_dir / GENERATION_CONFIG_FILE
    return read_json_file(path, "generation config") if path.is_file() else None


def plan_audio_model(hf_dir: str | Path) -> ImportPlan:
    """A whole MusicFlamingo / AF3 / AF-Next directory (keys as saved or as in memory, `model.*`)."""
    hf_dir = Path(hf_dir)
    hf = read_json_file(hf_dir / CONFIG_FILE, "config.json")
    config = config_from_fields(lambda: hf_config.from_hf_config(hf), str(hf_dir / CONFIG_FILE))
    by_rule_key: dict[str, TensorHeader] = {}
    for key, header in read_headers(hf_dir).items():
        canonical = canonical_key(key)
        if canonical in by_rule_key:
            raise BadInputError(f"{hf_dir}: tensors {by_rule_key[canonical].key!r} and {key!r} are the same "
                                f"parameter ({canonical!r}); keep one")
        by_rule_key[canonical] = header
    shapes = expected_shapes(config)
    assignments = match_rules(by_rule_key, model_rules(config), shapes, str(hf_dir))
    info = {"source": {"hf_dir": str(hf_dir.absolute()), "model_type": hf["model_type"]},
            "hf_dtype": _source_dtype(assignments), "generation_config": _generation_config(hf_dir)}
    return ImportPlan(config, shapes, assignments, info=info)


def _encoder_config_dict(hf: dict, path: Path) -> dict:
    model_type = hf.get("model_type")
    if model_type in ("whisper", "audioflamingo3_encoder"):
        return hf
    if model_type in hf_config.MODEL_TYPES:
        return hf["audio_config"]
    raise BadInputError(f"{path}: model_type {model_type!r} is not an audio encoder; expected 'whisper', "
                        f"'audioflamingo3_encoder' or one of {hf_config.MODEL_TYPES}")


def plan_qwen2_whisper(qwen2_dir: str | Path, whisper_dir: str | Path, *, rote: bool = True,
                       seed: int = 0, preset: str | None = None, **config_fields) -> ImportPlan:
    """A new model: decoder from a bare Qwen2 directory, encoder from a Whisper (or AF3) directory,
    projector randomly initialised (`seed`), RoTE with its default config unless `rote=False`.

    With `preset` (a name in config.PRESETS) the model is that preset's: dimensions checked against
    it, vocabulary, RoPE and audio ids taken from it (base_models.py); `rote` and `config_fields`
    must then be left at their defaults."""
    qwen2_dir, whisper_dir = Path(qwen2_dir), Path(whisper_dir)
    text = read_json_file(qwen2_dir / CONFIG_FILE, "Qwen2 config.json")
    if text.get("model_type") != "qwen2":
        raise BadInputError(f"{qwen2_dir / CONFIG_FILE}: model_type is {text.get('model_type')!r}, "
                            f"expected 'qwen2' for --qwen2-dir")
    audio = _encoder_config_dict(read_json_file(whisper_dir / CONFIG_FILE, "Whisper config.json"), whisper_dir)
    base = None
    if preset is not None:
        base = plan_base_models(qwen2_dir, text, whisper_dir, audio, preset)
        config = base.config
        # Read Qwen2's vocabulary tensors at their own size; base.resize brings them to the preset's.
        shapes = {**expected_shapes(config), **base.source_vocab_shapes()}
    else:
        config = config_from_fields(lambda: ModelConfig(
            encoder=hf_config.encoder_from_audio_config(audio), decoder=hf_config.decoder_from_qwen2_config(text),
            rote=RoteConfig() if rote else None, **config_fields),
            f"{qwen2_dir / CONFIG_FILE} + {whisper_dir / CONFIG_FILE}")
        shapes = expected_shapes(config)
    decoder_part = decoder_rules(config, prefix="model.", lm_head_key="lm_head.weight")
    assignments = match_rules(read_headers(qwen2_dir), decoder_part, shapes, str(qwen2_dir))

    whisper_headers = read_headers(whisper_dir)
    prefix = next((p for p in WHISPER_ENCODER_PREFIXES if p + "conv1.weight" in whisper_headers), None)
    if prefix is None:
        raise BadInputError(f"{whisper_dir}: no Whisper encoder found (looked for 'conv1.weight' under "
                            f"prefixes {list(WHISPER_ENCODER_PREFIXES)})")
    # Only the encoder is taken; a Whisper decoder or an AF3 LLM next to it is ignored on purpose.
    encoder_headers = {k: h for k, h in whisper_headers.items() if k.startswith(prefix)}
    assignments += match_rules(encoder_headers, encoder_rules(config, prefix=prefix), shapes, str(whisper_dir))

    info = {"source": {"qwen2_dir": str(qwen2_dir.absolute()), "whisper_dir": str(whisper_dir.absolute()),
                       "projector": f"random init, seed {seed}"},
            "hf_dtype": _source_dtype(assignments), "generation_config": _generation_config(qwen2_dir)}
    if base is not None:
        info["source"]["preset"] = preset
    return ImportPlan(config, shapes, assignments, initialised={"projector": _init_projector(config, seed)},
                      info=info, base_models=base)


def _init_projector(config: ModelConfig, seed: int) -> dict:
    """The projector's own initialisers (the ones training from scratch uses), as float32 numpy."""
    import flax.linen as nn
    import jax.numpy as jnp
    from af_next_jax.model.numerics import Numerics
    from af_next_jax.model.projector import Projector
    # Only its initialisers run here: the default numerics (no backward pass to choose a layout for).
    module = Projector(config.projector, config.decoder.hidden_size, jnp.float32, numerics=Numerics())
    audio = jnp.zeros((1, 1, config.encoder.hidden_size), jnp.float32)
    variables = nn.unbox(module.init(jax.random.key(seed), audio))
    return jax.tree.map(np.asarray, variables["params"])


def read_params(plan: ImportPlan, progress: bool = True) -> dict:
    """Fill preallocated float32 arrays tensor by tensor; returns {"params": {...}} of numpy arrays."""
    from tqdm import tqdm
    shapes = plan.shapes
    arrays: dict[tuple[str, ...], np.ndarray] = {}
    by_file: dict[Path, list[Assignment]] = collections.defaultdict(list)
    for assignment in plan.assignments:
        path = assignment.rule.path
        if path not in arrays:
            # Pages are committed as they are filled; aligned so that saving does not copy it.
            arrays[path] = aligned_empty(shapes[path], np.float32)
        by_file[assignment.header.file].append(assignment)
    with tqdm(total=len(plan.assignments), desc="reading tensors", unit="tensor", disable=not progress) as bar:
        for file, assignments in by_file.items():
            with open(file, "rb") as handle:
                for a in assignments:
                    value = a.rule.to_ours(load_tensor(handle, a.header))
                    target = arrays[a.rule.path] if a.layer is None else arrays[a.rule.path][a.layer]
                    if value.shape != target.shape:  # the plan checked this: a broken rule (a bug) lands here
                        raise RuntimeError(f"{a.header.key}: maps to {value.shape}, expected {target.shape}")
                    target[...] = value
                    del value
                    bar.update()
    params: dict = {}
    for path, array in arrays.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = array
    for part, tree in plan.initialised.items():
        params[part] = tree
    _check_complete(params, shapes)
    return {"params": params}


def load_tensor(handle, header: TensorHeader) -> np.ndarray:
    """Read one tensor's bytes into a fresh array: the one place tensor data is read (tests count calls
    to prove that validation reads none). Plain reads, not a memory map: mapped pages of a whole shard
    would stay resident and count against the host's memory while the shard is open."""
    dtype = np.dtype(FLOAT_DTYPES[header.dtype][0]).newbyteorder("<")
    value = np.empty(header.shape, dtype)
    handle.seek(header.offset)
    if handle.readinto(value.reshape(-1).view(np.uint8)) != header.nbytes or value.nbytes != header.nbytes:
        raise BadInputError(f"{header.file}: tensor {header.key!r} is truncated or its header is inconsistent")
    return value


def _check_complete(params: dict, shapes: dict) -> None:
    flat = {tuple(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if flat != shapes:
        missing = sorted(set(shapes) - set(flat))
        wrong = sorted(p for p in set(flat) & set(shapes) if flat[p] != shapes[p])
        raise RuntimeError(f"parameter tree incomplete: missing {missing[:3]}, wrong shapes {wrong[:3]}")
