"""RoTE on long audio against transformers: max |difference| per window, for one 30-minute audio.

    .venv/bin/python benchmarks/rote_precision.py [--windows 60] [--preset af_next_7b]

Random encoder outputs [windows, 750, width] go through our `apply_rotary_time_embedding` (jit) and
through transformers' `MusicFlamingoRotaryEmbedding` + `apply_rotary_time_emb` (float64 rotation);
prints the largest difference at a few windows and overall. Needs the test extra (torch, transformers).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import torch
import transformers
from transformers.models.musicflamingo import modeling_musicflamingo as reference

from af_next_jax.config import preset
from af_next_jax.convert.hf_config import to_hf_config
from af_next_jax.model.rote import apply_rotary_time_embedding


def reference_rote(features_NxTxD: np.ndarray, config) -> np.ndarray:
    """transformers' RoTE for windows 0..N-1 of one audio (timestamps as `_build_audio_timestamps`)."""
    hf_config = transformers.MusicFlamingoConfig.from_dict(to_hf_config(config))
    windows, tokens, _ = features_NxTxD.shape
    frame_step = hf_config.audio_frame_step * 4
    window_index = torch.arange(windows)
    timestamps = window_index.unsqueeze(1) * tokens * frame_step + torch.arange(tokens, dtype=torch.float32) * frame_step
    rotary = reference.MusicFlamingoRotaryEmbedding(hf_config)
    cos, sin = rotary(timestamps, seq_len=tokens)
    return reference.apply_rotary_time_emb(torch.from_numpy(features_NxTxD), cos, sin).numpy()


def ours(features_NxTxD: np.ndarray, config) -> np.ndarray:
    window_index_N = np.arange(features_NxTxD.shape[0], dtype=np.int32)
    rote = jax.jit(lambda x, w: apply_rotary_time_embedding(x, w, config.rote, config.max_windows_per_audio))
    return np.asarray(rote(features_NxTxD, window_index_N))


def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # the XLA:CPU flags and allocator settings the commands use, as measured
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="af_next_7b")
    parser.add_argument("--windows", type=int, default=60)
    args = parser.parse_args(argv)
    config = preset(args.preset, max_windows_per_audio=args.windows)
    tokens = config.encoder.tokens_per_window
    features = np.random.default_rng(0).normal(size=(args.windows, tokens, config.encoder.hidden_size))
    features = features.astype(np.float32)
    difference_NxTxD = np.abs(ours(features, config) - reference_rote(features, config))
    per_window = difference_NxTxD.max(axis=(1, 2))
    print(f"RoTE vs transformers, preset {args.preset}, {args.windows} windows x {tokens} tokens, "
          f"width {config.encoder.hidden_size}, values up to {np.abs(features).max():.1f}")
    print("| window | max abs difference |\n|---:|---:|")
    for window in sorted({0, 1, args.windows // 4, args.windows // 2, 3 * args.windows // 4, args.windows - 1}):
        print(f"| {window} | {per_window[window]:.2e} |")
    print(f"| all | {per_window.max():.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
