"""Shared helpers of the decoding tests: left-padded prompt batches from synthetic examples."""

from __future__ import annotations

import numpy as np

from af_next_jax.model.synthetic import PAD_ID, synthetic_batch


def left_padded_prompts(config, audio_frames_per_example, *, seq_len: int, seed: int, text_tokens_between: int = 3,
                        extra_text=()) -> dict:
    """`synthetic_batch` rows (text, audio runs, text), moved to the right end of each row (left
    padding, decoding.py's rule); `extra_text[b]` more random text tokens lengthen row b."""
    batch = synthetic_batch(config, audio_frames_per_example=audio_frames_per_example, seq_len=seq_len, seed=seed,
                            text_tokens_between=text_tokens_between)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for row in range(len(audio_frames_per_example)):
        ids = batch["token_ids"][row][batch["segment_ids"][row] > 0]
        more = extra_text[row] if row < len(extra_text) else 0
        rows.append(np.concatenate([ids, rng.integers(1, min(config.audio_token_id, 500), more)]).astype(np.int32))
    length = max(len(r) for r in rows)
    token_ids = np.full((len(rows), length), PAD_ID, np.int32)
    for row, ids in enumerate(rows):
        token_ids[row, length - len(ids):] = ids
    real = np.arange(length)[None, :] >= (length - np.array([len(r) for r in rows]))[:, None]
    out = {"token_ids": token_ids, "segment_ids": real.astype(np.int32),
           "positions": np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)}
    for name in ("mel_windows", "mel_valid_frames", "window_index"):
        out[name] = batch[name]
    return out


def append_tokens(batch: dict, new_BxT: np.ndarray) -> dict:
    """The same prompts followed by `new_BxT` (real tokens, positions continuing per row)."""
    out = dict(batch)
    out["token_ids"] = np.concatenate([batch["token_ids"], new_BxT.astype(np.int32)], axis=1)
    steps = np.arange(1, new_BxT.shape[1] + 1)[None, :]
    out["positions"] = np.concatenate([batch["positions"], batch["positions"][:, -1:] + steps], axis=1).astype(np.int32)
    out["segment_ids"] = np.concatenate([batch["segment_ids"], np.ones_like(new_BxT, np.int32)], axis=1)
    return out


def build_varied_audio_model(config, seed: int, weight_scale: float = 4.0):
    """`hf_reference.build_audio_model` with every non-norm tensor scaled by `weight_scale`.

    At the default 0.05 weight scale a tiny random model's greedy output is driven by the last
    token alone and falls into a one-token loop after ~3 steps, which would leave most steps of a
    decoding test checking nothing. x4 makes the context matter (27 distinct tokens in 40 steps);
    the scale was chosen from the reference's own output, before comparing with ours.
    """
    import torch

    from af_next_jax.convert.mapping import canonical_key, params_from_tensors
    from hf_reference import build_audio_model

    hf_model, _ = build_audio_model(config, seed=seed)
    with torch.no_grad():
        for name, tensor in hf_model.state_dict().items():
            if not ("norm" in name and name.endswith("weight")):
                tensor.mul_(weight_scale)
    tensors = {canonical_key(k): v.numpy() for k, v in hf_model.state_dict().items()}
    return hf_model, params_from_tensors(tensors, config)
