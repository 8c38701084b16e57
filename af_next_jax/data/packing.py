"""Sequence packing into the static-shape batch of af_next_jax/batch.py, as a checkpointable grain stage.

First fit: each example goes into the first of the B rows with room for its tokens and, among the
W / B window slots the row owns (af_next_jax/batch.py), for its windows; the first example that fits
nowhere closes the batch and opens the next one. Examples are never split, so no attention crosses
examples and an audio's `<sound>` run never straddles two rows.

With `slot_blocks` = S > 1 (a sequence-parallel mesh: model/audio_merge.py `slot_blocks`), a row's
slots form S equal blocks, one per slice of L / S tokens, and each window goes to the block of the slice
that holds its first `<sound>` token: the device holding a slice then finds every window its slice
needs on itself or its left neighbour (when no window is longer than a slice). A row has room for an
example only if each block has room for the example's windows that start in its slice.

Each batch also carries `STATS_KEY`: per-reason counts of the examples skipped while it was built,
the number of examples packed and of audios truncated at the window cap. `BatchIterator` pops it.
"""

from __future__ import annotations

import logging

import numpy as np
import grain

from af_next_jax.batch import windows_per_row
from af_next_jax.config import encoder_tokens_for_frames
from af_next_jax.data.audio_features import layout_windows
from af_next_jax.data.manifest import SKIP_REASONS

logger = logging.getLogger(__name__)

STATS_KEY = "_data_stats"
STAT_NAMES = SKIP_REASONS + ("examples", "truncated_audio")


