"""Packing into the batch contract: segments, positions, shifted targets, window order, no cross-talk."""

import numpy as np

from af_next_jax import config as config_lib
from af_next_jax.batch import validate_batch
from af_next_jax.config import encoder_tokens_for_frames
from af_next_jax.data.packing import STATS_KEY, BatchBuilder

CONFIG = config_lib.tiny()
ENCODER = CONFIG.encoder
MEL_SHAPE = (ENCODER.num_mel_bins, ENCODER.mel_frames_per_window)


def _example(tag: int, text_length: int, valid_frames=()):
    """An example whose ids, mel and trainable flags encode `tag`, so the packed batch can be traced."""
    valid_frames = np.asarray(valid_frames, np.int32)
    audio = int(encoder_tokens_for_frames(valid_frames).sum()) if len(valid_frames) else 0
    ids = np.concatenate([np.full(text_length, 10 + tag), np.full(audio, CONFIG.audio_token_id),
                          np.arange(20, 23)]).astype(np.int32)
    ids[0] = 5  # a header token
    trainable = np.zeros(len(ids), bool)
    trainable[-3:] = True
    mel = np.full((len(valid_frames), *MEL_SHAPE), float(tag), np.float32)
    return {"token_ids": ids, "trainable": trainable, "mel": mel, "valid_frames": valid_frames,
            "window_index": np.arange(len(valid_frames), dtype=np.int32), "truncated_audio": 0}


def _pack(examples, batch_size=2, seq_len=256, max_windows=4):
    builder = BatchBuilder(batch_size, seq_len, max_windows, MEL_SHAPE, pad_id=0)
    added = [builder.try_add(example) for example in examples]
    return builder.build(), added


def test_segments_positions_and_targets_stay_inside_each_example():
    examples = [_example(1, 30, [500]), _example(2, 40), _example(3, 20, [500, 120])]
    batch, added = _pack(examples)
    assert all(added)
    batch.pop(STATS_KEY)
    validate_batch(batch, CONFIG)
    for row in range(2):
        for segment in np.unique(batch["segment_ids"][row]):
            if segment == 0:
                continue
            span = np.flatnonzero(batch["segment_ids"][row] == segment)
            ids = batch["token_ids"][row, span]
            assert np.all(np.diff(span) == 1)
            assert batch["positions"][row, span].tolist() == list(range(len(span)))
            assert batch["target_ids"][row, span[:-1]].tolist() == ids[1:].tolist()
            assert batch["target_ids"][row, span[-1]] == 0 and batch["loss_mask"][row, span[-1]] == 0
            # The last 3 tokens are trainable, so the 3 positions predicting them carry the loss.
            assert batch["loss_mask"][row, span].tolist() == [0.0] * (len(span) - 4) + [1.0, 1.0, 1.0, 0.0]
    assert batch["loss_mask"][batch["segment_ids"] == 0].sum() == 0


def test_windows_follow_sound_runs_in_row_major_order():
    # Row 0 gets examples 1 and 2 (the second fits after the first), row 1 gets example 3.
    examples = [_example(1, 50, [500]), _example(2, 10, [200]), _example(3, 150, [500, 300])]
    batch, added = _pack(examples, seq_len=400)
    assert all(added)
    assert batch["segment_ids"][0].max() == 2 and batch["segment_ids"][1].max() == 1
    tags = batch["mel_windows"][:, 0, 0].tolist()
    assert tags == [1.0, 2.0, 3.0, 3.0]
    assert batch["window_index"].tolist() == [0, 0, 0, 1]
    assert batch["mel_valid_frames"].tolist() == [500, 200, 500, 300]


def test_window_budget_and_row_length_close_the_batch():
    batch, added = _pack([_example(1, 10, [500, 500, 500]), _example(2, 10, [500, 500]), _example(3, 200)],
                         batch_size=1, seq_len=512, max_windows=4)
    assert added == [True, False, False]  # 3 + 2 windows > 4; 200 text tokens no longer fit the row


def test_text_only_batch_carries_padding_windows():
    batch, _ = _pack([_example(1, 30)], max_windows=2)
    batch.pop(STATS_KEY)
    validate_batch(batch, CONFIG)
    assert batch["mel_windows"].shape == (2, *MEL_SHAPE) and batch["mel_valid_frames"].tolist() == [0, 0]


