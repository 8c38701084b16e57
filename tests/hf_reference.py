"""Small random transformers models (the correctness reference) and their weights in our layout."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from af_next_jax.config import ModelConfig
from af_next_jax.convert.hf_config import to_hf_config
from af_next_jax.convert.mapping import canonical_key, decoder_rules, params_from_tensors

HF_CLASSES = {"musicflamingo": ("MusicFlamingoConfig", "MusicFlamingoForConditionalGeneration"),
              "audioflamingo3": ("AudioFlamingo3Config", "AudioFlamingo3ForConditionalGeneration")}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every tensor (norm scales and biases too) non-trivial random values so no term hides."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.2 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))


def build_audio_model(config: ModelConfig, seed: int = 0):
    """A random MusicFlamingo (config.rote set) or AF3 (config.rote None) and our params for it."""
    hf_config = to_hf_config(config)
    config_cls, model_cls = HF_CLASSES[hf_config["model_type"]]
    hf_config = getattr(transformers, config_cls).from_dict(hf_config)
    model = getattr(transformers, model_cls)._from_config(hf_config, attn_implementation="eager").eval()
    randomize_(model, seed)
    tensors = {canonical_key(k): v.numpy() for k, v in model.state_dict().items()}
    return model, params_from_tensors(tensors, config)


def build_qwen2_model(config: ModelConfig, seed: int = 0):
    """A random bare Qwen2ForCausalLM and our decoder params for it."""
    text = to_hf_config(config)["text_config"]
    model = transformers.Qwen2ForCausalLM._from_config(transformers.Qwen2Config.from_dict(text),
                                                       attn_implementation="eager").eval()
    randomize_(model, seed)
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    rules = decoder_rules(config, prefix="model.", lm_head_key="lm_head.weight")
    return model, _decoder_only(params_from_tensors(tensors, config, rules))


def _decoder_only(params):
    return {"params": {"decoder": params["params"]["decoder"]}}


def transformers_logits(model, inputs: dict) -> np.ndarray:
    torch_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**torch_inputs).logits.float().numpy()
