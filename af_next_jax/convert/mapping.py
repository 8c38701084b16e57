"""Names and layouts: every transformers tensor <-> one slice of our parameter tree.

One `TensorRule` per transformers tensor kind. Layer rules cover all layers of a stack: transformers
stores `layers.{i}.*` per layer, we store one array with a leading `layers` axis (nn.scan). Each
transform is a transpose/reshape, so a round trip in one dtype is bit-identical.
Keys are as `save_pretrained` writes them for MusicFlamingo/AF3 (`audio_tower.*`,
`multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`); in-memory
state dicts (`model.audio_tower.*`, `lm_head.weight`) are normalised by `canonical_key`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from af_next_jax.config import ModelConfig

ENCODER_PREFIX = "audio_tower."
PROJECTOR_PREFIX = "multi_modal_projector."
DECODER_PREFIX = "language_model.model."
LM_HEAD_KEY = "language_model.lm_head.weight"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_key: str                  # "{layer}" marks a per-layer tensor
    path: tuple[str, ...]        # path inside params["params"]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    num_layers: int = 0          # > 0 for per-layer tensors stacked on axis 0

    def hf_keys(self) -> list[str]:
        if not self.num_layers:
            return [self.hf_key]
        return [self.hf_key.format(layer=layer) for layer in range(self.num_layers)]


def _identity(x):
    return x


def _linear(features_shape):
    """torch Linear [out, in] <-> DenseGeneral kernel [in, *features_shape]."""
    def to_ours(weight):
        return weight.T.reshape(weight.shape[1], *features_shape)

    def to_hf(kernel):
        return kernel.reshape(kernel.shape[0], -1).T
    return to_ours, to_hf


def _linear_from_heads(heads, head_dim):
    """torch Linear [out, heads * head_dim] <-> DenseGeneral kernel [heads, head_dim, out]."""
    def to_ours(weight):
        return weight.T.reshape(heads, head_dim, weight.shape[0])

    def to_hf(kernel):
        return kernel.reshape(heads * head_dim, kernel.shape[-1]).T
    return to_ours, to_hf


def _bias(shape):
    return (lambda b: b.reshape(shape)), (lambda b: b.reshape(-1))


def _conv1d():
    """torch Conv1d [out, in, width] <-> flax Conv kernel [width, in, out]."""
    return (lambda w: w.transpose(2, 1, 0)), (lambda k: k.transpose(2, 1, 0))


def _transpose():
    return (lambda w: w.T), (lambda w: w.T)


def _rule(hf_key, path, transforms=(_identity, _identity), num_layers=0):
    return TensorRule(hf_key, tuple(path.split("/")), transforms[0], transforms[1], num_layers)


def encoder_rules(config: ModelConfig, prefix: str = ENCODER_PREFIX) -> list[TensorRule]:
    enc = config.encoder
    heads, head_dim, n = enc.num_heads, enc.head_dim, enc.num_layers
    layer = prefix + "layers.{layer}."
    rules = [
        _rule(prefix + "conv1.weight", "encoder/conv1/kernel", _conv1d()),
        _rule(prefix + "conv1.bias", "encoder/conv1/bias"),
        _rule(prefix + "conv2.weight", "encoder/conv2/kernel", _conv1d()),
        _rule(prefix + "conv2.bias", "encoder/conv2/bias"),
        _rule(prefix + "embed_positions.weight", "encoder/embed_positions"),
        _rule(prefix + "layer_norm.weight", "encoder/layer_norm/scale"),
        _rule(prefix + "layer_norm.bias", "encoder/layer_norm/bias"),
    ]
    for name in ("q", "k", "v"):
        rules.append(_rule(layer + f"self_attn.{name}_proj.weight", f"encoder/layers/{name}_proj/kernel",
                           _linear((heads, head_dim)), n))
    for name in ("q", "v"):  # k_proj has no bias in Whisper
        rules.append(_rule(layer + f"self_attn.{name}_proj.bias", f"encoder/layers/{name}_proj/bias",
                           _bias((heads, head_dim)), n))
    rules += [
        _rule(layer + "self_attn.out_proj.weight", "encoder/layers/out_proj/kernel", _linear_from_heads(heads, head_dim), n),
        _rule(layer + "self_attn.out_proj.bias", "encoder/layers/out_proj/bias", num_layers=n),
        _rule(layer + "self_attn_layer_norm.weight", "encoder/layers/self_attn_layer_norm/scale", num_layers=n),
        _rule(layer + "self_attn_layer_norm.bias", "encoder/layers/self_attn_layer_norm/bias", num_layers=n),
        _rule(layer + "final_layer_norm.weight", "encoder/layers/final_layer_norm/scale", num_layers=n),
        _rule(layer + "final_layer_norm.bias", "encoder/layers/final_layer_norm/bias", num_layers=n),
        _rule(layer + "fc1.weight", "encoder/layers/fc1/kernel", _transpose(), n),
        _rule(layer + "fc1.bias", "encoder/layers/fc1/bias", num_layers=n),
        _rule(layer + "fc2.weight", "encoder/layers/fc2/kernel", _transpose(), n),
        _rule(layer + "fc2.bias", "encoder/layers/fc2/bias", num_layers=n),
    ]
    return rules


def projector_rules(config: ModelConfig, prefix: str = PROJECTOR_PREFIX) -> list[TensorRule]:
    rules = []
    for name in ("linear_1", "linear_2"):
        rules.append(_rule(prefix + f"{name}.weight", f"projector/{name}/kernel", _transpose()))
        if config.projector.use_bias:
            rules.append(_rule(prefix + f"{name}.bias", f"projector/{name}/bias"))
    return rules


def decoder_rules(config: ModelConfig, prefix: str = DECODER_PREFIX, lm_head_key: str = LM_HEAD_KEY) -> list[TensorRule]:
    dec = config.decoder
    n, head_dim = dec.num_layers, dec.head_dim
    layer = prefix + "layers.{layer}."
    rules = [
        _rule(prefix + "embed_tokens.weight", "decoder/embed_tokens"),
        _rule(prefix + "norm.weight", "decoder/norm/scale"),
        _rule(layer + "input_layernorm.weight", "decoder/layers/input_layernorm/scale", num_layers=n),
        _rule(layer + "post_attention_layernorm.weight", "decoder/layers/post_attention_layernorm/scale", num_layers=n),
        _rule(layer + "self_attn.o_proj.weight", "decoder/layers/o_proj/kernel", _linear_from_heads(dec.num_heads, head_dim), n),
    ]
    for name, heads in (("q", dec.num_heads), ("k", dec.num_kv_heads), ("v", dec.num_kv_heads)):
        rules.append(_rule(layer + f"self_attn.{name}_proj.weight", f"decoder/layers/{name}_proj/kernel",
                           _linear((heads, head_dim)), n))
        rules.append(_rule(layer + f"self_attn.{name}_proj.bias", f"decoder/layers/{name}_proj/bias",
                           _bias((heads, head_dim)), n))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules.append(_rule(layer + f"mlp.{name}.weight", f"decoder/layers/{name}/kernel", _transpose(), n))
    if not dec.tie_word_embeddings:
        rules.append(_rule(lm_head_key, "decoder/lm_head", _transpose()))
    return rules


def model_rules(config: ModelConfig) -> list[TensorRule]:
    """All rules for a MusicFlamingo / AF3 checkpoint."""
    return encoder_rules(config) + projector_rules(config) + decoder_rules(config)


def canonical_key(key: str) -> str:
    """In-memory names (`model.audio_tower.x`, `model.language_model.x`, `lm_head.weight`) -> saved names."""
    if key == "lm_head.weight":
        return LM_HEAD_KEY
    if key.startswith("model.language_model."):  # in memory the text model is a bare Qwen2Model
        return DECODER_PREFIX + key[len("model.language_model."):]
    if key.startswith("model."):
        return key[len("model."):]
    return key


def params_from_tensors(tensors, config: ModelConfig, rules=None) -> dict:
    """Build {"params": ...} from a mapping of transformers key -> numpy array (exact keys only).

    Raises BadInputError naming the first missing key, unexpected key or shape mismatch.
    """
    from af_next_jax.convert.checks import check_keys, expected_shapes
    from af_next_jax.convert.errors import BadInputError
    rules = model_rules(config) if rules is None else rules
    check_keys(set(tensors), rules)
    shapes = expected_shapes(config)
    params: dict = {}
    for rule in rules:
        slices = [rule.to_ours(np.asarray(tensors[key])) for key in rule.hf_keys()]
        value = np.stack(slices) if rule.num_layers else slices[0]
        expected = shapes[rule.path]
        if value.shape != expected:
            raise BadInputError(f"{rule.hf_keys()[0]}: shape {np.asarray(tensors[rule.hf_keys()[0]]).shape} maps to "
                                f"{value.shape} but the model expects {expected} at {'/'.join(rule.path)}")
        _set_path(params, rule.path, value)
    return {"params": params}


def tensors_from_params(params, config: ModelConfig, rules=None):
    """Yield (transformers key, numpy array) one tensor at a time, in rule order."""
    rules = model_rules(config) if rules is None else rules
    tree = params["params"] if "params" in params else params
    for rule in rules:
        value = np.asarray(_get_path(tree, rule.path))
        if rule.num_layers:
            for layer, key in enumerate(rule.hf_keys()):
                yield key, np.ascontiguousarray(rule.to_hf(value[layer]))
        else:
            yield rule.hf_key, np.ascontiguousarray(rule.to_hf(value))


def _set_path(tree, path, value):
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get_path(tree, path):
    for name in path:
        tree = tree[name]
    return getattr(tree, "value", tree)