def test_example_of_exactly_seq_len_fits_an_empty_row_and_longer_never_does():
    builder = BatchBuilder(2, 64, 8, MEL_SHAPE, pad_id=0)
    assert not builder.try_add(_example(1, 62))  # 65 tokens
    assert builder.try_add(_example(2, 61))  # 64 tokens
    assert builder.try_add(_example(3, 61)) and not builder.try_add(_example(4, 1))  # both rows full


def test_each_row_keeps_its_windows_in_its_own_slots():
    """4 rows, 8 windows: each row owns 2 slots. An example goes to the first row with room for its tokens
    and its windows; a row's windows start at its own first slot, whatever the other rows hold, so the
    device holding a row holds its audio (af_next_jax/batch.py)."""
    builder = BatchBuilder(4, 512, 8, MEL_SHAPE, pad_id=0)
    assert builder.try_add(_example(1, 240, [500]))
    # Row 0 has room for example 2's tokens but only one window slot left: row 1.
    assert builder.try_add(_example(2, 30, [500, 500]))
    assert builder.try_add(_example(3, 30, [300]))  # row 0: its tokens and one window fit
    assert not builder.try_add(_example(4, 30, [500, 500, 500]))  # more windows than a row owns
    batch = builder.build()
    batch.pop(STATS_KEY)
    validate_batch(batch, CONFIG)
    assert [int(ids[1]) for ids in batch["token_ids"]] == [11, 12, 0, 0]
    np.testing.assert_array_equal(batch["mel_valid_frames"], [500, 300, 500, 500, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["mel_windows"][:, 0, 0], [1, 3, 2, 2, 0, 0, 0, 0])


def _window_slices(batch, row, slot_blocks):
    """(block of each valid window's slot, slice of the row holding the window's first <sound> token)."""
    seq_len = batch["token_ids"].shape[1]
    per_row = len(batch["mel_valid_frames"]) // batch["token_ids"].shape[0]
    frames = batch["mel_valid_frames"][row * per_row:(row + 1) * per_row]
    slots = np.flatnonzero(frames)
    tokens = encoder_tokens_for_frames(frames[slots].astype(np.int64))
    sound_positions = np.flatnonzero(batch["token_ids"][row] == CONFIG.audio_token_id)
    first_positions = sound_positions[np.cumsum(tokens) - tokens]
    return slots // (per_row // slot_blocks), first_positions // (seq_len // slot_blocks)


def test_with_slot_blocks_each_window_sits_in_the_block_of_its_first_tokens_slice():
    """4 blocks of 2 slots a row, slices of 64 tokens: a window (25 tokens) goes to the block of the slice
    its <sound> run starts in, in order, padding windows between the blocks."""
    examples = [_example(1, 30, [100, 100]), _example(2, 70, [100]), _example(3, 20, [100, 100, 100])]
    builder = BatchBuilder(2, 256, 16, MEL_SHAPE, pad_id=0, audio_token_id=CONFIG.audio_token_id, slot_blocks=4)
    assert all(builder.try_add(example) for example in examples)
    batch = builder.build()
    batch.pop(STATS_KEY)
    validate_batch(batch, CONFIG)
    for row in range(2):
        blocks, slices = _window_slices(batch, row, 4)
        assert len(blocks) and blocks.tolist() == slices.tolist()
    # Without blocks the windows of a row lead its slots: the first window of example 2 (row 0, starting
    # after 30 + 50 + 3 + 70 tokens, slice 2) would sit in block 1.
    plain = _pack(examples, max_windows=16)[0]
    blocks, slices = _window_slices(plain, 0, 4)
    assert blocks.tolist() != slices.tolist()


def test_a_row_with_a_full_block_refuses_the_windows_that_start_in_its_slice():
    """Blocks of one slot: a second window starting in slice 0 of row 0 makes the example go to row 1,
    and to no row once both rows' slice 0 is taken."""
    builder = BatchBuilder(2, 256, 8, MEL_SHAPE, pad_id=0, audio_token_id=CONFIG.audio_token_id, slot_blocks=4)
    assert builder.try_add(_example(1, 5, [20]))
    assert builder.try_add(_example(2, 5, [20]))       # slice 0 of row 0 is full: row 1
    assert not builder.try_add(_example(3, 5, [20]))   # both are full
    assert builder.try_add(_example(4, 70, [20]))      # its window starts in slice 1 of row 0
    assert [len(examples) for examples in builder.rows] == [2, 1]
