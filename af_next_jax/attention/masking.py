"""The one masking convention every attention path honours (reference, blockwise, Pallas kernels).

Which keys a query sees: query i sees key j iff
  * causal: `q_offset + i >= kv_offset + j` (offsets place a block inside a longer sequence), and
  * segments: `segment_ids_q[i] == segment_ids_kv[j]` (packed examples; the encoder passes 1 for
    every query and the key's validity, 1 or 0, for keys).

A fully masked row, a query that sees no key at all (every query of an encoder padding window),
gets output 0, log-sum-exp EMPTY_ROW_LSE, and zero gradients, in every implementation.
Why 0 and not the uniform average that a finite mask value gives a plain softmax: 0 is what a
blockwise or ring computation produces without any special case (no key contributes), so the
partial results of disjoint key blocks merge exactly (`blockwise.merge_partials`) and a row empty
in one block but not in another gets no spurious weight. Nothing downstream reads such rows.

EMPTY_ROW_LSE is finite on purpose: `logaddexp(EMPTY_ROW_LSE, x) == x` and two empty parts merge to
EMPTY_ROW_LSE again, where -inf would give NaN (inf - inf) in the merge weights. MASK_SCORE, the
score a masked entry gets before the softmax, equals it, so a row whose running maximum is still
MASK_SCORE after the last key has seen nothing. Real scores (|s| <= |q||k|/sqrt(d)) never come near.
"""

from __future__ import annotations

import jax.numpy as jnp

EMPTY_ROW_LSE = -1e30
MASK_SCORE = -1e30


def visible_BxLxS(q_len: int, kv_len: int, *, causal: bool, segment_ids_q_BxL=None, segment_ids_kv_BxS=None,
                  q_offset=0, kv_offset=0):
    """[B or 1, L, S] bool: which (query, key) pairs are visible under the convention above."""
    visible = jnp.ones((1, q_len, kv_len), dtype=bool)
    if causal:
        q_positions_L = q_offset + jnp.arange(q_len)
        kv_positions_S = kv_offset + jnp.arange(kv_len)
        visible = visible & (q_positions_L[:, None] >= kv_positions_S[None, :])[None]
    if segment_ids_q_BxL is not None:
        visible = visible & (segment_ids_q_BxL[:, :, None] == segment_ids_kv_BxS[:, None, :])
    return visible


def is_empty_row(running_max):
    """True where a row's running maximum score is still MASK_SCORE: it has seen no visible key."""
    return running_max <= MASK_SCORE


def finish_softmax(running_max, running_sum):
    """(1 / sum, lse) per row from the online-softmax state; empty rows get (0, EMPTY_ROW_LSE), so
    `accumulator * scale` is 0 for them and the convention above holds without a special case."""
    empty = is_empty_row(running_max)
    safe_sum = jnp.where(empty, 1.0, running_sum)
    scale = jnp.where(empty, 0.0, 1.0 / safe_sum)
    return scale, jnp.where(empty, EMPTY_ROW_LSE, running_max + jnp.log(safe_sum))


def backward_lse(lse):
    """The lse a backward pass exponentiates against: +inf for empty rows, so exp(s - lse) is 0 there
    (their gradient is zero) instead of exp(MASK_SCORE - EMPTY_ROW_LSE) = 1."""
    return jnp.where(lse <= 0.5 * EMPTY_ROW_LSE, jnp.inf, lse)


def online_softmax_update(max_R, sum_R, acc_RxD, scores_RxC, probs_times_values, *, rows_as_columns=False):
    """One key block of the online softmax (flash attention's forward recurrence), written once.

    Rows are the leading axes, keys the last axis of `scores_RxC` (masked entries already MASK_SCORE).
    State: running max and sum per row, accumulator sum_j exp(s_j - max) v_j. Start from
    (MASK_SCORE, 0, 0): while a row has seen only masked scores its probabilities are exp(0) = 1, which
    the first visible score rescales by exp(MASK_SCORE - real) = 0, and a row that never sees one is
    found empty by `finish_softmax`. `rows_as_columns`: the row state is [..., R, 1] (TPU kernels keep
    rows as columns so every broadcast is native) instead of [..., R].
    `probs_times_values(probs_RxC) -> [..., R, D]` is the block's P @ V in the caller's layout.
    """
    expand = (lambda x: x) if rows_as_columns else (lambda x: x[..., None])
    new_max_R = jnp.maximum(max_R, scores_RxC.max(axis=-1, keepdims=rows_as_columns))
    probs_RxC = jnp.exp(scores_RxC - expand(new_max_R))
    rescale_R = jnp.exp(max_R - new_max_R)
    sum_R = sum_R * rescale_R + probs_RxC.sum(axis=-1, keepdims=rows_as_columns)
    acc_RxD = acc_RxD * expand(rescale_R) + probs_times_values(probs_RxC)
    return new_max_R, sum_R, acc_RxD
