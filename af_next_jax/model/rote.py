"""RoTE: rotary time embeddings on encoder outputs, stamping each audio token with its absolute time.

Checkpoint-faithful to transformers (`MusicFlamingoRotaryEmbedding`, `_build_audio_timestamps`,
`apply_rotary_time_emb`), not to the paper's formula. For window w of an audio and token j:
  t = w * T * token_seconds + j * token_seconds     (T tokens per window, token_seconds = 0.04)
  window axis angles: round(t_w0 / (T * token_seconds)) / theta * inv_freq      (no 2 pi)
  time axis angles:   j / theta * 2 pi * inv_freq
each repeated x2 (interleaved), concatenated (2 * rotary_dim angles), then multiplied by -2 pi t.
Channels [0, 2 * rotary_dim) rotate in interleaved pairs; the rest pass through. transformers applies
the rotation in float64, we apply it in float32 (always, whatever the compute dtype).

Why the static tables are built on the host (`RotaryTimeTables`), not in the traced program:
the angles reach ~4e4 rad at 30 min, where one float32 ulp is ~4e-3 rad, so every static factor must
equal torch's bit for bit before it is multiplied by 2 pi t. XLA (and TPUs) do not divide exactly
(`j / 1200` differs from torch in 179 of 750 positions), so no division may reach these angles at
run time: the traced part only gathers and multiplies. Measured on 60 windows (benchmarks/rote_precision.py):
2.2e-2 max difference at window 59 when the tables were traced, <1e-5 now. Do not "simplify" it back.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from af_next_jax.config import RoteConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RotaryTimeTables:
    """The static factors of the angles, in float32 exactly as transformers computes them.

    window_angles_WxR  [max_windows, rotary_dim]  round(t_w0 / window seconds) / theta * inv_freq, repeated x2
    time_angles_TxR    [T, rotary_dim]            j / theta * 2 pi * inv_freq, repeated x2
    token_offsets_T    [T]                        j * token_seconds
    """

    window_angles_WxR: np.ndarray
    time_angles_TxR: np.ndarray
    token_offsets_T: np.ndarray
    token_seconds: np.float32


def inverse_frequencies(config: RoteConfig, rotary_dim: int) -> np.ndarray:
    """1 / theta^(2k / rotary_dim), float32, equal to torch's in every value.

    The power runs through XLA on the host CPU: numpy's float32 `pow` differs from torch's in up to 22 of
    128 values, and correctly rounded float64 in 1 of 128; XLA:CPU's agrees in all (tests check it).
    """
    exponents_F = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes the CPU: correctly rounded powers, 1 ulp off in 1 of 128
        logger.warning("RoTE: no CPU backend for the inverse frequencies; using float64 powers (1 ulp may differ)")
        return np.float32(1.0) / np.power(np.float64(config.theta), exponents_F.astype(np.float64)).astype(np.float32)
    with jax.ensure_compile_time_eval(), jax.default_device(cpu):
        powers_F = np.asarray(jnp.power(jnp.float32(config.theta), jnp.asarray(exponents_F)))
    return np.float32(1.0) / powers_F


def rotary_time_tables(config: RoteConfig, *, tokens_per_window: int, hidden_size: int,
                       max_windows: int) -> RotaryTimeTables:
    """Host-side numpy tables in transformers' float32 operation order (see the module docstring)."""
    rotary_dim = config.rotary_dim(hidden_size)
    inv_freq_F = inverse_frequencies(config, rotary_dim)
    token_seconds = np.float32(config.token_seconds)
    token_offsets_T = np.arange(tokens_per_window, dtype=np.float32) * token_seconds

    window_starts_W = (np.arange(max_windows) * tokens_per_window).astype(np.float32) * token_seconds
    window_seconds = np.float32(config.token_seconds * tokens_per_window)
    window_positions_W = np.round(window_starts_W / window_seconds) / np.float32(config.theta)
    window_angles_WxR = np.repeat(window_positions_W[:, None] * inv_freq_F[None, :], 2, axis=-1)

    # transformers tabulates max_position_embeddings (= theta) rows and slices the first T.
    time_positions_T = np.arange(tokens_per_window, dtype=np.float32) / np.float32(config.theta)
    time_positions_T = time_positions_T * np.float32(2 * math.pi)
    time_angles_TxR = np.repeat(time_positions_T[:, None] * inv_freq_F[None, :], 2, axis=-1)
    return RotaryTimeTables(window_angles_WxR, time_angles_TxR, token_offsets_T, token_seconds)


def rotary_time_angles(window_index_N, tables: RotaryTimeTables):
    """Angles [N, T, 2 * rotary_dim] (float32): gathers from the static tables and multiplies only.

    A window index beyond the tables (>= max_windows_per_audio, which the data pipeline never emits)
    is clamped to the last row.
    """
    windows = window_index_N.shape[0]
    tokens, rotary_dim = tables.time_angles_TxR.shape
    window_index_N = window_index_N.astype(jnp.int32)
    window_angles_NxR = jnp.take(tables.window_angles_WxR, window_index_N, axis=0, mode="clip")
    # t = float32(w * T) * token_seconds + j * token_seconds, as `_build_audio_timestamps` adds them.
    window_start_N = (window_index_N * tokens).astype(jnp.float32) * tables.token_seconds
    seconds_NxT = window_start_N[:, None] + tables.token_offsets_T[None, :]
    angles_NxTx2R = jnp.concatenate([
        jnp.broadcast_to(window_angles_NxR[:, None, :], (windows, tokens, rotary_dim)),
        jnp.broadcast_to(tables.time_angles_TxR[None], (windows, tokens, rotary_dim)),
    ], axis=-1)
    return angles_NxTx2R * (-seconds_NxT * 2 * np.float32(math.pi))[..., None]


def rotate_interleaved_pairs(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): GPT-J style rotation on adjacent pairs."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rotary_time_embedding(x_NxTxD, window_index_N, config: RoteConfig, max_windows: int):
    """Rotate the first 2 * rotary_dim channels of every window's tokens by their absolute time.

    `max_windows` (the model's max_windows_per_audio) sizes the window table.
    """
    _, tokens, hidden = x_NxTxD.shape
    tables = rotary_time_tables(config, tokens_per_window=tokens, hidden_size=hidden, max_windows=max_windows)
    angles_NxTx2R = rotary_time_angles(window_index_N, tables)
    rotated_width = angles_NxTx2R.shape[-1]
    x32 = x_NxTxD.astype(jnp.float32)
    rotated, passthrough = x32[..., :rotated_width], x32[..., rotated_width:]
    rotated = rotated * jnp.cos(angles_NxTx2R) + rotate_interleaved_pairs(rotated) * jnp.sin(angles_NxTx2R)
    return jnp.concatenate([rotated, passthrough], axis=-1).astype(x_NxTxD.dtype)
