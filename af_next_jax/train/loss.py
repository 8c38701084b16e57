"""Next-token cross-entropy on the loss mask, computed in chunks so full float32 logits never exist.

At 128K tokens x a 152K vocabulary, float32 logits would be 80 GB. Instead the final hidden states
are cut into `num_chunks` groups of tokens; each group is multiplied by the lm_head, reduced to
(loss, correct) per token and dropped. `jax.checkpoint` around the chunk makes the backward pass
recompute that chunk's logits instead of keeping them, so peak memory is one chunk of
[B, L / num_chunks, V] float32 logits.

Chunks take *strided* tokens (chunk j holds positions j, j + n, j + 2n, ...): the sequence axis
may be sharded over devices (sequence parallelism), and a strided chunk is spread over every shard
so each device works on its own tokens in every chunk (a contiguous chunk would live on one
device). The loss is a sum over tokens, so the order does not matter.

Under sequence parallelism the lm_head is sharded on its hidden dimension over the same devices that
hold the chunk's tokens. Left to itself XLA then builds a collective matmul per chunk that rotates
float32 logit blocks around the whole sequence group, so the bytes each chip moves grow with the
group (docs/SCALING.md, "Sequence parallelism"). So the lm_head is gathered once, in `compute_dtype`,
before the chunks (one [D, V] copy per chip, whatever the chip count), and every chunk's hidden states
and logits are pinned to the tokens' own batch and sequence shards: each chip computes the logits of
its own tokens only (tests/train/test_loss_sharded.py: libtpu then moves the same bytes for 4 chunks
as for 16; XLA:CPU still reduces the lm_head's gradient once per chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from af_next_jax.model import axes
from af_next_jax.model.axes import constrain
from af_next_jax.model.contract import contract
from af_next_jax.model.numerics import Numerics


def largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, max(1, limit)) + 1) if n % d == 0)


def first_argmax(logits_BxCxV):
    """`jnp.argmax` over the last axis (the first id of the largest logit: what greedy decoding emits, so a
    tie counts as correct only for the first tied id), as a max and a min reduction: XLA:CPU runs
    argmax's (value, index) pair reduction as a scalar loop, ~10x slower than these two."""
    vocab = logits_BxCxV.shape[-1]
    is_max_BxCxV = logits_BxCxV == logits_BxCxV.max(axis=-1, keepdims=True)
    ids_V = jax.lax.broadcasted_iota(jnp.int32, logits_BxCxV.shape, logits_BxCxV.ndim - 1)
    return jnp.min(jnp.where(is_max_BxCxV, ids_V, vocab), axis=-1)


def chunked_cross_entropy(hidden_BxLxD, lm_head_DxV, target_ids_BxL, loss_mask_BxL, *, chunk_length: int,
                          compute_dtype=jnp.float32, numerics: Numerics = Numerics()):
    """Sums over masked tokens: (cross-entropy, correct argmax predictions, trained tokens).

    `chunk_length` bounds the tokens per row in one chunk (the largest divisor of L not above it is
    used). The logits of a chunk are computed in `compute_dtype` with float32 accumulation; the
    log-sum-exp is in float32. The lm_head matmul is differentiated as `numerics` says (the model's:
    model/contract.py).
    """
    batch, length, width = hidden_BxLxD.shape
    tokens_per_chunk = largest_divisor_at_most(length, chunk_length)
    num_chunks = length // tokens_per_chunk
    lm_head_DxV = constrain(lm_head_DxV.astype(compute_dtype), (None, axes.ACT_VOCAB))

    def strided(x_BxL_):  # [B, L, ...] -> [n, B, L / n, ...]; chunk j holds positions j, j + n, ...
        x = x_BxL_.reshape((batch, tokens_per_chunk, num_chunks) + x_BxL_.shape[2:])
        return jnp.moveaxis(x, 2, 0)

    @jax.checkpoint
    def chunk_sums(hidden_BxCxD, target_BxC, mask_BxC):
        hidden_BxCxD = constrain(hidden_BxCxD, (axes.BATCH, axes.LENGTH, axes.ACT_EMBED))
        logits_BxCxV = contract(hidden_BxCxD.astype(compute_dtype), lm_head_DxV, preferred_element_type=jnp.float32,
                                numerics=numerics)
        logits_BxCxV = constrain(logits_BxCxV, (axes.BATCH, axes.LENGTH, axes.ACT_VOCAB))
        log_normaliser_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        target_logit_BxC = jnp.take_along_axis(logits_BxCxV, target_BxC[..., None], axis=-1)[..., 0]
        loss = jnp.sum((log_normaliser_BxC - target_logit_BxC) * mask_BxC)
        correct = jnp.sum((first_argmax(logits_BxCxV) == target_BxC) * mask_BxC)
        return loss, correct

    def body(totals, chunk):
        loss, correct = chunk_sums(*chunk)
        return (totals[0] + loss, totals[1] + correct), None

    mask_BxL = loss_mask_BxL.astype(jnp.float32)
    with jax.named_scope("cross_entropy"):  # what profiles (benchmarks/train_step_profile.py) call the loss
        chunks = (strided(hidden_BxLxD), strided(target_ids_BxL), strided(mask_BxL))
        zero = jnp.zeros((), jnp.float32)
        (loss_sum, correct_sum), _ = jax.lax.scan(body, (zero, zero), chunks)
    return loss_sum, jax.lax.stop_gradient(correct_sum), jnp.sum(mask_BxL)


def reference_cross_entropy(logits_BxLxV, target_ids_BxL, loss_mask_BxL):
    """The same sums from materialised logits: the test reference for `chunked_cross_entropy`."""
    log_probs = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    nll_BxL = -jnp.take_along_axis(log_probs, target_ids_BxL[..., None], axis=-1)[..., 0]
    mask = loss_mask_BxL.astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits_BxLxV, axis=-1) == target_ids_BxL) * mask)
    return jnp.sum(nll_BxL * mask), correct, jnp.sum(mask)