class BatchBuilder:
    """Accumulates prepared examples into one batch of `batch_size` rows x `seq_len` tokens."""

    def __init__(self, batch_size: int, seq_len: int, max_windows: int, mel_shape: tuple[int, int], pad_id: int,
                 audio_token_id: int | None = None, slot_blocks: int = 1):
        self.batch_size, self.seq_len, self.max_windows = batch_size, seq_len, max_windows
        self.windows_per_row = windows_per_row(batch_size, max_windows)
        if slot_blocks < 1 or self.windows_per_row % slot_blocks or seq_len % slot_blocks:
            raise ValueError(f"slot_blocks={slot_blocks} must divide both the {self.windows_per_row} window slots of a "
                             f"row and seq_len={seq_len}")
        if slot_blocks > 1 and audio_token_id is None:
            raise ValueError("slot_blocks > 1 places windows by their <sound> tokens: give audio_token_id")
        self.mel_shape, self.pad_id, self.audio_token_id = mel_shape, pad_id, audio_token_id
        self.slot_blocks, self.block_slots = slot_blocks, self.windows_per_row // slot_blocks
        self.rows: list[list[dict]] = [[] for _ in range(batch_size)]
        self.row_slots: list[list[np.ndarray]] = [[] for _ in range(batch_size)]
        self.row_lengths = [0] * batch_size
        self.block_fill = np.zeros((batch_size, slot_blocks), np.int64)  # windows placed in each row's blocks
        self.stats = np.zeros(len(STAT_NAMES), np.int64)

    @property
    def empty(self) -> bool:
        return not any(self.row_lengths)

    def count_skip(self, reason: str) -> None:
        self.stats[STAT_NAMES.index(reason)] += 1

    def _window_starts(self, example: dict) -> np.ndarray:
        """The position in the example of each window's first `<sound>` token (a window without tokens:
        where the next one starts)."""
        if self.slot_blocks == 1:
            return np.zeros(len(example["valid_frames"]), np.int64)
        tokens_W = encoder_tokens_for_frames(np.asarray(example["valid_frames"], np.int64))
        sound_positions = np.flatnonzero(np.asarray(example["token_ids"]) == self.audio_token_id)
        if len(sound_positions) != tokens_W.sum():
            raise ValueError(f"an example holds {len(sound_positions)} <sound> tokens but its windows give "
                             f"{tokens_W.sum()} encoder tokens")
        first_rank_W = np.cumsum(tokens_W) - tokens_W
        return sound_positions[np.minimum(first_rank_W, len(sound_positions) - 1)] if len(sound_positions) else \
            np.zeros(len(tokens_W), np.int64)

    def try_add(self, example: dict) -> bool:
        length = len(example["token_ids"])
        starts_W = self._window_starts(example)
        for row, used in enumerate(self.row_lengths):
            if used + length > self.seq_len:
                continue
            blocks_W = (used + starts_W) // (self.seq_len // self.slot_blocks)
            fill_W = self.block_fill[row, blocks_W] + np.arange(len(blocks_W)) - np.searchsorted(blocks_W, blocks_W)
            if np.any(fill_W >= self.block_slots):
                continue
            self.rows[row].append(example)
            self.row_slots[row].append(blocks_W * self.block_slots + fill_W)
            self.row_lengths[row] += length
            np.add.at(self.block_fill[row], blocks_W, 1)
            self.stats[STAT_NAMES.index("examples")] += 1
            self.stats[STAT_NAMES.index("truncated_audio")] += example["truncated_audio"]
            return True
        return False

    def build(self) -> dict:
        shape = (self.batch_size, self.seq_len)
        token_ids = np.full(shape, self.pad_id, np.int32)
        positions = np.zeros(shape, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        target_ids = np.zeros(shape, np.int32)
        loss_mask = np.zeros(shape, np.float32)
        for row, examples in enumerate(self.rows):
            offset = 0
            for segment, example in enumerate(examples, start=1):
                ids, length = example["token_ids"], len(example["token_ids"])
                span = slice(offset, offset + length)
                token_ids[row, span] = ids
                positions[row, span] = np.arange(length)
                segment_ids[row, span] = segment
                # Targets stay inside the example: its last token predicts nothing.
                target_ids[row, offset:offset + length - 1] = ids[1:]
                loss_mask[row, offset:offset + length - 1] = example["trainable"][1:]
                offset += length
        # Every example is one run of windows; inference lays out its prompts' audios the same way.
        windows = layout_windows(self.rows, self.max_windows, self.mel_shape, self.row_slots)
        return {"token_ids": token_ids, "positions": positions, "segment_ids": segment_ids,
                "target_ids": target_ids, "loss_mask": loss_mask, **windows, STATS_KEY: self.stats.copy()}


class PackedBatchIterDataset(grain.IterDataset):
    """Prepared examples (or `{"skip": reason}` records) -> packed batches."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, seq_len: int, max_windows: int,
                 mel_shape: tuple[int, int], pad_id: int, audio_token_id: int | None = None, slot_blocks: int = 1):
        super().__init__(parent)
        self._builder_args = (batch_size, seq_len, max_windows, tuple(mel_shape), pad_id, audio_token_id, slot_blocks)

    def __iter__(self):
        return _PackedBatchIterator(self._parent.__iter__(), self._builder_args)

    def __str__(self) -> str:
        return f"PackedBatchIterDataset{self._builder_args[:3]}"


def _never_fits(builder_args, example: dict) -> bool:
    """Whether not even an empty batch takes the example: more windows than a row's slots, or than a
    block's when its windows crowd one slice. Such an example is skipped (and counted), not carried over."""
    empty = BatchBuilder(*builder_args)
    if empty.try_add(example):
        return False
    logger.warning("skipping an example of %d tokens: its %d windows do not fit the %d window slots of a row "
                   "(in %d blocks of %d)", len(example["token_ids"]), len(example["valid_frames"]),
                   empty.windows_per_row, empty.slot_blocks, empty.block_slots)
    return True


class _PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, builder_args):
        super().__init__(parent)
        self._builder_args = builder_args
        # The example that closed the previous batch, and the parent state from before it was read:
        # saving that state (not the current one) makes a restored iterator re-read it.
        self._pending: dict | None = None
        self._pending_state = None

    def __next__(self) -> dict:
        builder = BatchBuilder(*self._builder_args)
        if self._pending is not None:
            builder.try_add(self._pending)  # it fits an empty batch (`_never_fits`)
            self._pending = self._pending_state = None
        while True:
            state = self._parent.get_state()
            try:
                example = next(self._parent)
            except StopIteration:
                if builder.empty:
                    raise
                return builder.build()
            if "skip" in example:
                builder.count_skip(example["skip"])
            elif not builder.try_add(example):
                if _never_fits(self._builder_args, example):
                    builder.count_skip("too_many_windows")
                    continue
                self._pending, self._pending_state = example, state
                return builder.build()

    def get_state(self) -> dict:
        return {"parent": self._pending_state if self._pending is not None else self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
