"""Packed rows: several examples in one row give each example the logits it gets alone.

The data pipeline packs examples into rows (af_next_jax/data/packing.py): segment ids 1, 2, ... per
example, positions restarting at 0, each row's windows in its own slots in `<sound>` order. Here the
pipeline's own `BatchBuilder` packs four examples into two rows, with audio in two examples of row 0
(one of two windows, one of one) and a text-only example between them. References, per example:
  - our model on that example alone (one row, its own windows): the packed logits must equal them;
  - transformers on that example alone (MusicFlamingo with RoTE, AudioFlamingo3 without), the
    spec of tests/model/test_parity_transformers.py, at its tolerance.
An example that sees another example's tokens (a decoder that ignores segment ids) or whose RoTE
window index runs on from the previous audio's windows gets other logits.
"""

import jax
import numpy as np
import pytest

from af_next_jax.config import tiny
from af_next_jax.data.packing import BatchBuilder
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import PAD_ID, synthetic_batch, to_transformers_inputs
from hf_reference import build_audio_model, transformers_logits

FRAMES = tiny().encoder.mel_frames_per_window  # 500 frames = one window of the tiny config
SEQ_LEN = 320
NUM_WINDOWS = 6  # 3 window slots per row
# Audio frames of each example; packed first fit into two rows: [A, B, C] and [D].
EXAMPLES = {"A": [FRAMES + 200], "B": [], "C": [260], "D": [FRAMES, 120]}
EXPECTED_ROWS = (("A", "B", "C"), ("D",))
# Packed against alone is the same float32 computation in other batch shapes: only summation order
# may differ (measured ~1e-7 of the logit scale).
SAME_COMPUTATION_TOLERANCE = 1e-5
TRANSFORMERS_TOLERANCE = 1e-4  # as tests/model/test_parity_transformers.py


def single_example(config, frames, seed):
    """One example as the pipeline prepares it (the BatchBuilder's input) and as a one-row batch."""
    alone = synthetic_batch(config, audio_frames_per_example=[frames], seq_len=SEQ_LEN, seed=seed,
                            text_tokens_between=4 + seed)
    length = int((alone["token_ids"][0] != PAD_ID).sum())
    windows = int((alone["mel_valid_frames"] > 0).sum())
    trainable = np.ones(length, np.int32)
    trainable[0] = 0
    example = {"token_ids": alone["token_ids"][0, :length], "trainable": trainable, "truncated_audio": 0,
               "mel": alone["mel_windows"][:windows], "valid_frames": alone["mel_valid_frames"][:windows],
               "window_index": alone["window_index"][:windows]}
    return example, alone, length


def pack(config, examples):
    encoder = config.encoder
    builder = BatchBuilder(batch_size=2, seq_len=SEQ_LEN, max_windows=NUM_WINDOWS,
                           mel_shape=(encoder.num_mel_bins, encoder.mel_frames_per_window), pad_id=PAD_ID)
    for name, example in examples.items():
        assert builder.try_add(example), f"example {name} did not fit"
    batch = builder.build()
    batch.pop("_data_stats")
    return batch


def example_spans(batch, lengths):
    """(row, start, length) of each named example, read back from segment_ids and checked against
    EXPECTED_ROWS, so the test cannot silently stop packing."""
    spans, names = {}, iter(lengths)
    for row, row_names in enumerate(EXPECTED_ROWS):
        segments = batch["segment_ids"][row]
        assert sorted(set(segments[segments > 0])) == list(range(1, len(row_names) + 1))
        for segment, name in enumerate(row_names, start=1):
            assert name == next(names)
            where = np.flatnonzero(segments == segment)
            assert len(where) == lengths[name] and (np.diff(where) == 1).all()
            np.testing.assert_array_equal(batch["positions"][row, where], np.arange(lengths[name]))
            spans[name] = (row, int(where[0]), lengths[name])
    return spans


@pytest.fixture(scope="module", params=["musicflamingo", "audioflamingo3"])
def packed(request):
    config = tiny() if request.param == "musicflamingo" else tiny(rote=None)
    hf_model, params = build_audio_model(config, seed=5)
    prepared = {name: single_example(config, frames, seed) for seed, (name, frames) in enumerate(EXAMPLES.items())}
    batch = pack(config, {name: example for name, (example, _, _) in prepared.items()})
    # Audio in two examples of row 0 and in row 1; the RoTE window index restarts with each audio.
    np.testing.assert_array_equal(batch["mel_valid_frames"], [FRAMES, 200, 260, FRAMES, 120, 0])
    np.testing.assert_array_equal(batch["window_index"], [0, 1, 0, 0, 0, 0])
    spans = example_spans(batch, {name: length for name, (_, _, length) in prepared.items()})
    apply = jax.jit(AFNextModel(config).apply)
    logits = np.asarray(apply(params, batch))
    alone = {name: (single_batch, np.asarray(apply(params, single_batch))) for name, (_, single_batch, _)
             in prepared.items()}
    return hf_model, spans, logits, alone


def max_relative_difference(actual, reference):
    return np.abs(actual - reference).max() / np.abs(reference).max()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_packed_example_gets_the_logits_it_gets_alone(packed, name):
    _, spans, logits, alone = packed
    row, start, length = spans[name]
    difference = max_relative_difference(logits[row, start:start + length], alone[name][1][0, :length])
    assert difference <= SAME_COMPUTATION_TOLERANCE, f"{name}: {difference:.3g} of the logit scale"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_packed_example_gets_the_transformers_logits_of_that_example(packed, name):
    hf_model, spans, logits, alone = packed
    row, start, length = spans[name]
    reference = transformers_logits(hf_model, to_transformers_inputs(alone[name][0]))[0, :length]
    difference = max_relative_difference(logits[row, start:start + length], reference)
    assert difference <= TRANSFORMERS_TOLERANCE, f"{name}: {difference:.3g} of the logit scale"
