"""af-next-jax: JAX/Flax training stack for AF-Next-style audio-language models.

Importing the package changes nothing in the importing process (environment, allocator, logging):
the command-line entry points set their own process up (af_next_jax/process_setup.py).
"""

from af_next_jax.config import ModelConfig, preset

__all__ = ["ModelConfig", "preset"]
