"""Log-mel parity with transformers' WhisperFeatureExtractor (the reference), max abs diff <= 1e-4."""

import numpy as np
import pytest

from af_next_jax import config as config_lib
from af_next_jax.data.features import log_mel_windows, valid_frames_for_samples
from external_fixtures import fixture_path

TOLERANCE = 1e-4


def _synthetic(num_samples, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16000
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 3000 * t / t[-1]) * t)
    bursts = 0.2 * rng.standard_normal(num_samples) * (np.sin(2 * np.pi * 0.5 * t) > 0.7)
    return (chirp + bursts + 0.01 * rng.standard_normal(num_samples)).astype(np.float32)


def _reference(samples, chunk_length):
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=chunk_length)
    return extractor(samples, sampling_rate=16000, return_tensors="np").input_features[0]


@pytest.mark.parametrize("num_samples", [480_000, 123_457])
def test_log_mel_matches_whisper_extractor_30s(num_samples):
    samples = _synthetic(num_samples)
    ours = log_mel_windows(samples[None], config_lib.EncoderConfig())[0]
    reference = _reference(samples, chunk_length=30)
    assert ours.shape == reference.shape == (128, 3000)
    assert np.abs(ours - reference).max() <= TOLERANCE


def test_log_mel_matches_whisper_extractor_5s_window_of_tiny_preset():
    encoder = config_lib.tiny().encoder
    samples = _synthetic(encoder.window_samples, seed=1)
    short = np.zeros_like(samples)
    short[:30_000] = samples[:30_000] * 0.5  # a short last window arrives zero-padded
    ours = log_mel_windows(np.stack([samples, short]), encoder)
    assert ours.shape == (2, 128, 500)
    assert np.abs(ours[0] - _reference(samples, chunk_length=5)).max() <= TOLERANCE
    assert np.abs(ours[1] - _reference(samples[:30_000] * 0.5, chunk_length=5)).max() <= TOLERANCE


def test_valid_frames_match_whisper_attention_mask():
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=128, chunk_length=5)
    for num_samples in (80_000, 40_000, 40_001, 161):
        mask = extractor(np.zeros(num_samples, np.float32), sampling_rate=16000, return_attention_mask=True,
                         return_tensors="np").attention_mask[0]
        assert valid_frames_for_samples(num_samples, 500) == mask.sum()


def test_log_mel_matches_whisper_extractor_on_real_speech():
    """pyannote.audio's sample.wav (30 s of real speech; fetched by `make test`, see external_fixtures.py)."""
    from af_next_jax.data.audio import load_audio, split_windows

    samples = load_audio(fixture_path("sample.wav"))
    encoder = config_lib.EncoderConfig()
    windows = split_windows(samples, encoder, max_windows=60)
    ours = log_mel_windows(windows.samples_WxS, encoder)
    for index, window in enumerate(windows.samples_WxS):
        real = window[: windows.num_samples_W[index]]
        assert np.abs(ours[index] - _reference(real, chunk_length=30)).max() <= TOLERANCE
