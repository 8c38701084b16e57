"""Qwen2's `tokenizer.json` + the AF-Next special tokens, at the ids the model config names.

Qwen2.5's tokenizer uses ids 0..151664 (151,643 BPE tokens, then 22 specials); its checkpoint has
152,064 embedding rows, the rest are padding. AF-Next's tokenizer (and the `af_next_7b` / `af3_7b`
presets, 151,672 ids) adds, right after the tokens the config names:

    <think> 151667   </think> 151668   <sound> 151669   <|sound_bos|> 151670   <|sound_eos|> 151671

The three audio ids come from the model config (`audio_token_id`, `audio_bos_token_id`,
`audio_eos_token_id`); the config names no think ids, so `<think>` / `</think>` take the two ids
just before `<sound>` (the layout above, which tests/data/test_qwen_vocab.py also assumes). Every
preset config keeps the audio ids at the top of its vocabulary, so this holds for `tiny` too.

HF `tokenizers` ignores the ids written in `added_tokens` when it loads a file: it numbers added
tokens one after another from the end of the vocabulary (it only warns on a mismatch). A gap below
the first new id (Qwen2.5: 151665 and 151666) is therefore filled with placeholder special tokens
`<|reserved_N|>` (N = the id), so every token lands at its id; the result is loaded back and each
id checked. `<think>` / `</think>` are not "special" (as in Qwen3): decoding with
`skip_special_tokens=True` keeps the reasoning visible; the audio tokens and the placeholders are.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from af_next_jax.config import ModelConfig
from af_next_jax.convert.errors import BadInputError
from af_next_jax.data.tokenizer import SPECIAL_TOKENS

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# (token, whether it is "special"): in the order of their ids, <think> first.
THINK_TOKENS = ((SPECIAL_TOKENS["think_start"], False), (SPECIAL_TOKENS["think_end"], False))
RESERVED_TOKEN = "<|reserved_{}|>"


def required_token_ids(config: ModelConfig) -> dict[str, int]:
    """{token: id} that the tokenizer of a model with `config` must have (see the module docstring)."""
    return {SPECIAL_TOKENS["think_start"]: config.audio_token_id - 2,
            SPECIAL_TOKENS["think_end"]: config.audio_token_id - 1,
            SPECIAL_TOKENS["audio"]: config.audio_token_id,
            SPECIAL_TOKENS["audio_bos"]: config.audio_bos_token_id,
            SPECIAL_TOKENS["audio_eos"]: config.audio_eos_token_id}


@dataclasses.dataclass
class ExtendedTokenizer:
    """The new tokenizer files (as text) and what changed."""
    tokenizer_json: str
    tokenizer_config_json: str | None    # the source's tokenizer_config.json, with the new added tokens
    source_size: int                     # ids the source tokenizer uses (max id + 1): rows that must stay
    added: dict[str, int]                # the tokens added, {token: id} (placeholders included)
    present: dict[str, int]              # required tokens the source already had at the right id

    def write(self, directory: Path) -> list[str]:
        (directory / TOKENIZER_FILE).write_text(self.tokenizer_json)
        names = [TOKENIZER_FILE]
        if self.tokenizer_config_json is not None:
            (directory / TOKENIZER_CONFIG_FILE).write_text(self.tokenizer_config_json)
            names.append(TOKENIZER_CONFIG_FILE)
        return names


def _load(path: Path):
    """(text, JSON document, tokenizers.Tokenizer) of a tokenizer.json."""
    import tokenizers
    if not path.is_file():
        raise BadInputError(f"{path} not found: --preset needs Qwen2's own tokenizer.json in --qwen2-dir "
                            f"(the AF-Next special tokens are added to it)")
    text = path.read_text()
    try:
        return text, json.loads(text), tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exception on a malformed file
        raise BadInputError(f"{path} is not a HF tokenizers file: {error}") from None


def tokenizer_size(source_dir: Path) -> int:
    """Ids the tokenizer in `source_dir` uses (max id + 1): the embedding rows that must be kept."""
    return max(_load(source_dir / TOKENIZER_FILE)[2].get_vocab(with_added_tokens=True).values()) + 1


def _added_entry(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def extend_tokenizer(source_dir: Path, config: ModelConfig) -> ExtendedTokenizer:
    """Read `source_dir/tokenizer.json` (+ tokenizer_config.json if present) and add the tokens of
    `required_token_ids(config)`; refuse a required id held by another token, or a required token
    found at another id. Nothing is written."""
    import tokenizers
    path = source_dir / TOKENIZER_FILE
    text, document, source = _load(path)
    vocab = source.get_vocab(with_added_tokens=True)
    by_id = {token_id: token for token, token_id in vocab.items()}
    source_size = max(by_id) + 1
    required = required_token_ids(config)
    special = {token: token not in dict(THINK_TOKENS) for token in required}

    present, new = {}, {}
    for token, token_id in required.items():
        if token in vocab:
            if vocab[token] != token_id:
                raise BadInputError(f"{path}: {token} already has id {vocab[token]}, but the model config needs it "
                                    f"at {token_id}; use a tokenizer without it, or a config with that id")
            present[token] = token_id
        elif token_id in by_id or token_id < source_size:
            raise BadInputError(f"{path}: id {token_id}, which the model config gives to {token}, is already "
                                f"taken by {by_id.get(token_id)!r}; the new tokens need ids >= {source_size}")
        else:
            new[token_id] = token
    if not new:
        return ExtendedTokenizer(text, _read_config_text(source_dir), source_size, {}, present)

    added = {}
    entries = document.setdefault("added_tokens", [])
    for token_id in range(source_size, max(new) + 1):
        token = new.get(token_id, RESERVED_TOKEN.format(token_id))
        entries.append(_added_entry(token_id, token, special.get(token, True)))
        added[token] = token_id
    extended_json = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
    _check_ids(tokenizers.Tokenizer.from_str(extended_json), {**required, **added}, path)
    return ExtendedTokenizer(extended_json, _extended_config(source_dir, entries), source_size, added, present)


def _check_ids(tokenizer, wanted: dict[str, int], path: Path) -> None:
    """Each token must load at its id, and encode to that one id (HF renumbers added tokens on load)."""
    for token, token_id in wanted.items():
        loaded = tokenizer.token_to_id(token)
        encoded = tokenizer.encode(token, add_special_tokens=False).ids
        if loaded != token_id or encoded != [token_id]:
            raise RuntimeError(f"{path} + added tokens: {token} loads as id {loaded} and encodes to {encoded}, "
                               f"expected {token_id}")


def _read_config_text(source_dir: Path) -> str | None:
    path = source_dir / TOKENIZER_CONFIG_FILE
    return path.read_text() if path.is_file() else None


def _extended_config(source_dir: Path, entries: list[dict]) -> str | None:
    """tokenizer_config.json with `added_tokens_decoder` listing every added token (transformers
    reads it next to tokenizer.json); None when the source has no such file."""
    text = _read_config_text(source_dir)
    if text is None:
        return None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadInputError(f"{source_dir / TOKENIZER_CONFIG_FILE} is not valid JSON: {error}") from None
    decoder = config.setdefault("added_tokens_decoder", {})
    for entry in entries:
        decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
    return json.dumps(config, ensure_ascii=False, indent=2) + "\n"
