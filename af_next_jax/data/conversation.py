"""ChatML rendering with `<sound>` expansion and the assistant-only loss mask.

Each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n` (Qwen2.5's template). Every `<sound>`
placeholder in a user turn becomes `<|sound_bos|>` + N x `<sound>` + `<|sound_eos|>`, N the encoder
tokens of that audio (sum over its windows of `encoder_tokens_for_frames`), as transformers'
AF3/MusicFlamingo processor expands it. Trained tokens: the content of assistant turns and their
`<|im_end|>` (the model must learn to stop); role headers, system/user text and audio are context.
`<think>...</think>` reasoning is ordinary assistant content, kept verbatim with its timestamps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from af_next_jax.data.manifest import AUDIO_PLACEHOLDER, Turn
from af_next_jax.data.tokenizer import Tokenizer


def encode_conversation(turns: Sequence[Turn], tokenizer: Tokenizer,
                        audio_token_counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids [n] int32, trainable [n] bool) of one conversation.

    `audio_token_counts[k]` is N for the k-th `<sound>` placeholder (in reading order).
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
                count = int(audio_token_counts[audio_index])
                audio_index += 1
                emit([special.audio_bos] + [special.audio] * count + [special.audio_eos], False)
            if piece:
                emit(tokenizer.encode(piece), is_assistant)
        emit([special.im_end], is_assistant)
        emit(newline, False)
    if audio_index != len(audio_token_counts):
        raise ValueError(f"the conversation has {audio_index} '{AUDIO_PLACEHOLDER}' placeholders but "
                         f"{len(audio_token_counts)} audio token counts were given")
    return np.asarray(ids, np.int32), np.asarray(trainable, bool)
