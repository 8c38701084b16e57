"""Audio loading (any format soundfile/librosa reads) to 16 kHz mono float32, and windowing.

Errors raise `AudioError` with a `reason` (one of `manifest.SKIP_REASONS`) so the pipeline can skip
and count the example instead of dying.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from af_next_jax.config import SAMPLE_RATE, EncoderConfig


class AudioError(ValueError):
    """An audio file that cannot be used; `reason` is the skip-counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def load_audio(path: str, start: float | None = None, end: float | None = None) -> np.ndarray:
    """Samples [N] float32 at 16 kHz mono of `path` between `start` and `end` seconds (None = edges).

    soundfile reads the common containers (wav, flac, ogg, mp3 with libsndfile >= 1.1) and lets us
    read only the requested span; librosa's audioread fallback covers the rest. Channels are
    averaged; resampling uses soxr (librosa's default 'soxr_hq').
    """
    import os

    import soundfile

    if not os.path.exists(path):
        raise AudioError("missing_audio", f"audio file {path} does not exist")
    if os.path.getsize(path) == 0:
        raise AudioError("empty_audio", f"audio file {path} is empty (0 bytes)")
    _check_riff_length(path)
    try:
        with soundfile.SoundFile(path) as sound_file:
            sample_rate = sound_file.samplerate
            total_frames = sound_file.frames
            first = 0 if start is None else int(round(start * sample_rate))
            last = total_frames if end is None else min(total_frames, int(round(end * sample_rate)))
            if first >= total_frames and total_frames > 0:
                raise AudioError("bad_span", f"{path}: start {start} s is past the end "
                                             f"({total_frames / sample_rate:.2f} s)")
            sound_file.seek(first)
            samples = sound_file.read(max(0, last - first), dtype="float32", always_2d=True)
            if samples.shape[0] < last - first:
                raise AudioError("corrupt_audio", f"{path}: header promises {total_frames} frames but only "
                                                  f"{first + samples.shape[0]} could be read (truncated file)")
    except AudioError:
        raise
    except Exception as soundfile_error:  # not a format libsndfile reads: try librosa's fallbacks
        samples, sample_rate = _load_with_librosa(path, start, end, soundfile_error)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.size == 0:
        raise AudioError("empty_audio", f"audio {path} [{start}, {end}] s holds no samples")
    if not np.all(np.isfinite(samples)):
        raise AudioError("nan_audio", f"audio {path} holds {int((~np.isfinite(samples)).sum())} NaN/inf samples")
    if sample_rate != SAMPLE_RATE:
        import librosa

        samples = librosa.resample(samples, orig_sr=sample_rate, target_sr=SAMPLE_RATE)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _check_riff_length(path: str) -> None:
    """A WAV cut short still opens (libsndfile clamps to the bytes present): compare with its header."""
    import os

    with open(path, "rb") as wav_file:
        header = wav_file.read(12)
    if header[:4] == b"RIFF" and header[8:12] == b"WAVE":
        promised = int.from_bytes(header[4:8], "little") + 8
        actual = os.path.getsize(path)
        if actual < promised:
            raise AudioError("corrupt_audio", f"{path} is truncated: its RIFF header promises {promised} bytes, "
                                              f"the file has {actual}")


def _load_with_librosa(path, start, end, soundfile_error):
    import warnings

    import librosa

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            duration = None if end is None else end - (start or 0.0)
            samples, sample_rate = librosa.load(path, sr=None, mono=False, offset=start or 0.0,
                                                duration=duration, dtype=np.float32)
    except Exception as error:
        raise AudioError("corrupt_audio", f"cannot decode {path}: {soundfile_error}; {error}") from error
    return (samples.T if samples.ndim == 2 else samples), sample_rate


@dataclasses.dataclass(frozen=True)
class Windows:
    """An audio cut into non-overlapping windows (the last one may be short)."""

    samples_WxS: np.ndarray  # [W, window_samples] zero-padded
    num_samples_W: np.ndarray  # [W] real samples in each window
    truncated_seconds: float  # audio dropped beyond the window cap (0.0 when none)


def split_windows(samples: np.ndarray, encoder: EncoderConfig, max_windows: int) -> Windows:
    """Cut 16 kHz samples into ceil(N / window_samples) windows, keeping at most `max_windows`.

    As the transformers AF3/MusicFlamingo processor does: a short last window is kept short (its
    padded frames are masked), audio beyond the cap is dropped and reported in `truncated_seconds`.
    """
    window_samples = encoder.window_samples
    num_windows = max(1, -(-len(samples) // window_samples))
    kept_windows = min(num_windows, max_windows)
    kept_samples = min(len(samples), kept_windows * window_samples)
    padded = np.zeros(kept_windows * window_samples, np.float32)
    padded[:kept_samples] = samples[:kept_samples]
    num_samples_W = np.minimum(window_samples, kept_samples - window_samples * np.arange(kept_windows))
    return Windows(samples_WxS=padded.reshape(kept_windows, window_samples),
                   num_samples_W=num_samples_W.astype(np.int64),
                   truncated_seconds=(len(samples) - kept_samples) / SAMPLE_RATE)
