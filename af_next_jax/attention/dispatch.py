"""The single attention dispatch point: every attention of the model calls `dot_product_attention`.

Masks are described, never materialised by callers: `causal` plus per-token segment ids (masking.py
states the convention, including the fully masked row). `implementation` is an `AttentionChoice`
(kernel, sequence-parallel strategy; platform.py) or a kernel name alone ("auto" | "xla" | "pallas",
no sequence parallelism). `cpu_layouts` is the program's platform decision for the "xla"
kernel's backward (recompute.py; the model passes `Numerics.cpu_attention_layouts`): XLA:CPU's
layouts behind optimization barriers when true, plain dots that XLA lays out otherwise.
"""

from __future__ import annotations

import jax

from af_next_jax.attention.kernel_over_mesh import kernel_per_shard
from af_next_jax.attention.platform import AttentionChoice, resolve_kernel
from af_next_jax.attention.recompute import recompute_attention
from af_next_jax.attention.reference import xla_attention
from af_next_jax.attention.sequence_parallel import sequence_parallel_attention
from af_next_kernels import flash_attention as flash_module


def dot_product_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, *, causal: bool,
                          segment_ids_q_BxL=None, segment_ids_kv_BxS=None,
                          implementation: AttentionChoice | str = "xla", cpu_layouts: bool = False):
    """Attention over [batch, length, heads, head_dim] tensors; K/V may have fewer heads (GQA)."""
    if query_BxLxHxD.shape[2] % key_BxSxKxD.shape[2]:
        raise ValueError(f"query heads {query_BxLxHxD.shape[2]} must be a multiple of key/value heads "
                         f"{key_BxSxKxD.shape[2]}")
    if (segment_ids_q_BxL is None) != (segment_ids_kv_BxS is None):
        raise ValueError("pass both segment_ids_q_BxL and segment_ids_kv_BxS, or neither")
    choice = implementation if isinstance(implementation, AttentionChoice) else AttentionChoice(kernel=implementation)
    masks = dict(causal=causal, segment_ids_q_BxL=segment_ids_q_BxL, segment_ids_kv_BxS=segment_ids_kv_BxS)
    # Named so profiles (benchmarks/train_step_profile.py) can tell attention from the projections around it.
    with jax.named_scope("attention"):
        return _dispatch(choice, query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, masks, cpu_layouts)


def _dispatch(choice: AttentionChoice, query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, masks, cpu_layouts: bool):
    if choice.sequence_parallelism != "none":
        return sequence_parallel_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD,
                                           implementation=choice.sequence_parallelism,
                                           block_implementation=choice.kernel, **masks)
    if resolve_kernel(choice.kernel) == "pallas":
        return kernel_per_shard(flash_module.flash_attention, query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, **masks)
    if query_BxLxHxD.shape[1] == 1:  # one decoding step: no [L, S] residual to avoid, nothing differentiated
        return xla_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, **masks)
    return recompute_attention(query_BxLxHxD, key_BxSxKxD, value_BxSxKxD, cpu_layouts=cpu_layouts, **masks)
