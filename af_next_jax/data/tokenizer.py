"""One tokenizer interface over HF `tokenizer.json` (Qwen2.5's byte-level BPE) and SentencePiece `.model`.

Special tokens are found by their strings, so the same code serves Qwen's vocabulary (audio ids
151669-151671) and the demo's tiny one. The trainer copies the audio ids into the model config:

    tokenizer = load_tokenizer(path)
    model_config = model_config.replace(**tokenizer.model_config_ids())
    tokenizer.check_compatible(model_config)
"""

from __future__ import annotations

import dataclasses
import os
import re

# name -> the token string every tokenizer must define (AF3 / MusicFlamingo / Qwen ChatML spellings).
SPECIAL_TOKENS = {
    "audio": "<sound>",
    "audio_bos": "<|sound_bos|>",
    "audio_eos": "<|sound_eos|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "think_start": "<think>",
    "think_end": "</think>",
}
# The first of these that exists is the pad token (Qwen pads with <|endoftext|>).
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "<unk>")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    audio: int
    audio_bos: int
    audio_eos: int
    im_start: int
    im_end: int
    think_start: int
    think_end: int
    pad: int


class Tokenizer:
    """Text <-> ids with special-token strings recognised anywhere in the text."""

    def __init__(self, path: str, backend, kind: str):
        self.path = path
        self.kind = kind  # "hf" or "sentencepiece"
        self._backend = backend
        ids = {name: self.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
        missing = [SPECIAL_TOKENS[name] for name, token_id in ids.items() if token_id is None]
        if missing:
            raise ValueError(f"tokenizer {path} lacks the special tokens {missing}; add them as special "
                             f"(HF: tokenizer.add_special_tokens, SentencePiece: user_defined_symbols)")
        pad = next((self.token_to_id(token) for token in PAD_CANDIDATES if self.token_to_id(token) is not None), 0)
        self.special = SpecialIds(pad=pad, **ids)
        # Special strings split the text before the subword model sees it (longest first).
        specials = sorted(SPECIAL_TOKENS.values(), key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(token) for token in specials) + ")")

    @property
    def vocab_size(self) -> int:
        """Number of ids the embedding table must hold (max id + 1, added tokens included)."""
        if self.kind == "hf":
            return self._backend.get_vocab_size(with_added_tokens=True)
        return self._backend.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "hf":
            return self._backend.token_to_id(token)
        token_id = self._backend.piece_to_id(token)
        return None if token_id == self._backend.unk_id() and token != self._backend.id_to_piece(token_id) else token_id

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token strings (`<think>`, `<|im_end|>`, ...) map to their single id."""
        ids: list[int] = []
        for index, piece in enumerate(self._special_pattern.split(text)):
            if index % 2:
                ids.append(self.token_to_id(piece))
            elif piece:
                ids.extend(self._encode_plain(piece))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if self.kind == "hf":
            return self._backend.encode(text, add_special_tokens=False).ids
        return self._backend.encode(text, out_type=int)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._backend.decode(ids)

    def model_config_ids(self) -> dict:
        """Keyword arguments for `ModelConfig.replace`: the audio ids the model scatters into."""
        return {"audio_token_id": self.special.audio, "audio_bos_token_id": self.special.audio_bos,
                "audio_eos_token_id": self.special.audio_eos}

    def check_compatible(self, model_config) -> None:
        """Raise if the model's vocabulary cannot hold these ids or its audio ids differ."""
        if self.vocab_size > model_config.decoder.vocab_size:
            raise ValueError(f"tokenizer {self.path} has {self.vocab_size} ids but the model's vocab_size is "
                             f"{model_config.decoder.vocab_size}; use a model with vocab_size >= {self.vocab_size}")
        wanted = self.model_config_ids()
        have = {name: getattr(model_config, name) for name in wanted}
        if have != wanted:
            raise ValueError(f"model config audio ids {have} differ from the tokenizer's {wanted}; "
                             f"use model_config.replace(**tokenizer.model_config_ids())")


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizer.json`, a SentencePiece `.model`, or a folder holding one of them."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        models = sorted(name for name in os.listdir(path) if name.endswith(".model"))
        if models:
            return load_tokenizer(os.path.join(path, models[0]))
        raise ValueError(f"no tokenizer.json or *.model in folder {path}")
    if not os.path.exists(path):
        raise ValueError(f"tokenizer file {path} does not exist")
    if path.endswith(".json"):
        import tokenizers

        return Tokenizer(path, tokenizers.Tokenizer.from_file(path), "hf")
    if path.endswith(".model"):
        import sentencepiece

        return Tokenizer(path, sentencepiece.SentencePieceProcessor(model_file=path), "sentencepiece")
    raise ValueError(f"tokenizer {path}: expected a .json (HF tokenizers) or .model (SentencePiece) file")
