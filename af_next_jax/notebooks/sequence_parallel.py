"""Measurements of notebooks/sequence_parallelism.ipynb: ring vs Ulysses vs hybrid on 8 fake CPU devices.

Everything is read from compiled programs (never run), by af_next_jax/parallel/compiled_cost.py (the
functions the two benchmarks/sequence_parallel_*.py scripts print tables from): per-device temp memory
of one decoder layer's forward+backward, and per-device collective bytes of attention's
forward+backward next to their analytic volume. This module adds the analytic memory model and the
sweeps over length. Import it after setting XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from __future__ import annotations

from af_next_jax.attention.blockwise import DEFAULT_KV_CHUNK
from af_next_jax.parallel import compiled_cost as cost
from af_next_jax.parallel.mesh import kv_replication

SETUPS = cost.SETUPS
DEVICES = 8
FLOAT32 = 4
# The key chunk's score-shaped buffers live at once (scores, probabilities; dS in the backward).
SCORE_BUFFERS = 3


def analytic_temp_bytes(implementation: str, total_tokens: int) -> int:
    """A per-device model of the decoder layer's fwd+bwd temp memory (float32), n = L / 8 tokens:

    - activations the backward keeps, per token: the two RMSNorm outputs and the residual after
      attention (3 D), q and the attention output (2 H Dh), k and v (2 K Dh), the logsumexp (H), and the
      MLP's gate, up and their product (3 MLP);
    - blockwise attention's score-shaped buffers: SCORE_BUFFERS x [n, H, kv chunk];
    - ring: two K/V blocks in flight and the dK/dV accumulators (2 + 1) x 2 n K Dh;
    - Ulysses: the head-sharded copies of q, o (2 n H Dh) and of k, v with their K heads replicated to
      K' >= the Ulysses degree (2 n K' Dh), and the same again for their gradients.
    """
    mesh_config = SETUPS[implementation]
    tokens = total_tokens // DEVICES
    hidden, heads, kv_heads, head_dim, mlp = cost.HIDDEN, cost.HEADS, cost.KV_HEADS, cost.HEAD_DIM, cost.MLP
    per_token = 3 * hidden + 2 * heads * head_dim + 2 * kv_heads * head_dim + heads + 3 * mlp
    chunk = min(DEFAULT_KV_CHUNK, tokens * mesh_config.ulysses)
    per_token += SCORE_BUFFERS * heads * chunk
    if mesh_config.ring > 1:
        per_token += 3 * 2 * kv_heads * head_dim
    if mesh_config.ulysses > 1:
        replicated = kv_heads * kv_replication(kv_heads, mesh_config.ulysses)
        # After the all-to-all a device holds n U tokens of H / U heads: as many elements as before.
        per_token += 2 * (2 * heads * head_dim + 2 * replicated * head_dim)
    return FLOAT32 * tokens * per_token


def memory_sweep(total_lengths: list[int]) -> list[dict]:
    """Measured and analytic per-device temp bytes for each setup and total length."""
    rows = []
    for total in total_lengths:
        for implementation, mesh_config in SETUPS.items():
            rows.append({"implementation": implementation, "tokens": total,
                         "measured": cost.sequence_parallel_temp_bytes(implementation, mesh_config, total),
                         "analytic": analytic_temp_bytes(implementation, total)})
        rows.append({"implementation": "1 device, L/8 tokens", "tokens": total,
                     "measured": cost.temp_bytes(cost.chunked_local_attention, total // DEVICES), "analytic": None})
    return rows


def communication_sweep(total_lengths: list[int], heads: int = 8, kv_heads: int = 2, head_dim: int = 64) -> list[dict]:
    """Collective bytes per device (by kind) from the compiled HLO, next to the analytic volume."""
    rows = []
    for total in total_lengths:
        dims = dict(batch=1, length=total, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
        for implementation, mesh_config in SETUPS.items():
            measured = cost.collective_bytes_per_device(implementation, mesh_config, **dims)
            rows.append({"implementation": implementation, "tokens": total, "by_kind": measured,
                         "measured": sum(measured.values()),
                         "analytic": cost.analytic_bytes(implementation, mesh_config, **dims)})
    return rows
