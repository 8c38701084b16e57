"""ChatML rendering with `<sound>` expansion and the assistant-only loss mask.

Each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n` (Qwen2.5's template). Every `<sound>`
placeholder in a user turn becomes a run of N `<sound>` tokens, N the encoder tokens of that audio
(sum over its windows of `encoder_tokens_for_frames`), laid out as transformers' processor of the
model family lays it out (`audio_markers`):

  MusicFlamingo / AF-Next (RoTE):  `<|sound_bos|>` + N x `<sound>` + `<|sound_eos|>`
  Audio Flamingo 3 (no RoTE):      N x `<sound>`

Trained tokens: the content of assistant turns and their `<|im_end|>` (the model must learn to
stop); role headers, system/user text and audio are context. `<think>...</think>` reasoning is
ordinary assistant content, kept verbatim with its timestamps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from af_next_jax.config import ModelConfig
from af_next_jax.data.manifest import AUDIO_PLACEHOLDER, Turn
from af_next_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer

# The same ChatML as a Jinja chat template, for HF exports (convert/hf_processor.py writes it as the
# processor's and tokenizer's template): one source, rendered against encode_conversation in the tests.
_START, _END, _NEWLINE = SPECIAL_TOKENS["im_start"], SPECIAL_TOKENS["im_end"], "{{ '\\n' }}"
# No whitespace outside the tags: every character of the output is written explicitly.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    f"{_START}{{{{ message['role'] }}}}{_NEWLINE}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- set audio = namespace(count=0) -%}{%- set text = namespace(value='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'audio' -%}{%- set audio.count = audio.count + 1 -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    f"{{{{ '{AUDIO_PLACEHOLDER}' * audio.count }}}}"
    f"{{%- if audio.count and text.value -%}}{_NEWLINE}{{%- endif -%}}"
    "{{ text.value }}"
    "{%- endif -%}"
    f"{_END}{_NEWLINE}"
    "{%- endfor -%}"
    f"{{%- if add_generation_prompt -%}}{_START}assistant{_NEWLINE}{{%- endif -%}}"
)



def uses_audio_markers(model_config: ModelConfig) -> bool:
    """Whether each audio's `<sound>` run is wrapped in `<|sound_bos|>` ... `<|sound_eos|>`.

    The one place that decides the layout from the model config: MusicFlamingo and AF-Next (RoTE)
    wrap the run (transformers' `MusicFlamingoProcessor`); Audio Flamingo 3 (`rote is None`, as in
    `convert`'s config mapping) does not (`AudioFlamingo3Processor` emits a bare run).
    """
    return model_config.rote is not None


def encode_conversation(turns: Sequence[Turn], tokenizer: Tokenizer, audio_token_counts: Sequence[int], *,
                        audio_markers: bool) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids [n] int32, trainable [n] bool) of one conversation.

    `audio_token_counts[k]` is N for the k-th `<sound>` placeholder (in reading order);
    `audio_markers` is `uses_audio_markers(model_config)`.
    """
    special = tokenizer.special
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    trainable: list[bool] = []

    def emit(new_ids, train: bool):
        ids.extend(new_ids)
        trainable.extend([train] * len(new_ids))

    audio_index = 0
    for turn in turns:
        is_assistant = turn.role == "assistant"
        emit([special.im_start] + tokenizer.encode(turn.role) + newline, False)
        pieces = turn.content.split(AUDIO_PLACEHOLDER) if turn.role == "user" else [turn.content]
        for piece_index, piece in enumerate(pieces):
            if piece_index:  # a placeholder stood before this piece
                run = [special.audio] * int(audio_token_counts[audio_index])
                audio_index += 1
                emit([special.audio_bos] + run + [special.audio_eos] if audio_markers else run, False)
            if piece:
                emit(tokenizer.encode(piece), is_assistant)
        emit([special.im_end], is_assistant)
        emit(newline, False)
    if audio_index != len(audio_token_counts):
        raise ValueError(f"the conversation has {audio_index} '{AUDIO_PLACEHOLDER}' placeholders but "
                         f"{len(audio_token_counts)} audio token counts were given")
    return np.asarray(ids, np.int32), np.asarray(trainable, bool)
