"""AF-Whisper encoder: the Whisper encoder over independent windows + AvgPool1d(2) + LayerNorm.

transformers reference: `AudioFlamingo3Encoder` (audioflamingo3/modeling_audioflamingo3.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from af_next_jax.attention.dispatch import dot_product_attention
from af_next_jax.config import EncoderConfig, encoder_tokens_for_frames
from af_next_jax.model import axes
from af_next_jax.model.layers import dense, gelu_exact, layer_norm, stack_layers
from af_next_jax.model.numerics import Numerics


class EncoderLayer(nn.Module):
    """Pre-LayerNorm Whisper layer; `k_proj` has no bias."""

    config: EncoderConfig
    dtype: jnp.dtype
    attention_kernel: str
    numerics: Numerics

    @nn.compact
    def __call__(self, x_NxTxD, key_valid_NxT):
        config, numerics = self.config, self.numerics
        heads, head_dim = config.num_heads, config.head_dim
        attention_axes = (axes.AUDIO_EMBED, axes.AUDIO_HEADS, axes.HEAD_DIM)
        activation_axes = (axes.WINDOWS, axes.WINDOW_LENGTH, axes.ACT_AUDIO_EMBED)

        h_NxTxD = layer_norm(epsilon=config.layer_norm_eps, name="self_attn_layer_norm", dtype=self.dtype,
                             feature_axis=axes.AUDIO_EMBED)(x_NxTxD)
        dense_kwargs = dict(dtype=self.dtype, numerics=numerics)
        query_NxTxHxK = dense((heads, head_dim), attention_axes, use_bias=True, name="q_proj", **dense_kwargs)(h_NxTxD)
        key_NxTxHxK = dense((heads, head_dim), attention_axes, use_bias=False, name="k_proj", **dense_kwargs)(h_NxTxD)
        value_NxTxHxK = dense((heads, head_dim), attention_axes, use_bias=True, name="v_proj", **dense_kwargs)(h_NxTxD)
        # Every query may look at every valid key of its own window (transformers' bidirectional mask).
        attended_NxTxHxK = dot_product_attention(
            query_NxTxHxK, key_NxTxHxK, value_NxTxHxK, causal=False,
            segment_ids_q_BxL=jnp.ones_like(key_valid_NxT, dtype=jnp.int32),
            segment_ids_kv_BxS=key_valid_NxT.astype(jnp.int32),
            implementation=self.attention_kernel, cpu_layouts=numerics.cpu_attention_layouts)
        out_NxTxD = dense(config.hidden_size, (axes.AUDIO_HEADS, axes.HEAD_DIM, axes.AUDIO_EMBED), axis=(-2, -1),
                          use_bias=True, name="out_proj", **dense_kwargs)(attended_NxTxHxK)
        x_NxTxD = axes.constrain(x_NxTxD + out_NxTxD, activation_axes)

        h_NxTxD = layer_norm(epsilon=config.layer_norm_eps, name="final_layer_norm", dtype=self.dtype,
                             feature_axis=axes.AUDIO_EMBED)(x_NxTxD)
        h_NxTxF = gelu_exact(dense(config.intermediate_size, (axes.AUDIO_EMBED, axes.AUDIO_MLP), use_bias=True,
                                   name="fc1", **dense_kwargs)(h_NxTxD))
        h_NxTxD = dense(config.hidden_size, (axes.AUDIO_MLP, axes.AUDIO_EMBED), use_bias=True, name="fc2",
                        **dense_kwargs)(h_NxTxF)
        return axes.constrain(x_NxTxD + h_NxTxD, activation_axes), None


def _sinusoid_positions(length: int, channels: int):
    """Whisper's fixed position table (what transformers checkpoints store in embed_positions)."""
    log_timescale = jnp.log(10000.0) / (channels // 2 - 1)
    inv_timescales = jnp.exp(-log_timescale * jnp.arange(channels // 2, dtype=jnp.float32))
    scaled = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_timescales[None, :]
    return jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=1)


class AudioEncoder(nn.Module):
    """[windows, mel, frames] log-mel -> [windows, tokens_per_window, hidden] + valid-token mask."""

    config: EncoderConfig
    dtype: jnp.dtype
    remat_policy: str = "none"
    scan_layers: bool = True
    # A kernel (auto | xla | pallas): the windows are parallelised over the mesh, never the sequence.
    attention_kernel: str = "xla"
    numerics: Numerics = Numerics()

    @nn.compact
    def __call__(self, mel_NxMxT, mel_valid_frames_N):
        config = self.config
        activation_axes = (axes.WINDOWS, axes.WINDOW_LENGTH, axes.ACT_AUDIO_EMBED)
        conv_kwargs = dict(kernel_size=(3,), padding=((1, 1),), dtype=self.dtype, param_dtype=jnp.float32,
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes.AUDIO_EMBED,)))
        mel_NxTxM = jnp.swapaxes(mel_NxMxT, 1, 2).astype(self.dtype)
        x_NxTxD = gelu_exact(nn.Conv(config.hidden_size, name="conv1", kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (axes.CONV_WIDTH, axes.MEL, axes.AUDIO_EMBED)), **conv_kwargs)(mel_NxTxM))
        x_NxPxD = gelu_exact(nn.Conv(config.hidden_size, strides=(2,), name="conv2", kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (axes.CONV_WIDTH, None, axes.AUDIO_EMBED)), **conv_kwargs)(x_NxTxD))
        # Fixed table, stored as a parameter so checkpoints round-trip; never trained (see FROZEN_PARAMETERS).
        positions_PxD = self.param(
            "embed_positions", nn.with_logical_partitioning(
                lambda key, shape, dtype: _sinusoid_positions(*shape).astype(dtype),
                (axes.AUDIO_POSITIONS, axes.AUDIO_EMBED)),
            (config.max_source_positions, config.hidden_size), jnp.float32)
        x_NxPxD = axes.constrain(x_NxPxD + jax.lax.stop_gradient(positions_PxD).astype(self.dtype), activation_axes)

        valid_after_conv_N = (mel_valid_frames_N - 1) // 2 + 1
        key_valid_NxP = jnp.arange(config.max_source_positions)[None, :] < valid_after_conv_N[:, None]
        x_NxPxD, _ = stack_layers(EncoderLayer, num_layers=config.num_layers, remat=self.remat_policy,
                                  scan=self.scan_layers, name="layers", numerics=self.numerics, config=config,
                                  dtype=self.dtype, attention_kernel=self.attention_kernel)(x_NxPxD, key_valid_NxP)
        windows, positions, hidden = x_NxPxD.shape
        x_NxTxD = x_NxPxD.reshape(windows, positions // 2, 2, hidden).mean(axis=2)  # AvgPool1d(2, 2)
        x_NxTxD = layer_norm(epsilon=config.layer_norm_eps, name="layer_norm", dtype=self.dtype,
                             feature_axis=axes.AUDIO_EMBED)(x_NxTxD)
        token_valid_NxT = jnp.arange(config.tokens_per_window)[None, :] < encoder_tokens_for_frames(mel_valid_frames_N)[:, None]
        return axes.constrain(x_NxTxD, activation_axes), token_valid_NxT

