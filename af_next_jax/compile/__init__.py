"""Ahead-of-time compilation for a TPU topology on any host: `python -m af_next_jax.compile`."""
