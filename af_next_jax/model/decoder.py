"""Qwen2 decoder: GQA attention with split-halves RoPE, SwiGLU MLP, float32 RMSNorm, untied lm_head.

transformers reference: `Qwen2ForCausalLM` (qwen2/modeling_qwen2.py).

One `DecoderLayer` serves training and decoding. Training passes no cache. Decoding
(`Decoder.decode`, driven by `af_next_jax/inference/`) passes a static-shape KV cache:

  key, value    [layers, B, S, kv_heads, head_dim]  keys after RoPE, in the compute dtype
  segment_ids   [B, S] int32   1 where a slot holds a real token, 0 for left padding / unwritten slots
  index         [] int32       the next slot to write, shared by every row

Rows are LEFT-padded, so all rows write the same slot at each step (one dynamic_update_slice, no
per-row scatter) and positions are per-row token counts (HF `generate`'s cumsum(attention_mask) - 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from af_next_jax.attention.dispatch import dot_product_attention
from af_next_jax.attention.platform import AttentionChoice
from af_next_jax.config import DecoderConfig
from af_next_jax.model import axes
from af_next_jax.model.layers import DEFAULT_KERNEL_INIT, RMSNorm, dense, stack_layers, swiglu
from af_next_jax.model.numerics import Numerics

ACTIVATION_AXES = (axes.BATCH, axes.LENGTH, axes.ACT_EMBED)
# The cache carries the same logical axes as the keys/values it stores (sequence over the sequence
# mesh axes, KV heads over tensor), so the one rules table shards it; the layers axis is not sharded.
KV_CACHE_AXES = (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None)
CACHE_LOGICAL_AXES = {"key": (None,) + KV_CACHE_AXES, "value": (None,) + KV_CACHE_AXES,
                      "segment_ids": (axes.BATCH, axes.LENGTH), "index": ()}


def rope_angles(positions_BxL, *, head_dim: int, theta: float):
    """[B, L, head_dim / 2] float32 angles: position x theta^(-2i / head_dim)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    return positions_BxL.astype(jnp.float32)[..., None] * inv_freq


def apply_rope_split_halves(x_BxLxHxK, angles_BxLxF):
    """Rotate (first half, second half) channel pairs: transformers' `rotate_half` convention."""
    cos = jnp.cos(angles_BxLxF)[:, :, None, :]
    sin = jnp.sin(angles_BxLxF)[:, :, None, :]
    x32 = x_BxLxHxK.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x_BxLxHxK.dtype)


