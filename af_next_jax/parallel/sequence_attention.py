"""Moved to `af_next_jax.attention.sequence_parallel`; importable from here for existing callers."""

from af_next_jax.attention.sequence_parallel import sequence_parallel_attention

__all__ = ["sequence_parallel_attention"]
