"""Generation prompts, rendered by the data pipeline's own ChatML code so training and inference agree.

A prompt is the conversation without its answer, then the opened assistant turn:

  [<|im_start|>system\n{system}<|im_end|>\n]
  <|im_start|>user\n{audio runs}\n{question}<|im_end|>\n
  <|im_start|>assistant\n{variant prefix}

`encode_conversation` (af_next_jax/data/conversation.py) renders it, audio layout included
(`uses_audio_markers`): we render an assistant turn holding only the variant prefix and drop the
`<|im_end|>\n` that closes it, so a header can never be spelled differently here than in training.

Variants: AF-Next's Instruct, Think and Captioner share one architecture and differ in data. The demo
data asks the same questions of `instruct` and `think` examples, so the prompt must say which one
is wanted: `think` opens the answer with `<think>` (the model then writes its timestamped chain and
`</think>` before the answer); `captioner` asks for a caption when no question is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from af_next_jax.config import ModelConfig, encoder_tokens_for_frames
from af_next_jax.data import audio as audio_lib
from af_next_jax.data.conversation import encode_conversation, uses_audio_markers
from af_next_jax.data.features import log_mel_windows, valid_frames_for_samples
from af_next_jax.data.manifest import AUDIO_PLACEHOLDER, AudioRef, Turn
from af_next_jax.data.tokenizer import Tokenizer

VARIANT_PREFIX = {"instruct": "", "think": "<think>", "captioner": ""}
CAPTION_QUESTION = "Describe the audio with timestamps."


@dataclasses.dataclass(frozen=True)
class AudioInput:
    """One audio, featurised: its windows' log-mel, valid frames and RoTE window indices."""

    mel_WxMxT: np.ndarray
    valid_frames_W: np.ndarray
    truncated_seconds: float

    @property
    def token_count(self) -> int:
        return int(encoder_tokens_for_frames(self.valid_frames_W.astype(np.int64)).sum())


def load_audio_input(ref: AudioRef | str, config: ModelConfig) -> AudioInput:
    """Load, cut into windows (at most `config.max_windows_per_audio`) and featurise one audio, as the
    data pipeline does; raises `audio_lib.AudioError` (with a `reason`) for unusable audio."""
    ref = AudioRef(ref) if isinstance(ref, str) else ref
    encoder = config.encoder
    samples = audio_lib.load_audio(ref.path, ref.start, ref.end)
    windows = audio_lib.split_windows(samples, encoder, config.max_windows_per_audio)
    frames_W = valid_frames_for_samples(windows.num_samples_W, encoder.mel_frames_per_window)
    # A last window too short for one encoder token adds nothing (the pipeline drops it too).
    keep = int(np.count_nonzero(encoder_tokens_for_frames(frames_W)))
    if keep == 0:
        raise audio_lib.AudioError("empty_audio", f"{ref.path}: {len(samples)} samples are too short for one "
                                                  f"encoder token")
    return AudioInput(log_mel_windows(windows.samples_WxS[:keep], encoder), frames_W[:keep].astype(np.int32),
                      windows.truncated_seconds)


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
                  config: ModelConfig, *, variant: str = "instruct") -> np.ndarray:
    """Token ids [n] int32 of `turns` followed by the opened assistant turn of `variant`."""
    if turns and turns[-1].role == "assistant":
        raise ValueError("a generation prompt ends with a user turn; drop the assistant answer first")
    assistant = Turn("assistant", VARIANT_PREFIX[variant])
    ids, _ = encode_conversation(list(turns) + [assistant], tokenizer, audio_token_counts,
                                 audio_markers=uses_audio_markers(config))
    closing = [tokenizer.special.im_end] + tokenizer.encode("\n")
    if [int(t) for t in ids[-len(closing):]] != closing:
        raise AssertionError(f"encode_conversation no longer closes a turn with <|im_end|>\\n "
                             f"(ends with {ids[-len(closing):].tolist()}); update encode_prompt")
    return ids[:-len(closing)]


def prompt_batch(token_rows: Sequence[np.ndarray], audios: Sequence[Sequence[AudioInput]], config: ModelConfig, *,
                 pad_id: int, length: int | None = None, num_windows: int | None = None) -> dict:
    """A left-padded batch (af_next_jax/inference/decoding.py) of prompts, each with its own audios.

    `length` / `num_windows` pad to static sizes (fewer recompilations across batches); by default
    the longest prompt and exactly the windows needed.
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
    flat = [audio for row in audios for audio in row]
    if not flat:
        return batch
    windows = sum(len(audio.valid_frames_W) for audio in flat)
    num_windows = windows if num_windows is None else num_windows
    if num_windows < windows:
        raise ValueError(f"the prompts need {windows} windows but num_windows is {num_windows}")
    encoder = config.encoder
    mel = np.zeros((num_windows, encoder.num_mel_bins, encoder.mel_frames_per_window), np.float32)
    valid = np.zeros(num_windows, np.int32)
    window_index = np.zeros(num_windows, np.int32)
    start = 0
    # Windows in the order their <sound> runs appear, row-major (the batch contract).
    for audio in flat:
        count = len(audio.valid_frames_W)
        mel[start:start + count] = audio.mel_WxMxT
        valid[start:start + count] = audio.valid_frames_W
        window_index[start:start + count] = np.arange(count)
        start += count
    return {**batch, "mel_windows": mel, "mel_valid_frames": valid, "window_index": window_index}
