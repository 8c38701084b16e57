"""Prefill, then a jitted decode step over a static-shape KV cache, and the generation loop.

    generator = Generator(config)
    result = generator.generate(params, prompt_batch, max_new_tokens=64, stop_token_ids=(im_end,),
                                pad_id=pad, sampling=SamplingConfig(), key=jax.random.key(0))

`prompt_batch` follows the batch contract (af_next_jax/batch.py: token_ids, positions, segment_ids and
the audio fields) with two inference rules, which `prompts.prompt_batch` enforces:
  - rows are LEFT-padded (segment id 0, any id but `<sound>`), so every row's last prompt token sits
    in the last column and every row writes the same cache slot at each step;
  - positions count each row's real tokens (0, 1, ...), as transformers' `generate` derives them
    from the attention mask, and segment ids are 1 on real tokens (no packing).
The encoder and projector run once, in the prefill; decode steps embed one token per row. The cache
layout and the one layer that computes both training and decoding: af_next_jax/model/decoder.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from af_next_jax.config import ModelConfig
from af_next_jax.inference.sampling import SamplingConfig, next_token
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.decoder import CACHE_LOGICAL_AXES, empty_kv_cache

def inference_config(config: ModelConfig) -> ModelConfig:
    """The config decoding runs: no sequence-parallel strategy. A decode step has one token per row,
    nothing to split, and its attention is plain XLA (decoder.py); the prefill runs the configured
    kernel on GSPMD-sharded activations. The cache itself may still be sharded over the sequence."""
    return config.replace(sequence_parallelism="none")


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens_BxN: np.ndarray   # [B, max_new_tokens] int32; after a row's stop token: pad_id
    lengths_B: np.ndarray    # [B] generated tokens per row, its stop token included
    stopped_B: np.ndarray    # [B] bool: the row ended on a stop token (else it hit max_new_tokens)

    def row(self, index: int) -> list[int]:
        return [int(t) for t in self.tokens_BxN[index, :self.lengths_B[index]]]


def _prefill_method(module: AFNextModel, batch: dict, cache: dict):
    embeds_BxPxD = module.embed_audio_and_text(batch)
    hidden_BxPxD, cache = module.decoder.decode(embeds_BxPxD, batch["positions"], batch["segment_ids"], cache)
    return module.decoder.logits(hidden_BxPxD[:, -1:])[:, 0], cache


def _decode_method(module: AFNextModel, token_ids_B, positions_B, cache: dict):
    embeds_Bx1xD = module.decoder.embed(token_ids_B[:, None])
    real_Bx1 = jnp.ones_like(token_ids_B)[:, None]
    hidden_Bx1xD, cache = module.decoder.decode(embeds_Bx1xD, positions_B[:, None], real_Bx1, cache)
    return module.decoder.logits(hidden_Bx1xD)[:, 0], cache


class Generator:
    """Jitted prefill / decode step / generation loop of one model config (compiled once per shape)."""

    def __init__(self, config: ModelConfig):
        self.config = inference_config(config)
        self.model = AFNextModel(self.config)
        self.cache_dtype = jnp.dtype(self.config.compute_dtype)
        self.prefill = jax.jit(self._prefill, static_argnames="max_length")
        self.decode_step = jax.jit(self._decode_step, donate_argnames="cache")
        self._generate_jit = jax.jit(self._generate, static_argnames=(
            "max_new_tokens", "sampling", "stop_token_ids", "pad_id"))

    def empty_cache(self, batch_size: int, max_length: int) -> dict:
        return empty_kv_cache(self.config.decoder, batch_size=batch_size, max_length=max_length,
                              dtype=self.cache_dtype)

    def cache_shardings(self, cache: dict, mesh, rules) -> dict:
        """NamedShardings of a cache's entries from their logical axes and the rules table."""
        return cache_shardings(cache, mesh, rules)

    def _prefill(self, params, batch, *, max_length: int):
        """(logits [B, V] of each row's next token, cache with the prompt written at slots 0..P-1)."""
        batch_size = batch["token_ids"].shape[0]
        return self.model.apply(params, batch, self.empty_cache(batch_size, max_length), method=_prefill_method)

    def _decode_step(self, params, token_ids_B, positions_B, cache):
        """Feed one token per row at RoPE positions `positions_B`: (logits [B, V], cache)."""
        return self.model.apply(params, token_ids_B, positions_B, cache, method=_decode_method)

    def _generate(self, params, batch, key, *, max_new_tokens, sampling, stop_token_ids, pad_id):
        batch_size, prompt_length = batch["token_ids"].shape
        logits_BxV, cache = self._prefill(params, batch, max_length=prompt_length + max_new_tokens)
        stop_S = jnp.asarray(stop_token_ids, jnp.int32).reshape(-1)

        def unfinished(carry):
            step, _, done_B, *_ = carry
            return (step < max_new_tokens) & ~jnp.all(done_B)

        def step_fn(carry):
            step, tokens_BxN, done_B, logits_BxV, cache, positions_B = carry
            token_B = next_token(logits_BxV, jax.random.fold_in(key, step), sampling)
            token_B = jnp.where(done_B, pad_id, token_B)
            tokens_BxN = tokens_BxN.at[:, step].set(token_B)
            done_B = done_B | jnp.isin(token_B, stop_S)
            logits_BxV, cache = self._decode_step(params, token_B, positions_B, cache)
            return step + 1, tokens_BxN, done_B, logits_BxV, cache, positions_B + 1

        carry = (jnp.zeros((), jnp.int32), jnp.full((batch_size, max_new_tokens), pad_id, jnp.int32),
                 jnp.zeros((batch_size,), bool), logits_BxV, cache, batch["positions"][:, -1] + 1)
        _, tokens_BxN, done_B, *_ = jax.lax.while_loop(unfinished, step_fn, carry)
        return tokens_BxN, done_B

    def generate(self, params, batch: dict, *, max_new_tokens: int, stop_token_ids=(), pad_id: int = 0,
                 sampling: SamplingConfig = SamplingConfig(), key=None) -> GenerationResult:
        """Generate up to `max_new_tokens` per row; a row ends at its first token in `stop_token_ids`."""
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if key is None:
            if not sampling.greedy:
                raise ValueError("sampling with temperature > 0 needs an explicit key (jax.random.key(seed))")
            key = jax.random.key(0)
        stop_token_ids = tuple(int(t) for t in stop_token_ids)
        tokens_BxN, stopped_B = self._generate_jit(params, batch, key, max_new_tokens=max_new_tokens,
                                                   sampling=sampling, stop_token_ids=stop_token_ids,
                                                   pad_id=int(pad_id))
        tokens_BxN, stopped_B = np.asarray(tokens_BxN), np.asarray(stopped_B)
        return GenerationResult(tokens_BxN, _lengths(tokens_BxN, stopped_B, stop_token_ids), stopped_B)


@functools.lru_cache(maxsize=8)
def generator_for(config: ModelConfig) -> Generator:
    """One Generator per config in a process, so repeated calls (CLI, evaluator, tests) reuse its
    compiled programs."""
    return Generator(config)


def cache_shardings(cache: dict, mesh, rules) -> dict:
    """NamedShardings of each cache entry (decoder.CACHE_LOGICAL_AXES) under `rules` on `mesh`."""
    from af_next_jax.parallel.rules import logical_sharding

    return {name: logical_sharding(CACHE_LOGICAL_AXES[name], value.shape, mesh, rules)
            for name, value in cache.items()}


def _lengths(tokens_BxN: np.ndarray, stopped_B: np.ndarray, stop_token_ids: tuple[int, ...]) -> np.ndarray:
    is_stop_BxN = np.isin(tokens_BxN, stop_token_ids)
    first_stop_B = np.argmax(is_stop_BxN, axis=1) + 1
    return np.where(stopped_B, first_stop_B, tokens_BxN.shape[1]).astype(np.int32)
