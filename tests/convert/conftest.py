"""Shared fixtures: tiny random MusicFlamingo / AF3 models saved as transformers writes them."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from af_next_jax.config import tiny
from af_next_jax.convert import cli
from af_next_jax.convert.mapping import canonical_key
from hf_reference import build_audio_model

CONFIGS = {"musicflamingo": tiny(), "audioflamingo3": tiny(rote=None)}
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["hello world, the sound of music is nice", "a dog barks twice then a car passes by",
         "the speaker says thank you at 10.7s to 16.9s", "what do you hear in this clip?"] * 20


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def write_bpe_tokenizer(folder, extra_tokens=()) -> int:
    """A real byte-level BPE tokenizer.json (+ a tokenizer_config.json) with Qwen's ChatML tokens and
    none of AF-Next's; returns the number of ids it uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=CHAT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS, trainer)
    tokenizer.add_special_tokens(list(extra_tokens))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096, "added_tokens_decoder": {}}))
    return tokenizer.get_vocab_size(with_added_tokens=True)


def write_af_next_tokenizer(folder, config) -> Path:
    """A byte-level BPE tokenizer.json with the AF-Next tokens at `config`'s ids (as `from-hf --preset`
    writes it); returns its path."""
    from af_next_jax.convert.special_tokens import extend_tokenizer
    source = folder / "source"
    write_bpe_tokenizer(source)
    extend_tokenizer(source, config).write(folder)
    return folder / "tokenizer.json"


def read_tensors(hf_dir) -> dict[str, np.ndarray]:
    """Every tensor of a transformers directory (sharded or not), under its saved key."""
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(str(hf_dir / name), framework="numpy") as handle:
            tensors.update({canonical_key(key): handle.get_tensor(key) for key in handle.keys()})
    return tensors


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def saved_model(request, tmp_path_factory):
    """(model_type, our config, the transformers model, its save_pretrained directory in 200 KB shards)."""
    config = CONFIGS[request.param]
    hf_model, _ = build_audio_model(config, seed=5)
    hf_dir = tmp_path_factory.mktemp(request.param) / "hf"
    hf_model.save_pretrained(hf_dir, max_shard_size="200KB")
    return request.param, config, hf_model, hf_dir


@pytest.fixture(scope="session")
def converted(saved_model, tmp_path_factory):
    """saved_model imported with from-hf, then exported with to-hf (float32, 300 KB shards)."""
    model_type, _, _, hf_dir = saved_model
    root = tmp_path_factory.mktemp(f"{model_type}_converted")
    assert run_cli("from-hf", "--hf-dir", hf_dir, "--out", root / "ckpt", "--quiet") == 0
    assert run_cli("to-hf", "--checkpoint", root / "ckpt", "--out", root / "hf", "--max-shard-size", "300KB",
                   "--quiet") == 0
    return root / "ckpt", root / "hf"


class CapturedLogs(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Warnings transformers logs (its logger does not propagate to pytest's caplog)."""
    handler = CapturedLogs()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)