class DecoderLayer(nn.Module):
    config: DecoderConfig
    dtype: jnp.dtype
    attention: AttentionChoice
    numerics: Numerics

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, kv_cache=None, cache_state=None):
        """(x, None) in training; with `kv_cache` ({"key", "value"} of this layer) and `cache_state`
        ({"index", "segment_ids" [B, S] already marking the new tokens}): (x, updated kv_cache)."""
        config, numerics = self.config, self.numerics
        h_BxLxD = RMSNorm(config.rms_norm_eps, self.dtype, name="input_layernorm")(x_BxLxD)
        query_BxLxHxK = dense((config.num_heads, config.head_dim), (axes.EMBED, axes.Q_HEADS, axes.HEAD_DIM),
                              use_bias=True, name="q_proj", dtype=self.dtype, numerics=numerics)(h_BxLxD)
        key_BxLxGxK = dense((config.num_kv_heads, config.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                            use_bias=True, name="k_proj", dtype=self.dtype, numerics=numerics)(h_BxLxD)
        value_BxLxGxK = dense((config.num_kv_heads, config.head_dim), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM),
                              use_bias=True, name="v_proj", dtype=self.dtype, numerics=numerics)(h_BxLxD)
        query_BxLxHxK = axes.constrain(query_BxLxHxK, (axes.BATCH, axes.LENGTH, axes.ACT_HEADS, None))
        key_BxLxGxK = axes.constrain(key_BxLxGxK, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))
        value_BxLxGxK = axes.constrain(value_BxLxGxK, (axes.BATCH, axes.LENGTH, axes.ACT_KV_HEADS, None))

        angles_BxLxF = rope_angles(positions_BxL, head_dim=config.head_dim, theta=config.rope_theta)
        query_BxLxHxK = apply_rope_split_halves(query_BxLxHxK, angles_BxLxF)
        key_BxLxGxK = apply_rope_split_halves(key_BxLxGxK, angles_BxLxF)
        new_kv_cache = None
        if kv_cache is not None:
            key_BxSxGxK, value_BxSxGxK, new_kv_cache = write_kv_cache(kv_cache, cache_state["index"],
                                                                      key_BxLxGxK, value_BxLxGxK)
        if kv_cache is not None and x_BxLxD.shape[1] == 1:
            # One new token per row: it sees every written, non-padding slot (itself included).
            attended_BxLxHxK = dot_product_attention(
                query_BxLxHxK, key_BxSxGxK, value_BxSxGxK, causal=False, segment_ids_q_BxL=segment_ids_BxL,
                segment_ids_kv_BxS=cache_state["segment_ids"], implementation="xla",
                cpu_layouts=numerics.cpu_attention_layouts)
        else:
            # Training, or a prefill into an empty cache (slots 0..L-1): the new tokens only see each
            # other, so this is the training computation itself.
            attended_BxLxHxK = dot_product_attention(
                query_BxLxHxK, key_BxLxGxK, value_BxLxGxK, causal=True, segment_ids_q_BxL=segment_ids_BxL,
                segment_ids_kv_BxS=segment_ids_BxL, implementation=self.attention,
                cpu_layouts=numerics.cpu_attention_layouts)
        attended_BxLxHxK = checkpoint_name(attended_BxLxHxK, "attention_out")
        out_BxLxD = dense(config.hidden_size, (axes.Q_HEADS, axes.HEAD_DIM, axes.EMBED), axis=(-2, -1),
                          use_bias=False, name="o_proj", dtype=self.dtype, numerics=numerics)(attended_BxLxHxK)
        x_BxLxD = axes.constrain(x_BxLxD + out_BxLxD, ACTIVATION_AXES)

        h_BxLxD = RMSNorm(config.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x_BxLxD)
        gate_BxLxF = dense(config.intermediate_size, (axes.EMBED, axes.MLP), use_bias=False, name="gate_proj",
                           dtype=self.dtype, numerics=numerics)(h_BxLxD)
        up_BxLxF = dense(config.intermediate_size, (axes.EMBED, axes.MLP), use_bias=False, name="up_proj",
                         dtype=self.dtype, numerics=numerics)(h_BxLxD)
        h_BxLxF = axes.constrain(swiglu(gate_BxLxF, up_BxLxF, numerics=numerics),
                                 (axes.BATCH, axes.LENGTH, axes.ACT_MLP))
        h_BxLxD = dense(config.hidden_size, (axes.MLP, axes.EMBED), use_bias=False, name="down_proj",
                        dtype=self.dtype, numerics=numerics)(h_BxLxF)
        return axes.constrain(x_BxLxD + h_BxLxD, ACTIVATION_AXES), new_kv_cache


def write_kv_cache(kv_cache, index, key_BxLxGxK, value_BxLxGxK):
    """Write L new keys/values at slots [index, index + L) of every row; returns the full cache
    tensors and the updated {"key", "value"}."""
    start = (0, index, 0, 0)
    key_BxSxGxK = axes.constrain(
        jax.lax.dynamic_update_slice(kv_cache["key"], key_BxLxGxK.astype(kv_cache["key"].dtype), start),
        KV_CACHE_AXES)
    value_BxSxGxK = axes.constrain(
        jax.lax.dynamic_update_slice(kv_cache["value"], value_BxLxGxK.astype(kv_cache["value"].dtype), start),
        KV_CACHE_AXES)
    return key_BxSxGxK, value_BxSxGxK, {"key": key_BxSxGxK, "value": value_BxSxGxK}


