"""Projector: Linear(encoder -> decoder) -> GELU -> Linear(decoder -> decoder) (transformers' MultiModalProjector)."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from af_next_jax.config import ProjectorConfig
from af_next_jax.model import axes
from af_next_jax.model.layers import dense, gelu_exact
from af_next_jax.model.numerics import Numerics


class Projector(nn.Module):
    config: ProjectorConfig
    output_size: int
    dtype: jnp.dtype
    numerics: Numerics

    @nn.compact
    def __call__(self, audio_NxTxA):
        # The projector's hidden width is the decoder width; it is named `mlp` so the rules shard it
        # like an MLP's inner axis (two `embed` axes on one kernel could not map to one mesh axis).
        h_NxTxE = gelu_exact(dense(self.output_size, (axes.AUDIO_EMBED, axes.MLP), use_bias=self.config.use_bias,
                                   name="linear_1", dtype=self.dtype, numerics=self.numerics)(audio_NxTxA))
        h_NxTxE = axes.constrain(h_NxTxE, (axes.WINDOWS, axes.WINDOW_LENGTH, axes.ACT_MLP))
        return dense(self.output_size, (axes.MLP, axes.EMBED), use_bias=self.config.use_bias, name="linear_2",
                     dtype=self.dtype, numerics=self.numerics)(h_NxTxE)
