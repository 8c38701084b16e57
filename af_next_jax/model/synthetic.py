"""Random but valid batches (per `af_next_jax/batch.py`) for tests, benchmarks and `convert verify`."""

from __future__ import annotations

import numpy as np

from af_next_jax.batch import windows_per_row
from af_next_jax.config import ModelConfig, encoder_tokens_for_frames

PAD_ID = 0


def split_into_windows(mel_frames: int, frames_per_window: int) -> list[int]:
    """Valid frames of each non-overlapping window of an audio of `mel_frames` frames."""
    full, rest = divmod(mel_frames, frames_per_window)
    return [frames_per_window] * full + ([rest] if rest else [])


def synthetic_batch(config: ModelConfig, *, audio_frames_per_example: list[list[int]], seq_len: int,
                    num_windows: int | None = None, seed: int = 0, text_tokens_between: int = 3) -> dict:
    """One example per row; example b holds audios of `audio_frames_per_example[b]` mel frames each.

    Row layout: text, then per audio `<|sound_bos|>` N x `<sound>` `<|sound_eos|>` + text, then padding.
    Every token but the last of an example is trained (loss_mask 1). `num_windows` is the static window
    axis, a multiple of the rows (each row owns num_windows / rows slots, af_next_jax/batch.py; default:
    rows x the most windows any row needs, at least one each).
    """
    rng = np.random.default_rng(seed)
    encoder = config.encoder
    special = {config.audio_token_id, config.audio_bos_token_id, config.audio_eos_token_id, PAD_ID}
    text_vocab = np.array([t for t in range(min(config.decoder.vocab_size, 4096)) if t not in special])

    batch_size = len(audio_frames_per_example)
    token_ids = np.full((batch_size, seq_len), PAD_ID, np.int32)
    window_frames, window_index = [[] for _ in range(batch_size)], [[] for _ in range(batch_size)]
    for row, audio_frames in enumerate(audio_frames_per_example):
        tokens = list(rng.choice(text_vocab, text_tokens_between))
        for frames in audio_frames:
            windows = split_into_windows(frames, encoder.mel_frames_per_window)
            window_frames[row] += windows
            window_index[row] += list(range(len(windows)))
            sound_tokens = int(sum(encoder_tokens_for_frames(w) for w in windows))
            tokens += [config.audio_bos_token_id] + [config.audio_token_id] * sound_tokens + [config.audio_eos_token_id]
            tokens += list(rng.choice(text_vocab, text_tokens_between))
        if len(tokens) > seq_len:
            raise ValueError(f"example {row} needs {len(tokens)} tokens but seq_len is {seq_len}")
        token_ids[row, :len(tokens)] = tokens

    lengths = (token_ids != PAD_ID).sum(axis=1)
    valid_BxL = np.arange(seq_len)[None, :] < lengths[:, None]
    target_ids = np.where(np.arange(seq_len)[None, :] < (lengths - 1)[:, None], np.roll(token_ids, -1, axis=1), 0)
    needed = max(max(len(frames) for frames in window_frames), 1)
    slots = needed if num_windows is None else windows_per_row(batch_size, num_windows)
    if slots < needed:
        raise ValueError(f"a row needs {needed} windows but {num_windows} windows give each of the {batch_size} "
                         f"rows {slots}")
    num_windows = batch_size * slots
    mel_valid_frames = np.zeros(num_windows, np.int32)
    windows_index = np.zeros(num_windows, np.int32)
    for row in range(batch_size):
        count = len(window_frames[row])
        mel_valid_frames[row * slots:row * slots + count] = window_frames[row]
        windows_index[row * slots:row * slots + count] = window_index[row]
    mel = rng.normal(size=(num_windows, encoder.num_mel_bins, encoder.mel_frames_per_window)).astype(np.float32)
    return {
        "token_ids": token_ids,
        "positions": np.where(valid_BxL, np.arange(seq_len)[None, :], 0).astype(np.int32),
        "segment_ids": valid_BxL.astype(np.int32),
        "target_ids": target_ids.astype(np.int32),
        "loss_mask": (target_ids != 0).astype(np.float32) * valid_BxL,
        "mel_windows": mel,
        "mel_valid_frames": mel_valid_frames,
        "window_index": windows_index,
    }


def to_transformers_inputs(batch: dict) -> dict:
    """The same batch as transformers' MusicFlamingo/AF3 `forward` takes it (numpy arrays).

    Only real windows are passed (padding windows dropped); rows are right-padded with an attention mask.
    """
    real = batch["mel_valid_frames"] > 0
    frames = batch["mel_windows"].shape[-1]
    inputs = {"input_ids": batch["token_ids"].astype(np.int64),
              "attention_mask": (batch["segment_ids"] > 0).astype(np.int64)}
    if real.any():
        inputs["input_features"] = batch["mel_windows"][real]
        inputs["input_features_mask"] = (np.arange(frames)[None, :] < batch["mel_valid_frames"][real][:, None]
                                         ).astype(np.int64)
    return inputs
