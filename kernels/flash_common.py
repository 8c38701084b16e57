"""What the GPU and TPU flash-attention kernels share: constants, static config, masks, block bounds.

Every kernel works on the "kernel layout": query [B, H, L, D], key/value [B, K, S, D] with L and S
padded to whole blocks, int32 segment ids [B, L] / [B, S] (edge-padded, see `pad_to_blocks`), and
per-block segment id ranges that let a kernel skip a (query block, key block) pair whose segment
ranges do not overlap. A ring step's offsets arrive as one int32 `causal_shift = q_offset - kv_offset`
(a traced value: the ring computes it from the device index), so query i sees key j under the causal
mask iff `causal_shift + i >= j`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# A query row that sees no key at all (a padding window of the encoder) gets output 0 and this lse.
# Finite on purpose: a ring merge `logaddexp(lse_a, lse_b)` and the weights `exp(lse_a - lse)` stay
# finite (logaddexp(-1e30, x) == x; two empty rows merge to -1e30), where -inf would give NaN.
EMPTY_ROW_LSE = -1e30
# Score given to masked entries inside the kernels; equal to EMPTY_ROW_LSE so a row whose running
# max is still MASK_SCORE after the last key block is exactly the empty row.
MASK_SCORE = -1e30


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static (trace-time) parameters of one kernel launch; hashable so it can be a nondiff arg."""
    causal: bool
    has_segments: bool
    sm_scale: float
    block_q: int
    block_kv: int
    kv_len: int            # true (unpadded) key length: keys at or past it are masked
    backend: str           # "gpu" (Triton) or "tpu" (Mosaic)
    interpret: bool
    poison_outputs: bool = False  # testing aid: outputs start as NaN, so an unwritten block shows up


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pad_to_blocks(x, axis: int, block: int, mode: str = "constant"):
    """Pads `axis` up to a multiple of `block` (zeros, or the edge value for segment ids)."""
    pad = -x.shape[axis] % block
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def block_segment_ranges(segment_ids_BxN, block: int):
    """Per-block (min, max) segment id, [B, N/block] each. Edge padding keeps padded slots inside
    the last real block's range, so the ranges stay tight."""
    blocks = segment_ids_BxN.reshape(segment_ids_BxN.shape[0], -1, block)
    return blocks.min(axis=-1), blocks.max(axis=-1)


def segment_ranges_overlap(q_min, q_max, kv_min, kv_max):
    """False only when no query of the block can share a segment with any key of the block."""
    return jnp.logical_and(q_min <= kv_max, kv_min <= q_max)


def causal_kv_block_end(causal_shift, q_block_index, block_q: int, block_kv: int, num_kv_blocks: int):
    """One past the last key block that any query of this query block may see (causal)."""
    last_visible_key = causal_shift + (q_block_index + 1) * block_q - 1
    return jnp.clip(last_visible_key // block_kv + 1, 0, num_kv_blocks)


def causal_q_block_start(causal_shift, kv_block_index, block_q: int, block_kv: int, num_q_blocks: int):
    """First query block in which some query may see this key block (causal)."""
    first_seeing_query = kv_block_index * block_kv - causal_shift
    return jnp.clip(first_seeing_query // block_q, 0, num_q_blocks)


def visible_mask(cfg: KernelConfig, causal_shift, q_start, kv_start, seg_q_block, seg_kv_block,
                 block_q: int, block_kv: int, kv_padded: bool):
    """[block_q, block_kv] bool: which (query, key) pairs of this block pair are visible, or None
    when every pair is (no causal, no segments, no padded keys). Segment ids come shaped to
    broadcast: [block_q, 1] and [1, block_kv]."""
    mask = None

    def conj(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if cfg.causal or kv_padded:
        kv_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
        if cfg.causal:
            q_pos = q_start + causal_shift + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0)
            mask = conj(mask, q_pos >= kv_pos)
        if kv_padded:
            mask = conj(mask, kv_pos < cfg.kv_len)
    if cfg.has_segments:
        mask = conj(mask, seg_q_block == seg_kv_block)
    return mask


def dot_precision(dtype):
    """float32 inputs must not silently drop to TF32 (GPU) or one bf16 pass (TPU)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def matmul(a, b, contract_a: int, contract_b: int, precision):
    """2-D matmul contracting a's axis `contract_a` with b's axis `contract_b`, float32 result."""
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               precision=precision, preferred_element_type=jnp.float32)
