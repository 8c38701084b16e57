"""Fused (flash) attention: the public entry point and its custom VJP (the Pallas kernels' wrapper).

`flash_attention` is what `af_next_jax.attention.dispatch.dot_product_attention` runs for the "pallas"
kernel, and with `flash_attention_backward` what ring and Ulysses run per block
(af_next_jax/attention/block_kernels.py). Semantics are those of `af_next_jax.attention.reference`:
query i attends key j iff the causal rule allows it (`q_offset + i >= kv_offset + j`) AND
`segment_ids_q[i] == segment_ids_kv[j]`; GQA: query head h reads KV head h // (H / K).

Log-sum-exp (for the ring merge): `lse[b, h, i] = log(sum_j exp(sm_scale * q_i . k_j))` over the keys
query i sees, natural log, float32, shape [B, H, L], so `out_i = sum_j exp(s_ij - lse_i) v_j`.
Two partial results over disjoint key sets merge exactly as
    lse = logaddexp(lse_a, lse_b);  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.
A query that sees no key at all (every key masked: a padding window of the encoder) gets out = 0,
lse = EMPTY_ROW_LSE and zero gradients: the convention of af_next_jax/attention/masking.py, which
every path (reference, blockwise, ring, Ulysses, both kernels) follows.

Backward: a `custom_vjp` that saves only q, k, v, out and lse (O(N) memory) and recomputes the
probabilities blockwise; a cotangent on lse (the ring merge differentiates through it) is folded
into the row term delta = rowsum(out * dout) - dlse.

Backends: Pallas GPU via Triton (`flash_attention_gpu.py`, where the Triton-vs-Mosaic-GPU choice is
explained) and Pallas TPU via Mosaic (`flash_attention_tpu.py`); on the CPU the GPU kernel runs with
`interpret=True`, which is how CI tests it. The backend (`backend=None`) and interpret mode are
decided for the platform being compiled for (the ambient mesh's devices), not the host's default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from af_next_jax.attention.platform import target_platform
from af_next_jax.attention.reference import reference_attention  # noqa: F401  (the kernels' ground truth)
from af_next_kernels import flash_attention_gpu
from af_next_kernels.flash_common import (EMPTY_ROW_LSE, KernelConfig, block_segment_ranges,  # noqa: F401
                                          next_power_of_2, pad_to_blocks)

# Default (block_q, block_kv) per backend. GPU: 128 x 64 keeps a head_dim-128 fp32 accumulator
# plus a score tile in registers with 8 warps. TPU: large tiles amortise the ~0.35 us per grid step.
# Interpret (CPU): big blocks mean fewer serial grid steps.
DEFAULT_BLOCKS = {"gpu": (128, 64), "tpu": (512, 512), "interpret": (128, 128)}
BACKENDS = ("gpu", "tpu", "interpret")


def _resolve_backend(backend, interpret):
    # The platform compiled for (the ambient mesh's devices), not the host's default backend: a TPU
    # program traced on a CPU host must get the Mosaic kernel, not the interpreter.
    platform = target_platform()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu" if platform == "gpu" else "interpret"
    if backend not in BACKENDS:
        raise ValueError(f"unknown flash attention backend {backend!r}; valid: {BACKENDS} or None (auto)")
    if backend == "interpret":
        return "gpu", True, DEFAULT_BLOCKS["interpret"]
    if interpret is None:
        interpret = platform != backend
    return backend, interpret, DEFAULT_BLOCKS["interpret" if interpret else backend]


def _fit_block(block: int, length: int, backend: str, name: str) -> int:
    """Shrinks a block to the (padded) length; GPU blocks must be powers of 2 (Triton tensor sizes)."""
    if block <= 0 or block & (block - 1):
        raise ValueError(f"{name}={block} must be a positive power of 2")
    floor = 128 if backend == "tpu" else 16  # TPU: lane width; GPU: smallest tl.dot tile
    return min(block, max(floor, next_power_of_2(length)))


def flash_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, causal: bool = False,
                    segment_ids_q_BxL=None, segment_ids_kv_BxS=None, q_offset=0, kv_offset=0,
                    sm_scale=None, block_q=None, block_kv=None, backend=None, interpret=None,
                    return_lse: bool = False, poison_outputs: bool = False):
    """Blocked attention with online softmax; returns out [B, L, H, D] (query dtype), and lse if asked.

    q_offset / kv_offset: absolute positions of the first query / key (ints or traced int scalars,
      for ring steps); only the causal mask reads them.
    sm_scale: a Python float (static); default head_dim ** -0.5.
    block_q / block_kv: tile sizes (powers of 2; default per backend, shrunk for short inputs).
      Lengths need not be multiples: inputs are padded internally and padded keys masked.
    backend: "gpu" (Pallas Triton), "tpu" (Pallas Mosaic), "interpret" (the GPU kernel on the CPU),
      or None for the default device's. interpret: run the chosen backend's kernel in the Pallas
      interpreter (default: when the default device is not that backend).
    return_lse: also return lse [B, H, L] float32 (see the module docstring; differentiable).
    poison_outputs: testing aid; kernel outputs start as NaN, so any block a kernel skips writing
      shows up as NaN instead of a plausible zero.
    """
    q_len = query_BxLxHxD.shape[1]
    cfg, query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, masks = _prepare(
        query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, causal, segment_ids_q_BxL, segment_ids_kv_BxS,
        q_offset, kv_offset, sm_scale, block_q, block_kv, backend, interpret, poison_outputs)
    out_BxHxLxD, lse_BxHxL = _flash(cfg, query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, *masks)
    out_BxLxHxD = out_BxHxLxD[:, :, :q_len].transpose(0, 2, 1, 3)
    if return_lse:
        return out_BxLxHxD, lse_BxHxL[:, :, :q_len]
    return out_BxLxHxD


def flash_attention_backward(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, dout_BxLxHxD, lse_BxHxL,
                             delta_BxHxL, *, causal: bool = False, segment_ids_q_BxL=None,
                             segment_ids_kv_BxS=None, q_offset=0, kv_offset=0, sm_scale=None,
                             block_q=None, block_kv=None, backend=None, interpret=None,
                             grad_dtype=jnp.float32, poison_outputs: bool = False):
    """The backward kernels alone, for a ring step: (dq [B, L, H, D], dk, dv [B, S, K, D]) in grad_dtype.

    lse and delta are the *final* ones of the query rows (after merging every key block):
    P = exp(S - lse) restricted to this key block, dS = P * (dO V^T - delta), with
    delta = rowsum(out * dout) [B, H, L] float32 over the final output. Summing dq over the ring's key
    blocks, and taking each block's dk / dv, gives the gradients of attention over all keys.
    Arguments as in `flash_attention`.
    """
    q_len, kv_len = query_BxLxHxD.shape[1], key_BxSxKxD.shape[1]
    cfg, query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, masks = _prepare(
        query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, causal, segment_ids_q_BxL, segment_ids_kv_BxS,
        q_offset, kv_offset, sm_scale, block_q, block_kv, backend, interpret, poison_outputs)
    padded_q_len = query_BxHxLxD.shape[2]
    rows = lambda x: pad_to_blocks(x.astype(jnp.float32), 2, padded_q_len)
    dout_BxHxLxD = pad_to_blocks(dout_BxLxHxD.transpose(0, 2, 1, 3).astype(query_BxHxLxD.dtype), 2,
                                 padded_q_len)
    seg_q, seg_kv, q_min, q_max, kv_min, kv_max, shift_1 = masks
    dq, dk, dv = _kernels(cfg).backward(query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, dout_BxHxLxD,
                                        rows(lse_BxHxL), rows(delta_BxHxL), seg_q, seg_kv, (q_min, q_max),
                                        (kv_min, kv_max), shift_1, cfg, grad_dtype=grad_dtype)
    return (dq[:, :, :q_len].transpose(0, 2, 1, 3), dk[:, :, :kv_len].transpose(0, 2, 1, 3),
            dv[:, :, :kv_len].transpose(0, 2, 1, 3))


def _prepare(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, causal, segment_ids_q_BxL, segment_ids_kv_BxS,
             q_offset, kv_offset, sm_scale, block_q, block_kv, backend, interpret, poison_outputs):
    """Validates, picks blocks, and builds the kernel layout: padded [B, H, L, D] tensors, segment
    ids, per-block segment ranges and the causal shift."""
    batch, q_len, num_heads, head_dim = query_BxLxHxD.shape
    _, kv_len, num_kv_heads, _ = key_BxSxKxD.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads {num_heads} must be a multiple of key/value heads {num_kv_heads}")
    if key_BxSxKxD.shape[-1] != head_dim or value_BxSxKxD.shape != key_BxSxKxD.shape:
        raise ValueError(f"key {key_BxSxKxD.shape} and value {value_BxSxKxD.shape} must have equal shapes "
                         f"with head_dim {head_dim} like the query {query_BxLxHxD.shape}")
    if (segment_ids_q_BxL is None) != (segment_ids_kv_BxS is None):
        raise ValueError("pass both segment_ids_q_BxL and segment_ids_kv_BxS, or neither")
    if segment_ids_q_BxL is not None and (segment_ids_q_BxL.shape != (batch, q_len)
                                          or segment_ids_kv_BxS.shape != (batch, kv_len)):
        raise ValueError(f"segment ids must be [batch, length]: expected {(batch, q_len)} and "
                         f"{(batch, kv_len)}, got {segment_ids_q_BxL.shape} and {segment_ids_kv_BxS.shape}")
    backend, interpret, (default_q, default_kv) = _resolve_backend(backend, interpret)
    block_q = _fit_block(block_q or default_q, q_len, backend, "block_q")
    block_kv = _fit_block(block_kv or default_kv, kv_len, backend, "block_kv")
    has_segments = segment_ids_q_BxL is not None
    cfg = KernelConfig(causal=bool(causal), has_segments=has_segments,
                       sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
                       block_q=block_q, block_kv=block_kv, kv_len=kv_len, backend=backend,
                       interpret=bool(interpret), poison_outputs=poison_outputs)

    # Kernel layout: heads before length, so a (head, block) tile is contiguous.
    query_BxHxLxD = pad_to_blocks(query_BxLxHxD.transpose(0, 2, 1, 3), 2, block_q)
    key_BxKxSxD = pad_to_blocks(key_BxSxKxD.transpose(0, 2, 1, 3), 2, block_kv)
    value_BxKxSxD = pad_to_blocks(value_BxSxKxD.transpose(0, 2, 1, 3), 2, block_kv)
    if has_segments:
        seg_q_BxL = pad_to_blocks(segment_ids_q_BxL.astype(jnp.int32), 1, block_q, mode="edge")
        seg_kv_BxS = pad_to_blocks(segment_ids_kv_BxS.astype(jnp.int32), 1, block_kv, mode="edge")
    else:
        seg_q_BxL = jnp.zeros((batch, query_BxHxLxD.shape[2]), jnp.int32)
        seg_kv_BxS = jnp.zeros((batch, key_BxKxSxD.shape[2]), jnp.int32)
    q_min, q_max = block_segment_ranges(seg_q_BxL, block_q)
    kv_min, kv_max = block_segment_ranges(seg_kv_BxS, block_kv)
    shift_1 = (jnp.asarray(q_offset, jnp.int32) - jnp.asarray(kv_offset, jnp.int32)).reshape(1)
    masks = (seg_q_BxL, seg_kv_BxS, q_min, q_max, kv_min, kv_max, shift_1)
    return cfg, query_BxHxLxD, key_BxKxSxD, value_BxKxSxD, masks


def _kernels(cfg: KernelConfig):
    if cfg.backend == "tpu":
        from af_next_kernels import flash_attention_tpu
        return flash_attention_tpu
    return flash_attention_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, query, key, value, seg_q, seg_kv, q_min, q_max, kv_min, kv_max, shift_1):
    return _kernels(cfg).forward(query, key, value, seg_q, seg_kv, (q_min, q_max), (kv_min, kv_max),
                                 shift_1, cfg)


def _flash_fwd(cfg, query, key, value, seg_q, seg_kv, q_min, q_max, kv_min, kv_max, shift_1):
    out, lse = _flash(cfg, query, key, value, seg_q, seg_kv, q_min, q_max, kv_min, kv_max, shift_1)
    return (out, lse), (query, key, value, seg_q, seg_kv, q_min, q_max, kv_min, kv_max, shift_1, out, lse)


def _flash_bwd(cfg, residuals, cotangents):
    query, key, value, seg_q, seg_kv, q_min, q_max, kv_min, kv_max, shift_1, out, lse = residuals
    dout, dlse = cotangents
    # d lse_i / d s_ij = p_ij, so a cotangent on lse enters exactly like -delta.
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1) - dlse
    dq, dk, dv = _kernels(cfg).backward(query, key, value, dout.astype(query.dtype), lse, delta, seg_q,
                                        seg_kv, (q_min, q_max), (kv_min, kv_max), shift_1, cfg)
    return dq, dk, dv, None, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
