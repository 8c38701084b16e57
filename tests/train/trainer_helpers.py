"""Small helpers shared by the trainer tests (imported by tests/train/*.py)."""

from __future__ import annotations

import os

import numpy as np

from af_next_jax.config import tiny
from af_next_jax.model.synthetic import synthetic_batch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ_LEN = 256
NUM_WINDOWS = 4


def micro_batch(seed: int, config=None) -> dict:
    return synthetic_batch(config or tiny(), audio_frames_per_example=[[500], [300, 200]], seq_len=SEQ_LEN,
                           num_windows=NUM_WINDOWS, seed=seed)


def stack(*batches) -> dict:
    return {name: np.stack([b[name] for b in batches]) for name in batches[0]}


class SyntheticBatches:
    """An in-memory stand-in for the data pipeline: batch i is `micro_batch(i)`; `poison_from` makes
    every batch from that index on carry a NaN in its log-mel (a non-finite loss)."""

    def __init__(self, config=None, poison_from: int | None = None):
        self.index, self.config, self.poison_from = 0, config, poison_from

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = micro_batch(self.index, self.config)
        if self.poison_from is not None and self.index >= self.poison_from:
            batch["mel_windows"][0, 0, 0] = np.nan
        self.index += 1
        return batch

    def get_state(self) -> bytes:
        return str(self.index).encode()

    def set_state(self, state: bytes) -> None:
        self.index = int(state)

    def metrics(self) -> dict:
        return {"data/skipped": 0.0}
