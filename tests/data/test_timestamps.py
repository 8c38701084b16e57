"""RoTE inputs: the pipeline's window_index + token layout give transformers' `_build_audio_timestamps`.

transformers (`MusicFlamingoModel._build_audio_timestamps`) derives each audio's
window index from the `<sound>` runs in input_ids; our batch states it in `window_index`. Both must
give the same time for every audio token: t = 30 w + 0.04 j (5 w + 0.04 j for the tiny preset).
"""

import types

import numpy as np
import pytest

from af_next_jax.config import MEL_FRAMES_PER_AUDIO_TOKEN, encoder_tokens_for_frames
from af_next_jax.data.pipeline import DataConfig, make_batch_iterator


def _our_timestamps(batch, encoder, frame_step):
    """Seconds of every valid audio token, window by window, from the batch fields alone."""
    token_seconds = frame_step * MEL_FRAMES_PER_AUDIO_TOKEN
    rows = []
    for frames, window in zip(batch["mel_valid_frames"], batch["window_index"]):
        if frames == 0:
            continue
        tokens = int(encoder_tokens_for_frames(int(frames)))
        rows.append(window * encoder.tokens_per_window * token_seconds + np.arange(tokens) * token_seconds)
    return rows


def test_window_index_matches_transformers_audio_timestamps(demo_dir, tiny_config):
    torch = pytest.importorskip("torch")
    from transformers.models.musicflamingo.modeling_musicflamingo import MusicFlamingoModel

    config = DataConfig(manifests=(str(demo_dir / "train.jsonl"),), tokenizer=str(demo_dir / "tokenizer.json"),
                        seq_len=1024, batch_size=2, max_windows_per_batch=12, num_threads=1,
                        process_index=0, process_count=1)
    iterator = make_batch_iterator(config, tiny_config)
    encoder, frame_step = tiny_config.encoder, tiny_config.rote.audio_frame_step
    checked_second_windows = 0
    for _ in range(3):
        batch = next(iterator)
        valid = batch["mel_valid_frames"] > 0
        post_lengths = torch.as_tensor(encoder_tokens_for_frames(batch["mel_valid_frames"][valid].astype(np.int64)))
        fake_model = types.SimpleNamespace(config=types.SimpleNamespace(
            audio_token_id=tiny_config.audio_token_id, audio_frame_step=frame_step))
        reference = MusicFlamingoModel._build_audio_timestamps(
            fake_model, torch.as_tensor(batch["token_ids"], dtype=torch.long), post_lengths,
            encoder.tokens_per_window).numpy()
        ours = _our_timestamps(batch, encoder, frame_step)
        assert len(ours) == len(reference)
        for window_times, reference_row, length in zip(ours, reference, post_lengths.tolist()):
            np.testing.assert_allclose(window_times, reference_row[:length], atol=1e-4)
        checked_second_windows += int((batch["window_index"][valid] > 0).sum())
    assert checked_second_windows > 0, "the demo should hold audio longer than one window"