def empty_kv_cache(config: DecoderConfig, *, batch_size: int, max_length: int, dtype) -> dict:
    """A cache of `max_length` slots per row with nothing written (see the module docstring)."""
    kv_shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    return {"key": jnp.zeros(kv_shape, dtype), "value": jnp.zeros(kv_shape, dtype),
            "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


class Decoder(nn.Module):
    """Token embedding, the layer stack and the final norm; `logits` applies the lm_head."""

    config: DecoderConfig
    dtype: jnp.dtype
    remat_policy: str = "none"
    scan_layers: bool = True
    attention: AttentionChoice = AttentionChoice("xla")
    numerics: Numerics = Numerics()

    def setup(self):
        config = self.config
        self.embed_tokens = self.param(
            "embed_tokens", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, (axes.VOCAB, axes.EMBED)),
            (config.vocab_size, config.hidden_size), jnp.float32)
        # Arguments after x: positions, segment ids and the cache state are shared by every layer; the
        # KV cache is sliced per layer along its leading layers axis.
        self.layers = stack_layers(DecoderLayer, num_layers=config.num_layers, remat=self.remat_policy,
                                   scan=self.scan_layers, name="layers", numerics=self.numerics,
                                   in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), config=config,
                                   dtype=self.dtype, attention=self.attention)
        self.norm = RMSNorm(config.rms_norm_eps, self.dtype)
        if not config.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, (axes.EMBED, axes.VOCAB)),
                (config.hidden_size, config.vocab_size), jnp.float32)

    def embed(self, token_ids_BxL):
        # Gather rows from a table sharded over vocab only, so the lookup yields sequence-sharded
        # embeddings instead of an all-gathered [B, L, D].
        table_VxD = axes.constrain(self.embed_tokens, (axes.VOCAB, None))
        embeds_BxLxD = jnp.take(table_VxD, token_ids_BxL, axis=0).astype(self.dtype)
        return axes.constrain(embeds_BxLxD, ACTIVATION_AXES)

    def __call__(self, embeds_BxLxD, positions_BxL, segment_ids_BxL):
        hidden_BxLxD, _ = self.layers(embeds_BxLxD, positions_BxL, segment_ids_BxL, None, None)
        return self.norm(hidden_BxLxD)

    def decode(self, embeds_BxLxD, positions_BxL, segment_ids_BxL, cache):
        """Run L new tokens per row through the same layers, writing their keys/values at slots
        [cache["index"], + L). L > 1 only into an empty cache (the prefill); then L = 1 per step.
        The caller keeps index + L <= the cache's slots: past the end, dynamic_update_slice clamps
        the write onto the last slots (silently, and differently once sharded).
        Returns (final hidden [B, L, D], updated cache)."""
        index = cache["index"]
        cache_segment_ids_BxS = jax.lax.dynamic_update_slice(
            cache["segment_ids"], segment_ids_BxL.astype(jnp.int32), (0, index))
        cache_state = {"index": index, "segment_ids": cache_segment_ids_BxS}
        hidden_BxLxD, kv_cache = self.layers(embeds_BxLxD, positions_BxL, segment_ids_BxL,
                                             {"key": cache["key"], "value": cache["value"]}, cache_state)
        new_cache = {**kv_cache, "segment_ids": cache_segment_ids_BxS, "index": index + embeds_BxLxD.shape[1]}
        return self.norm(hidden_BxLxD), new_cache

    def output_projection(self):
        """The [hidden, vocab] lm_head matrix (the embedding's transpose when tied)."""
        return self.embed_tokens.T if self.config.tie_word_embeddings else self.lm_head

    def logits(self, hidden_BxLxD):
        logits_BxLxV = jnp.einsum("bld,dv->blv", hidden_BxLxD, self.output_projection().astype(self.dtype))
        return axes.constrain(logits_BxLxV, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))
