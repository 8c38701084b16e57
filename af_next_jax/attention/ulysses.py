"""DeepSpeed-Ulysses: trade the sequence sharding for a head sharding with two all-to-alls.

Inside `shard_map`, each of the U devices of the ulysses axis holds [B, L/U, H, D]. One all-to-all
turns that into [B, L, H/U, D] (every token, a slice of heads), attention runs locally on whole
sequences, and the inverse all-to-all restores the sequence sharding. The all-to-all moves each
element once, (U-1)/U of the local tensor per device, independent of U: it scales where ring's
K/V traffic does not, but its degree is capped by the head count.

GQA: K/V have fewer heads. When they split over U the K/V all-to-all keeps GQA (less traffic than
Q); otherwise each K/V head is repeated the smallest number of times that makes the count a multiple
of U (mesh.kv_replication), which keeps head h paired with K/V head h // (H/K) on every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from af_next_jax.parallel.mesh import kv_replication


def sequence_to_heads(x_BxLxHxD, axis_name):
    """[B, L/U, H, D] -> [B, L, H/U, D]: gather the sequence, scatter the heads."""
    return jax.lax.all_to_all(x_BxLxHxD, axis_name, split_axis=2, concat_axis=1, tiled=True)


def heads_to_sequence(x_BxLxHxD, axis_name):
    """[B, L, H/U, D] -> [B, L/U, H, D]: inverse of sequence_to_heads."""
    return jax.lax.all_to_all(x_BxLxHxD, axis_name, split_axis=1, concat_axis=2, tiled=True)


def ulysses_attention(local_attention, axis_name, ulysses_degree, query_BxLxHxD, key_BxLxKxD, value_BxLxKxD,
                      segment_ids_q_BxL, segment_ids_kv_BxL):
    """Per-shard Ulysses around `local_attention(q, k, v, seg_q, seg_kv)` (call inside shard_map).

    `local_attention` sees whole (ring-local) sequences and H/U heads: a local flash attention, or
    ring attention over the other sequence axis in the hybrid.
    """
    if ulysses_degree == 1:
        return local_attention(query_BxLxHxD, key_BxLxKxD, value_BxLxKxD, segment_ids_q_BxL, segment_ids_kv_BxL)
    repeats = kv_replication(key_BxLxKxD.shape[2], ulysses_degree)
    if repeats > 1:
        key_BxLxKxD = jnp.repeat(key_BxLxKxD, repeats, axis=2)
        value_BxLxKxD = jnp.repeat(value_BxLxKxD, repeats, axis=2)
    query, key, value = (sequence_to_heads(x, axis_name) for x in (query_BxLxHxD, key_BxLxKxD, value_BxLxKxD))
    segment_ids_q = jax.lax.all_gather(segment_ids_q_BxL, axis_name, axis=1, tiled=True)
    segment_ids_kv = jax.lax.all_gather(segment_ids_kv_BxL, axis_name, axis=1, tiled=True)
    out = local_attention(query, key, value, segment_ids_q, segment_ids_kv)
    return heads_to_sequence(out, axis_name)
