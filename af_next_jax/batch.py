"""The batch contract between the data pipeline, the model and the trainer.

A batch is a dict of arrays with static shapes (so one compiled step serves every batch):

  token_ids       [B, L] int32    text ids; each audio is `<|sound_bos|>` + N x `<sound>` + `<|sound_eos|>` (AF3: the bare run)
  positions       [B, L] int32    RoPE position of each token inside its packed example (0, 1, ...)
  segment_ids     [B, L] int32    packed example of each token: 1, 2, ... per row; 0 = padding
  target_ids      [B, L] int32    the next token of the same example (already shifted; 0 where none)
  loss_mask       [B, L] float32  1 where target_ids is trained (assistant turns), else 0
  mel_windows     [W, M, T] float32  log-mel of every 30 s window in the batch (M mel bins, T frames)
  mel_valid_frames [W] int32      valid (unpadded) mel frames of each window; 0 = padding window
  window_index    [W] int32       index of the window inside its audio (0, 1, ...; resets per audio),
                                  the window axis of RoTE

Every row owns W / B window slots (W is a multiple of B): row b's windows are slots
[b W/B, (b + 1) W/B), in the order their `<sound>` runs appear in the row, padding windows (valid
frames 0) anywhere among and after them. Without sequence parallelism the windows come first and
consecutive; with it, a row's slots form S equal blocks, one per slice of L / S tokens, and each window
sits in the block of the slice holding its first `<sound>` token (data/packing.py), which only makes the
merge cheaper: any order of a row's windows merges to the same embeddings. The `<sound>` run of an
audio holds exactly `sum(encoder_tokens_for_frames(mel_valid_frames[w]))` over its windows: the model
puts the k-th valid encoder token of row b's windows into row b's k-th `<sound>` slot (transformers'
`masked_scatter` reads the whole batch row-major, which is the same order). Rows own their windows so
that the device holding a row holds its audio: the merge never needs another row's windows
(model/audio_merge.py). Text-only rows hold padding windows only.
"""

from __future__ import annotations

import numpy as np

from af_next_jax.config import ModelConfig, encoder_tokens_for_frames

TEXT_FIELDS = ("token_ids", "positions", "segment_ids", "target_ids", "loss_mask")
AUDIO_FIELDS = ("mel_windows", "mel_valid_frames", "window_index")
FIELDS = TEXT_FIELDS + AUDIO_FIELDS


def windows_per_row(batch_size: int, num_windows: int) -> int:
    """W / B: the window slots each row owns (see the module docstring)."""
    if batch_size <= 0 or num_windows % batch_size:
        raise ValueError(f"{num_windows} windows do not split into equal window slots for {batch_size} rows; "
                         f"every row owns W / B of them: use a multiple of {batch_size}")
    return num_windows // batch_size


def zeros_batch(config: ModelConfig, *, batch_size: int, seq_len: int, num_windows: int) -> dict:
    """An all-padding batch with the contract's static shapes (text-only, padding windows): for
    shapes, abstract init and compilation."""
    windows_per_row(batch_size, num_windows)
    encoder = config.encoder
    text = {name: np.zeros((batch_size, seq_len), np.int32) for name in TEXT_FIELDS if name != "loss_mask"}
    return {**text, "loss_mask": np.zeros((batch_size, seq_len), np.float32),
            "mel_windows": np.zeros((num_windows, encoder.num_mel_bins, encoder.mel_frames_per_window), np.float32),
            "mel_valid_frames": np.zeros((num_windows,), np.int32),
            "window_index": np.zeros((num_windows,), np.int32)}


def abstract_batch(config: ModelConfig, *, batch_size: int, seq_len: int, num_windows: int, leading=(),
                   shardings: dict | None = None) -> dict:
    """`zeros_batch`'s layout as jax.ShapeDtypeStructs (with `leading` axes first, e.g. (micro-batches,)),
    allocating nothing: the mel windows of a 7B batch alone are gigabytes."""
    import jax

    example = zeros_batch(config, batch_size=1, seq_len=1, num_windows=1)
    sizes = {name: (batch_size, seq_len) for name in TEXT_FIELDS} | {name: (num_windows,) for name in AUDIO_FIELDS}
    return {name: jax.ShapeDtypeStruct(tuple(leading) + sizes[name] + value.shape[len(sizes[name]):], value.dtype,
                                       sharding=(shardings or {}).get(name))
            for name, value in example.items()}


def validate_batch(batch: dict, config: ModelConfig) -> None:
    """Host-side check of the contract above; raises ValueError naming the field and the numbers."""
    missing = [name for name in FIELDS if name not in batch]
    if missing:
        raise ValueError(f"batch is missing fields {missing}; a batch needs {list(FIELDS)}")
    text_shape = np.shape(batch["token_ids"])
    if len(text_shape) != 2:
        raise ValueError(f"token_ids must be [batch, length], got shape {text_shape}")
    for name in TEXT_FIELDS:
        if np.shape(batch[name]) != text_shape:
            raise ValueError(f"{name} has shape {np.shape(batch[name])}, expected {text_shape} like token_ids")
    encoder = config.encoder
    expected_mel = (encoder.num_mel_bins, encoder.mel_frames_per_window)
    mel_shape = np.shape(batch["mel_windows"])
    if len(mel_shape) != 3 or mel_shape[1:] != expected_mel:
        raise ValueError(f"mel_windows must be [windows, {expected_mel[0]}, {expected_mel[1]}], got {mel_shape}")
    for name in ("mel_valid_frames", "window_index"):
        if np.shape(batch[name]) != mel_shape[:1]:
            raise ValueError(f"{name} has shape {np.shape(batch[name])}, expected ({mel_shape[0]},)")
    valid_frames = np.asarray(batch["mel_valid_frames"])
    if valid_frames.min(initial=0) < 0 or valid_frames.max(initial=0) > encoder.mel_frames_per_window:
        raise ValueError(f"mel_valid_frames must lie in [0, {encoder.mel_frames_per_window}], "
                         f"got range [{valid_frames.min()}, {valid_frames.max()}]")
    rows = text_shape[0]
    slots_per_row = windows_per_row(rows, mel_shape[0])
    audio_slots_B = (np.asarray(batch["token_ids"]) == config.audio_token_id).sum(axis=1)
    audio_tokens_B = encoder_tokens_for_frames(valid_frames.astype(np.int64)).reshape(rows, slots_per_row).sum(axis=1)
    for row in np.flatnonzero(audio_slots_B != audio_tokens_B):
        raise ValueError(f"row {row} holds {audio_slots_B[row]} <sound> slots (id {config.audio_token_id}) but its "
                         f"windows (slots {row * slots_per_row}-{(row + 1) * slots_per_row - 1}) give "
                         f"{audio_tokens_B[row]} encoder tokens; they must be equal")
