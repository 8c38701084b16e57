"""Moved to `af_next_jax.attention` (blockwise.py, block_kernels.py, sequence_parallel.py); these
names stay importable from here for existing scripts and tests."""

from af_next_jax.attention.block_kernels import BlockKernel, select_block_kernel
from af_next_jax.attention.blockwise import (DEFAULT_KV_CHUNK, attention_delta, block_backward, block_forward,
                                             merge_partials as merge_blocks)
from af_next_jax.attention.sequence_parallel import local_flash_attention


def select_block_forward(block_implementation: str) -> BlockKernel:
    """The block kernel (forward and backward) for 'xla', 'pallas' or 'auto'; see block_kernels.py."""
    if block_implementation not in ("auto", "xla", "pallas"):
        raise ValueError(f"block_implementation must be 'auto', 'xla' or 'pallas', got {block_implementation!r}")
    return select_block_kernel(block_implementation)


__all__ = ["DEFAULT_KV_CHUNK", "attention_delta", "block_backward", "block_forward", "merge_blocks",
           "local_flash_attention", "select_block_forward"]
