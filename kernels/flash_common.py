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
import functools

import jax
import jax.numpy as jnp

# The masking convention (fully masked rows: out 0, lse EMPTY_ROW_LSE) and the online-softmax update
# are af_next_jax/attention/masking.py's, shared with the plain-JAX paths; re-exported for the kernels.
from af_next_jax.attention.masking import (EMPTY_ROW_LSE, MASK_SCORE, backward_lse, finish_softmax,  # noqa: F401
                                           online_softmax_update)


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


def poisoned_outputs(kernel, inputs, in_specs, out_specs, out_shapes, num_leading_refs: int = 0):
    """Testing aid shared by both kernels: extra NaN-filled inputs aliased to the outputs (never read),
    so a block a kernel skips writing shows up as NaN. Returns (kernel, inputs, in_specs, aliases).
    `num_leading_refs`: refs before the inputs (the TPU kernels' scalar-prefetch refs)."""
    num_outputs = len(out_shapes)
    first = num_leading_refs + len(inputs)
    inputs = list(inputs) + [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shapes]
    in_specs = list(in_specs) + list(out_specs)
    aliases = {first + n: n for n in range(num_outputs)}
    return functools.partial(_drop_poison_refs, kernel, first, num_outputs), inputs, in_specs, aliases


def _drop_poison_refs(kernel, num_inputs, num_outputs, *refs):
    # refs: the real inputs, the poison buffers (aliased to the outputs, never read), the outputs.
    return kernel(*refs[:num_inputs], *refs[num_inputs + num_outputs:])


def recomputed_probs(cfg: KernelConfig, causal_shift, query_QxD, key_KxD, lse_R, q_start, kv_start, seg_q_Qx1,
                     seg_kv_1xK, kv_padded: bool):
    """Softmax probabilities of one block pair recomputed from the saved lse (masked entries 0);
    `lse_R` is [Q] (GPU) or [Q, 1] (TPU columns). Empty rows get 0 (masking.backward_lse)."""
    scores_QxK = matmul(query_QxD, key_KxD, 1, 1, dot_precision(query_QxD.dtype)) * cfg.sm_scale
    lse_Qx1 = backward_lse(lse_R if lse_R.ndim == 2 else lse_R[:, None])
    probs_QxK = jnp.exp(scores_QxK - lse_Qx1)
    mask = visible_mask(cfg, causal_shift, q_start, kv_start, seg_q_Qx1, seg_kv_1xK, query_QxD.shape[0],
                        key_KxD.shape[0], kv_padded)
    return probs_QxK if mask is None else jnp.where(mask, probs_QxK, 0.0)
