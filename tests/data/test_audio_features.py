"""One featurisation and one window layout for training and inference (af_next_jax/data/audio_features.py).

The data pipeline's prepared example (`ExamplePreparer`) and inference's `load_audio_input` must give
the same windows, valid frames, RoTE window indices, `<sound>` counts and log-mel for the same audio,
the edge cases included (a zero-token last window, an audio over the window cap, an empty audio); a
packed batch and a prompt batch must lay the same audios out alike (af_next_jax/batch.py's contract).
Tiny encoder: 5 s windows of 500 mel frames, at most 4 windows per audio.
"""

import json

import numpy as np
import pytest

from af_next_jax.batch import validate_batch
from af_next_jax.config import SAMPLE_RATE, encoder_tokens_for_frames
from af_next_jax.data.audio import AudioError
from af_next_jax.data.audio_features import example_windows, featurize_audio
from af_next_jax.data.packing import BatchBuilder
from af_next_jax.data.pipeline import ExamplePreparer
from af_next_jax.inference.prompts import load_audio_input, prompt_batch

WINDOW = 5 * SAMPLE_RATE
# name -> (samples, windows kept, valid frames of the last kept window, truncated)
AUDIOS = {
    "two_windows_and_a_short_tail": (int(12.3 * SAMPLE_RATE), 3, 230, False),
    "zero_token_tail": (2 * WINDOW + 200, 2, 500, False),   # 200 samples: 2 mel frames, no encoder token
    "over_the_window_cap": (23 * SAMPLE_RATE, 4, 500, True),  # 5 windows, the cap keeps 4
}


def _noise(num_samples: int, seed: int) -> np.ndarray:
    return 0.1 * np.random.default_rng(seed).normal(size=num_samples).astype(np.float32)


@pytest.fixture
def preparer(demo_dir, tiny_config):
    return ExamplePreparer(tokenizer_path=str(demo_dir / "tokenizer.json"), model_config=tiny_config, seq_len=4096,
                           max_windows_per_audio=tiny_config.max_windows_per_audio, max_windows_per_batch=16)


def _manifest_line(path: str) -> str:
    return json.dumps({"audio": [path], "conversation": [{"role": "user", "content": "<sound>\nWhat is it?"},
                                                         {"role": "assistant", "content": "A noise."}]})


@pytest.mark.parametrize("name", sorted(AUDIOS))
def test_training_and_inference_featurise_an_audio_alike(name, preparer, tiny_config, demo_tokenizer, tmp_path,
                                                         write_wav):
    num_samples, windows, last_frames, truncated = AUDIOS[name]
    path = write_wav(tmp_path / f"{name}.wav", _noise(num_samples, seed=len(name)))
    prepared = preparer(("manifest.jsonl", 1, _manifest_line(path)))
    assert "skip" not in prepared, prepared
    audio = load_audio_input(path, tiny_config)

    np.testing.assert_array_equal(prepared["mel"], audio.mel_WxMxT)
    np.testing.assert_array_equal(prepared["valid_frames"], audio.valid_frames_W)
    np.testing.assert_array_equal(prepared["window_index"], audio.window_index_W)
    assert int((prepared["token_ids"] == demo_tokenizer.special.audio).sum()) == audio.token_count
    assert prepared["truncated_audio"] == int(audio.truncated_seconds > 0)
    # ... and both are what the rules say (audio_features.py's docstring), not merely equal.
    assert audio.valid_frames_W.tolist() == [500] * (windows - 1) + [last_frames]
    assert audio.window_index_W.tolist() == list(range(windows))
    assert audio.token_count == int(encoder_tokens_for_frames(audio.valid_frames_W).sum())
    assert audio.mel_WxMxT.shape == (windows, 128, 500)
    assert (audio.truncated_seconds > 0) == truncated


def test_an_empty_audio_is_skipped_in_training_and_an_error_in_inference(preparer, tiny_config, tmp_path, write_wav):
    path = write_wav(tmp_path / "blip.wav", _noise(250, seed=0))  # 2 mel frames: no encoder token
    assert preparer(("manifest.jsonl", 1, _manifest_line(path))) == {"skip": "empty_audio"}
    with pytest.raises(AudioError) as raised:
        load_audio_input(path, tiny_config)
    assert raised.value.reason == "empty_audio"


def test_prompt_batches_and_packed_batches_lay_out_the_same_audios_alike(tiny_config, demo_tokenizer):
    """Row 0 holds audios A (2 windows) and B (1), row 1 audio C (3). Each row owns 8 / 2 = 4 window slots
    (af_next_jax/batch.py): its audios' windows first, each audio's consecutive, window_index restarting
    per audio, then the row's padding windows (0 valid frames)."""
    encoder, special = tiny_config.encoder, demo_tokenizer.special
    lengths = {"A": int(7.1 * SAMPLE_RATE), "B": int(2.0 * SAMPLE_RATE), "C": int(14.2 * SAMPLE_RATE)}
    audios = {name: featurize_audio(_noise(n, seed=i), encoder, tiny_config.max_windows_per_audio, name=name)
              for i, (name, n) in enumerate(lengths.items())}
    rows = [["A", "B"], ["C"]]

    def row_ids(names):
        ids = [special.im_start, 5]
        for name in names:
            ids += [special.audio_bos] + [special.audio] * audios[name].token_count + [special.audio_eos, 6]
        return np.asarray(ids, np.int32)

    num_windows, seq_len = 8, max(len(row_ids(names)) for names in rows)
    builder = BatchBuilder(2, seq_len, num_windows, (encoder.num_mel_bins, encoder.mel_frames_per_window), special.pad)
    for names in rows:  # each example fills most of a row, so first fit puts the second one in row 1
        ids = row_ids(names)
        example = {"token_ids": ids, "trainable": np.zeros(len(ids), bool), "truncated_audio": 0,
                   **example_windows([audios[name] for name in names], encoder)}
        assert builder.try_add(example)
    packed = builder.build()
    prompts = prompt_batch([row_ids(names) for names in rows], [[audios[name] for name in names] for names in rows],
                           tiny_config, pad_id=special.pad, length=seq_len, num_windows=num_windows)

    for name in ("mel_windows", "mel_valid_frames", "window_index"):
        np.testing.assert_array_equal(prompts[name], packed[name], err_msg=name)
    assert packed["window_index"].tolist() == [0, 1, 0, 0, 0, 1, 2, 0]
    frames = packed["mel_valid_frames"].tolist()
    assert frames[:4] == [f for a in (audios["A"], audios["B"]) for f in a.valid_frames_W.tolist()] + [0]
    assert frames[4:] == audios["C"].valid_frames_W.tolist() + [0]
    np.testing.assert_array_equal(packed["mel_windows"][:3], np.concatenate([audios["A"].mel_WxMxT,
                                                                            audios["B"].mel_WxMxT]))
    np.testing.assert_array_equal(packed["mel_windows"][4:7], audios["C"].mel_WxMxT)
    assert not packed["mel_windows"][3].any() and not packed["mel_windows"][7].any()
    validate_batch({**prompts, "target_ids": packed["target_ids"], "loss_mask": packed["loss_mask"]}, tiny_config)
    validate_batch(packed, tiny_config)
