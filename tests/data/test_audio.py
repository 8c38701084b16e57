"""Audio loading: any rate and channel count -> 16 kHz mono; spans; windowing with the cap."""

import numpy as np
import pytest

from af_next_jax import config as config_lib
from af_next_jax.data.audio import AudioError, load_audio, split_windows


def test_stereo_44k_is_resampled_to_16k_mono(tmp_path):
    import soundfile

    t = np.arange(44_100 * 2) / 44_100
    left = 0.5 * np.sin(2 * np.pi * 1000 * t)
    path = str(tmp_path / "stereo.flac")
    soundfile.write(path, np.stack([left, left], axis=1).astype(np.float32), 44_100)
    samples = load_audio(path)
    assert samples.dtype == np.float32 and samples.shape == (32_000,)
    spectrum = np.abs(np.fft.rfft(samples))
    assert abs(np.argmax(spectrum) * 16_000 / len(samples) - 1000) < 2


def test_start_end_span_is_read(tmp_path, write_wav):
    samples = np.arange(16_000 * 3, dtype=np.float32) / 1e5
    path = write_wav(tmp_path / "ramp.wav", samples)
    span = load_audio(path, start=1.0, end=2.5)
    assert span.shape == (24_000,)
    np.testing.assert_allclose(span, samples[16_000:40_000], atol=1e-4)


def _write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("reason,make", [
    ("missing_audio", lambda tmp: str(tmp / "nope.wav")),
    ("empty_audio", lambda tmp: _write_bytes(tmp / "empty.wav", b"")),
    ("corrupt_audio", lambda tmp: _write_bytes(tmp / "junk.wav", b"RIFF" + bytes(range(256)) * 4)),
])
def test_bad_audio_raises_with_its_reason(tmp_path, reason, make):
    with pytest.raises(AudioError) as error:
        load_audio(make(tmp_path))
    assert error.value.reason == reason


def test_nan_samples_are_rejected(tmp_path):
    import soundfile

    path = str(tmp_path / "nan.wav")
    soundfile.write(path, np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError) as error:
        load_audio(path)
    assert error.value.reason == "nan_audio"


def test_truncated_file_is_corrupt(tmp_path, write_wav):
    path = write_wav(tmp_path / "cut.wav", np.zeros(16_000, np.float32))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(AudioError) as error:
        load_audio(path)
    assert error.value.reason == "corrupt_audio"


def test_split_windows_keeps_short_tail_and_truncates_beyond_cap():
    encoder = config_lib.tiny().encoder  # 5 s windows
    samples = np.ones(int(16_000 * 12.5), np.float32)
    windows = split_windows(samples, encoder, max_windows=4)
    assert windows.samples_WxS.shape == (3, 80_000)
    assert windows.num_samples_W.tolist() == [80_000, 80_000, 40_000]
    assert windows.truncated_seconds == 0
    assert windows.samples_WxS[2, 40_000:].max() == 0
    capped = split_windows(samples, encoder, max_windows=2)
    assert capped.num_samples_W.tolist() == [80_000, 80_000] and capped.truncated_seconds == pytest.approx(2.5)
