"""Generation prompts: the chat format the model was trained on, ending in the opened assistant turn.

Which format, by where the model comes from:
  - trained here (a training workdir, its export, an HF export of it): our ChatML, rendered by the data
    pipeline's own code (`encode_conversation`, af_next_jax/data/conversation.py), so a header can
    never be spelled differently here than in training:

      [<|im_start|>system\\n{system}<|im_end|>\\n]
      <|im_start|>user\\n{audio runs}\\n{question}<|im_end|>\\n
      <|im_start|>assistant\\n{variant prefix}

    Our HF exports carry the same format as their chat template (conversation.CHAT_TEMPLATE).
  - a Hugging Face repository with a chat template of its own (released AF3, Music Flamingo, AF-Next,
    or a checkpoint `from-hf` converted from one): that template, rendered as transformers'
    `processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)` renders
    it, so the prompt's ids are the processor's. Their templates differ from ours: a default system
    prompt when the conversation has none ("You are a helpful assistant." for AF3, a Music Flamingo /
    AF-Next one for those), and one `<sound>` directly followed by the text (no "\\n").
`model_chat_template` tells them apart (the template file beside the model's tokenizer);
`default_system_prompt` is the system turn a prompt gets when none is given.

Variants: AF-Next's Instruct, Think and Captioner share one architecture and differ in data. The demo
data asks the same questions of `instruct` and `think` examples, so the prompt must say which one
is wanted: `think` opens the answer with `<think>` (the model then writes its timestamped chain and
`</think>` before the answer); `captioner` asks for a caption when no question is given.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from af_next_jax.config import ModelConfig
from af_next_jax.data import audio as audio_lib
from af_next_jax.data.audio_features import AudioFeatures, example_windows, featurize_audio, layout_windows
from af_next_jax.data.conversation import CHAT_TEMPLATE, encode_conversation, uses_audio_markers
from af_next_jax.data.manifest import AUDIO_PLACEHOLDER, AudioRef, Turn
from af_next_jax.data.tokenizer import Tokenizer

VARIANT_PREFIX = {"instruct": "", "think": "<think>", "captioner": ""}
CAPTION_QUESTION = "Describe the audio with timestamps."
# Where transformers' processors read their chat template, in the order AutoProcessor prefers them.
PROCESSOR_CONFIG_FILE, LEGACY_CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_FILE = (
    "processor_config.json", "chat_template.json", "chat_template.jinja")
# Tokens transformers passes to a template (its tokenizer's special_tokens_map).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_audio_input(ref: AudioRef | str, config: ModelConfig) -> AudioFeatures:
    """Load and featurise one audio as the data pipeline does (data/audio_features.py: at most
    `config.max_windows_per_audio` windows); raises `audio_lib.AudioError` (with a `reason`)."""
    ref = AudioRef(ref) if isinstance(ref, str) else ref
    samples = audio_lib.load_audio(ref.path, ref.start, ref.end)
    return featurize_audio(samples, config.encoder, config.max_windows_per_audio, name=ref.path)


def model_chat_template(tokenizer: Tokenizer) -> str | None:
    """The chat template that ships beside the model's tokenizer (an HF repository, or the files
    `from-hf` kept), read as AutoProcessor reads it: processor_config.json's "chat_template", else
    chat_template.json, else chat_template.jinja. None when there is none or it is our own ChatML
    (conversation.CHAT_TEMPLATE): `encode_conversation` then renders the prompt."""
    folder = os.path.dirname(os.path.abspath(tokenizer.path))
    template = (_json_entry(os.path.join(folder, PROCESSOR_CONFIG_FILE), "chat_template")
                or _json_entry(os.path.join(folder, LEGACY_CHAT_TEMPLATE_FILE), "chat_template"))
    path = os.path.join(folder, CHAT_TEMPLATE_FILE)
    if template is None and os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            template = handle.read()
    if isinstance(template, dict):  # several named templates: transformers uses "default"
        template = template.get("default")
    return None if template is None or template == CHAT_TEMPLATE else template


def _json_entry(path: str, key: str):
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get(key)


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system turn of a prompt given none: our training data's (the demo data's system prompt) for
    our ChatML; none for a model's own template, which adds its default as transformers does."""
    from af_next_jax.data.demo import SYSTEM_PROMPT

    return SYSTEM_PROMPT if chat_template is None else None


def prompt_turns(question: str, num_audios: int, *, variant: str = "instruct",
                 system: str | None = None) -> list[Turn]:
    """System (optional) and user turns: the audio placeholders first, then the question."""
    if variant not in VARIANT_PREFIX:
        raise ValueError(f"unknown variant {variant!r}; valid: {sorted(VARIANT_PREFIX)}")
    if not question and variant == "captioner":
        question = CAPTION_QUESTION
    turns = [Turn("system", system)] if system else []
    return turns + [Turn("user", AUDIO_PLACEHOLDER * num_audios + "\n" + question)]


