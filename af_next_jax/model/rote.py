"""RoTE: rotary time embeddings on encoder outputs, stamping each audio token with its absolute time.

Checkpoint-faithful to transformers (`MusicFlamingoRotaryEmbedding`, `_build_audio_timestamps`,
`apply_rotary_time_emb`), not to the paper's formula. For window w of an audio and token j:
  t = (w * T + j) * token_seconds               (T tokens per window, token_seconds = 0.04)
  window axis angles: round(t_w0 / (T * token_seconds)) / theta * inv_freq      (no 2 pi)
  time axis angles:   j / theta * 2 pi * inv_freq
each repeated x2 (interleaved), concatenated (2 * rotary_dim angles), then multiplied by -2 pi t.
Channels [0, 2 * rotary_dim) rotate in interleaved pairs; the rest pass through. Angles are float32
in the same operation order as the reference (they reach ~1e4 radians for 30 min audio, so the order
matters); transformers applies the rotation in float64, we apply it in float32.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from af_next_jax.config import RoteConfig


def rotary_time_angles(window_index_N, *, tokens_per_window: int, hidden_size: int, config: RoteConfig):
    """Angles [N, T, 2 * rotary_dim] (float32) for windows with the given index inside their audio."""
    rotary_dim = config.rotary_dim(hidden_size)
    inv_freq_F = 1.0 / (config.theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    token_offsets_T = jnp.arange(tokens_per_window, dtype=jnp.float32) * config.token_seconds
    window_start_N = (window_index_N.astype(jnp.int32) * tokens_per_window).astype(jnp.float32) * config.token_seconds
    seconds_NxT = window_start_N[:, None] + token_offsets_T[None, :]

    window_duration = config.token_seconds * tokens_per_window
    window_position_N = jnp.round(seconds_NxT[:, 0] / window_duration) / config.theta
    window_angles_NxR = jnp.repeat(window_position_N[:, None] * inv_freq_F[None, :], 2, axis=-1)
    time_positions_T = jnp.arange(tokens_per_window, dtype=jnp.float32) / config.theta * (2 * math.pi)
    time_angles_TxR = jnp.repeat(time_positions_T[:, None] * inv_freq_F[None, :], 2, axis=-1)

    windows = window_index_N.shape[0]
    angles_NxTx2R = jnp.concatenate([
        jnp.broadcast_to(window_angles_NxR[:, None, :], (windows, tokens_per_window, rotary_dim)),
        jnp.broadcast_to(time_angles_TxR[None], (windows, tokens_per_window, rotary_dim)),
    ], axis=-1)
    return angles_NxTx2R * (-seconds_NxT * 2 * math.pi)[..., None]


def rotate_interleaved_pairs(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): GPT-J style rotation on adjacent pairs."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rotary_time_embedding(x_NxTxD, window_index_N, config: RoteConfig):
    """Rotate the first 2 * rotary_dim channels of every window's tokens by their absolute time."""
    windows, tokens, hidden = x_NxTxD.shape
    angles_NxTx2R = rotary_time_angles(window_index_N, tokens_per_window=tokens, hidden_size=hidden, config=config)
    rotated_width = angles_NxTx2R.shape[-1]
    x32 = x_NxTxD.astype(jnp.float32)
    rotated, passthrough = x32[..., :rotated_width], x32[..., rotated_width:]
    rotated = rotated * jnp.cos(angles_NxTx2R) + rotate_interleaved_pairs(rotated) * jnp.sin(angles_NxTx2R)
    return jnp.concatenate([rotated, passthrough], axis=-1).astype(x_NxTxD.dtype)
