"""af-next-jax: JAX/Flax training stack for AF-Next-style audio-language models."""

from af_next_jax.xla_cpu_options import apply_xla_cpu_options, keep_freed_memory_in_process

apply_xla_cpu_options()  # before any JAX computation: XLA reads its flags when the first backend starts
MALLOC_TUNED = keep_freed_memory_in_process()  # before JAX starts its threads (xla_cpu_options.py)

from af_next_jax.config import ModelConfig, preset  # noqa: E402

__all__ = ["ModelConfig", "preset"]
