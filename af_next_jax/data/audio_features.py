"""One audio -> the windows the encoder reads, and windows -> a batch's audio fields: one code path for
the data pipeline (pipeline.py `ExamplePreparer`, packing.py) and for inference (inference/prompts.py).

    windows = window_audio(samples, encoder, max_windows, name=path)  # cheap: windows, valid frames, tokens
    windows.token_count                     # the <sound> run's length: length checks before any log-mel
    features = windows.log_mel()            # the expensive step (featurize_audio does both)
    fields = layout_windows([[block_of_row_0, ...], [block_of_row_1, ...]], num_windows, mel_shape)

The rules (transformers' AF3 / MusicFlamingo processors apply the same ones, `_process_audio`):
  - windows are non-overlapping `encoder.window_samples` pieces; a short last window keeps its length
    (its padded frames are masked); valid mel frames = ceil(samples / hop);
  - an over-long audio keeps its first `max_windows` windows: the rest is dropped with a logged warning
    and reported in `truncated_seconds` (the pipeline counts it in `data/truncated_audio`);
  - a last window too short for one encoder token (under 3 valid mel frames, 20 ms) is dropped: it adds
    no `<sound>` token (transformers keeps it as a window whose tokens are all masked: same tokens);
  - an audio with no encoder token at all (under 3 mel frames) raises `AudioError("empty_audio")`: the
    pipeline skips and counts the example, inference reports the error.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from af_next_jax.batch import windows_per_row
from af_next_jax.config import MEL_HOP_LENGTH, EncoderConfig, encoder_tokens_for_frames
from af_next_jax.data.audio import AudioError, split_windows
from af_next_jax.data.features import log_mel_windows, valid_frames_for_samples

logger = logging.getLogger(__name__)

# The window fields of a prepared example (one block of windows, in `<sound>` order).
WINDOW_FIELDS = ("mel", "valid_frames", "window_index")


class _Windowed:
    """What windows alone determine: their count, the RoTE window indices, the `<sound>` run length."""

    valid_frames_W: np.ndarray

    @property
    def num_windows(self) -> int:
        return len(self.valid_frames_W)

    @property
    def window_index_W(self) -> np.ndarray:
        """RoTE's window axis: the index of each window inside this audio (0, 1, ...)."""
        return np.arange(self.num_windows, dtype=np.int32)

    @property
    def token_count(self) -> int:
        """Encoder tokens of the audio: the length of its `<sound>` run."""
        return int(encoder_tokens_for_frames(self.valid_frames_W.astype(np.int64)).sum())


@dataclasses.dataclass(frozen=True, eq=False)
class AudioFeatures(_Windowed):
    """One audio, featurised: the log-mel of its windows and their valid frames."""

    mel_WxMxT: np.ndarray          # [W, num_mel_bins, mel_frames_per_window] float32
    valid_frames_W: np.ndarray     # [W] int32, each in [3, mel_frames_per_window]
    truncated_seconds: float = 0.0  # audio dropped beyond the window cap

    def window_block(self) -> dict[str, np.ndarray]:
        """This audio's windows as a block of `layout_windows` (the fields of a prepared example)."""
        return {"mel": self.mel_WxMxT, "valid_frames": self.valid_frames_W, "window_index": self.window_index_W}


@dataclasses.dataclass(frozen=True, eq=False)
class AudioWindows(_Windowed):
    """One audio cut into the windows the encoder reads, before the log-mel."""

    samples_WxS: np.ndarray        # [W, window_samples] float32, zero-padded
    valid_frames_W: np.ndarray     # [W] int32
    truncated_seconds: float
    encoder: EncoderConfig

    def log_mel(self) -> AudioFeatures:
        return AudioFeatures(log_mel_windows(self.samples_WxS, self.encoder), self.valid_frames_W,
                             self.truncated_seconds)


