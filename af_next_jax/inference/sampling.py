"""Next-token choice from logits: greedy, or temperature / top-k / top-p sampling with an explicit key.

The order of the filters is transformers' (`generate` applies temperature, then top-k, then top-p),
so a setting means the same thing here and there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (argmax; the key is unused). top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits_BxV, sampling: SamplingConfig):
    """float32 logits / temperature with every token outside the top-k and the top-p nucleus at -inf."""
    logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits_BxV.shape[-1]:
        kth_largest_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_largest_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays when the
        # mass of the tokens ranked above it is still below top_p (so the top token always stays).
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_above_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        kept_BxV = mass_above_BxV < sampling.top_p
        threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def next_token(logits_BxV, key, sampling: SamplingConfig):
    """[B] int32 next tokens."""
    if sampling.greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BxV, sampling), axis=-1).astype(jnp.int32)
