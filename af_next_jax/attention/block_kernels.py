"""The per-block kernel ring and Ulysses run: a forward with LSE and the matching backward.

  xla     blockwise.py: `lax.scan` over key chunks, the reference/CPU path
  pallas  the flash kernels of `kernels/`: `flash_attention(return_lse=True)` forward and
          `flash_attention_backward` (the ring's per-step backward given the final LSE and delta)

Both take [B, L, H, D] / [B, S, K, D] blocks and keyword masks (causal, segment ids, offsets),
return float32, and follow masking.py's convention, so ring and Ulysses are kernel-agnostic.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from af_next_jax.attention import blockwise
from af_next_jax.attention.platform import resolve_kernel
from af_next_kernels import flash_attention as flash_module


@dataclasses.dataclass(frozen=True)
class BlockKernel:
    """forward(q, k, v, **masks) -> (out f32, lse [B, H, L]); backward(q, k, v, dout, lse, delta,
    **masks) -> (dq, dk, dv) f32. Hashable: ring and Ulysses take it as a static custom_vjp argument."""

    name: str
    forward: Callable
    backward: Callable


def _pallas_forward(query, key, value, **masks):
    masks.pop("kv_chunk", None)
    # Looked up on the module at call time, so a test can wrap the kernel and see it called.
    out, lse = flash_module.flash_attention(query, key, value, return_lse=True, **masks)
    return out.astype(jnp.float32), lse


def _pallas_backward(query, key, value, dout, lse, delta, **masks):
    masks.pop("kv_chunk", None)
    return flash_module.flash_attention_backward(query, key, value, dout, lse, delta,
                                                 grad_dtype=jnp.float32, **masks)


XLA_BLOCKS = BlockKernel("xla", blockwise.block_forward, blockwise.block_backward)
PALLAS_BLOCKS = BlockKernel("pallas", _pallas_forward, _pallas_backward)


def select_block_kernel(kernel: str) -> BlockKernel:
    """The block kernel for an attention kernel name ("auto" resolved for the target platform)."""
    return {"xla": XLA_BLOCKS, "pallas": PALLAS_BLOCKS}[resolve_kernel(kernel)]