def window_audio(samples: np.ndarray, encoder: EncoderConfig, max_windows: int, *, name: str = "audio") -> AudioWindows:
    """16 kHz mono `samples` cut into at most `max_windows` windows (the module docstring's rules).

    Raises `AudioError("empty_audio")` when the audio gives no encoder token; `name` (a path) names
    the audio in that error and in the truncation warning.
    """
    windows = split_windows(samples, encoder, max_windows)
    frames_W = valid_frames_for_samples(windows.num_samples_W, encoder.mel_frames_per_window).astype(np.int32)
    # Only the last window can be short, so the windows with tokens are a prefix.
    kept = int(np.count_nonzero(encoder_tokens_for_frames(frames_W)))
    if kept == 0:
        raise AudioError("empty_audio", f"{name}: {len(samples)} samples are too short for one encoder token "
                                        f"(at least {2 * MEL_HOP_LENGTH + 1}: 3 mel frames)")
    if windows.truncated_seconds > 0:
        logger.warning("%s: truncated %.1f s beyond the %d-window cap (%.0f s)", name, windows.truncated_seconds,
                       max_windows, max_windows * encoder.window_seconds)
    return AudioWindows(windows.samples_WxS[:kept], frames_W[:kept], windows.truncated_seconds, encoder)


def featurize_audio(samples: np.ndarray, encoder: EncoderConfig, max_windows: int, *,
                    name: str = "audio") -> AudioFeatures:
    """`window_audio(...).log_mel()`: what inference runs on each audio."""
    return window_audio(samples, encoder, max_windows, name=name).log_mel()


def example_windows(features: Sequence[AudioFeatures], encoder: EncoderConfig) -> dict[str, np.ndarray]:
    """The window block of one example's audios, in order (`WINDOW_FIELDS`; window_index restarts per
    audio); zero windows for a text-only example."""
    if not features:
        return {"mel": np.zeros((0, encoder.num_mel_bins, encoder.mel_frames_per_window), np.float32),
                "valid_frames": np.zeros(0, np.int32), "window_index": np.zeros(0, np.int32)}
    blocks = [audio.window_block() for audio in features]
    return {name: np.concatenate([block[name] for block in blocks]) for name in WINDOW_FIELDS}


def layout_windows(rows: Sequence[Sequence[Mapping[str, np.ndarray]]], num_windows: int,
                   mel_shape: tuple[int, int],
                   slots: Sequence[Sequence[np.ndarray]] | None = None) -> dict[str, np.ndarray]:
    """The audio fields of a batch (af_next_jax/batch.py): `mel_windows` [num_windows, *mel_shape],
    `mel_valid_frames` and `window_index` [num_windows].

    `rows[r]` are the window runs (`WINDOW_FIELDS`: a prepared example's, or one audio's) of row r,
    in the order their `<sound>` runs appear in it. Row r owns slots [r S, (r + 1) S) with
    S = num_windows / rows (the contract). Its runs' windows go to `slots[r][i]` (run i's slots inside
    the row, increasing: data/packing.py's block placement), or, without `slots`, first and
    consecutive; every other slot is a padding window (valid frames 0). Raises ValueError when a row's
    runs do not fit its S slots.
    """
    per_row = windows_per_row(len(rows), num_windows)
    mel_windows = np.zeros((num_windows, *mel_shape), np.float32)
    mel_valid_frames = np.zeros(num_windows, np.int32)
    window_index = np.zeros(num_windows, np.int32)
    for row, runs in enumerate(rows):
        needed = sum(len(run["valid_frames"]) for run in runs)
        if needed > per_row:
            raise ValueError(f"row {row} holds {needed} windows but each row owns {per_row} window slots "
                             f"({num_windows} windows for {len(rows)} rows)")
        next_slot = 0
        for number, run in enumerate(runs):
            count = len(run["valid_frames"])
            run_slots = np.arange(next_slot, next_slot + count) if slots is None else np.asarray(slots[row][number])
            if count and (run_slots[0] < next_slot or run_slots[-1] >= per_row or np.any(np.diff(run_slots) <= 0)):
                raise ValueError(f"row {row}, run {number}: window slots {run_slots.tolist()} must increase, follow "
                                 f"the previous run's and lie in [0, {per_row})")
            placed = row * per_row + run_slots
            mel_windows[placed] = run["mel"]
            mel_valid_frames[placed] = run["valid_frames"]
            window_index[placed] = run["window_index"]
            next_slot = run_slots[-1] + 1 if count else next_slot
    return {"mel_windows": mel_windows, "mel_valid_frames": mel_valid_frames, "window_index": window_index}
