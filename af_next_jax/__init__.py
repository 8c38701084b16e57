"""af-next-jax: JAX/Flax training stack for AF-Next-style audio-language models."""

from af_next_jax.config import ModelConfig, preset

__all__ = ["ModelConfig", "preset"]