def encode_prompt(turns: Sequence[Turn], tokenizer: Tokenizer, audio_token_counts: Sequence[int],
                  config: ModelConfig, *, variant: str = "instruct", chat_template: str | None = None) -> np.ndarray:
    """Token ids [n] int32 of `turns` followed by the opened assistant turn of `variant`, each `<sound>`
    expanded to its audio's run. `chat_template`: the model's own (`model_chat_template`), or None for
    our ChatML."""
    if turns and turns[-1].role == "assistant":
        raise ValueError("a generation prompt ends with a user turn; drop the assistant answer first")
    if chat_template is not None:
        text = render_chat_template(chat_template, chat_messages(turns), tokenizer)
        ids = expand_audio_runs(tokenizer.encode(text), tokenizer, audio_token_counts, config)
        return np.asarray(ids + tokenizer.encode(VARIANT_PREFIX[variant]), np.int32)
    # An assistant turn holding only the variant prefix, without the <|im_end|>\n that closes it.
    assistant = Turn("assistant", VARIANT_PREFIX[variant])
    ids, _ = encode_conversation(list(turns) + [assistant], tokenizer, audio_token_counts,
                                 audio_markers=uses_audio_markers(config))
    closing = [tokenizer.special.im_end] + tokenizer.encode("\n")
    if [int(t) for t in ids[-len(closing):]] != closing:
        raise AssertionError(f"encode_conversation no longer closes a turn with <|im_end|>\\n "
                             f"(ends with {ids[-len(closing):].tolist()}); update encode_prompt")
    return ids[:-len(closing)]


def chat_messages(turns: Sequence[Turn]) -> list[dict]:
    """`turns` as transformers chat messages, as its processor recipe writes them: a user turn's content
    is a list of audio items (one per `<sound>`) and text items. The "\\n" our ChatML puts between the
    audio and the text (CHAT_TEMPLATE renders audios, "\\n", text) is that template's, not the text's."""
    messages = []
    for turn in turns:
        if turn.role != "user":
            messages.append({"role": turn.role, "content": turn.content})
            continue
        parts = []
        for index, piece in enumerate(turn.content.split(AUDIO_PLACEHOLDER)):
            if index:
                parts.append({"type": "audio"})
                piece = piece.removeprefix("\n")
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": parts})
    return messages


def render_chat_template(template: str, messages: list[dict], tokenizer: Tokenizer) -> str:
    """The text transformers' `apply_chat_template(messages, add_generation_prompt=True)` renders: the
    same sandboxed Jinja environment (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
    `tojson`) and the tokenizer's special tokens as variables."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise ImportError("this model ships its own chat template; rendering it needs jinja2 "
                          "(pip install 'jinja2>=3.1')") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                               extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                        **_template_tokens(tokenizer))
    except jinja2.exceptions.TemplateError as error:
        raise ValueError(f"the chat template beside {tokenizer.path} does not render: {error}") from None


def _template_tokens(tokenizer: Tokenizer) -> dict:
    """bos_token, eos_token, ... from the tokenizer_config.json beside the tokenizer (strings or
    {"content": ...} entries), as transformers hands them to a template."""
    path = os.path.join(os.path.dirname(os.path.abspath(tokenizer.path)), "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        fields = json.load(handle)
    tokens = {}
    for name in TEMPLATE_TOKENS:
        value = fields.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def expand_audio_runs(ids: Sequence[int], tokenizer: Tokenizer, audio_token_counts: Sequence[int],
                      config: ModelConfig) -> list[int]:
    """Each `<sound>` id of `ids` replaced by its audio's run (in order), laid out as the model family's
    processor lays it out (`uses_audio_markers`)."""
    special = tokenizer.special
    placeholders = sum(int(token) == special.audio for token in ids)
    if placeholders != len(audio_token_counts):
        raise ValueError(f"the prompt has {placeholders} '{AUDIO_PLACEHOLDER}' placeholders but "
                         f"{len(audio_token_counts)} audios were given (the chat template puts one per "
                         f"user turn with audio)")
    out, counts = [], iter(audio_token_counts)
    for token in ids:
        if int(token) != special.audio:
            out.append(int(token))
            continue
        run = [special.audio] * int(next(counts))
        out += [special.audio_bos, *run, special.audio_eos] if uses_audio_markers(config) else run
    return out


def prompt_batch(token_rows: Sequence[np.ndarray], audios: Sequence[Sequence[AudioFeatures]], config: ModelConfig, *,
                 pad_id: int, length: int | None = None, num_windows: int | None = None) -> dict:
    """A left-padded batch (af_next_jax/inference/decoding.py) of prompts, each with its own audios.

    `length` / `num_windows` pad to static sizes (fewer recompilations across batches); by default
    the longest prompt and rows x the most windows a prompt needs (every row owns num_windows / rows
    window slots, af_next_jax/batch.py). The windows are laid out by the data pipeline's own
    `layout_windows` (data/audio_features.py).
    """
    if len(token_rows) != len(audios):
        raise ValueError(f"{len(token_rows)} prompts but {len(audios)} audio lists; give one list per prompt")
    if pad_id == config.audio_token_id:
        raise ValueError(f"pad id {pad_id} is the <sound> id; the merge would take padding for audio")
    longest = max(len(row) for row in token_rows)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest prompt ({longest} tokens)")
    token_ids = np.full((len(token_rows), length), pad_id, np.int32)
    for row, ids in enumerate(token_rows):
        token_ids[row, length - len(ids):] = ids
        slots = int((np.asarray(ids) == config.audio_token_id).sum())
        tokens = sum(audio.token_count for audio in audios[row])
        if slots != tokens:
            raise ValueError(f"prompt {row} holds {slots} <sound> slots but its audios give {tokens} tokens")
    real = np.arange(length)[None, :] >= (length - np.array([len(r) for r in token_rows]))[:, None]
    batch = {"token_ids": token_ids, "segment_ids": real.astype(np.int32),
             "positions": np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)}
    most = max(sum(audio.num_windows for audio in row) for row in audios)
    if most == 0:
        return batch
    num_windows = len(token_rows) * most if num_windows is None else num_windows
    encoder = config.encoder
    # One run per row: its audios' windows in the order of their <sound> runs.
    blocks = [[example_windows(row, encoder)] for row in audios]
    return {**batch, **layout_windows(blocks, num_windows, (encoder.num_mel_bins, encoder.mel_frames_per_window))}
