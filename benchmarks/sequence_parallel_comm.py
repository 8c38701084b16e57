"""Collective bytes per attention step (forward + backward) from compiled HLO vs the analytic volume.

    python benchmarks/sequence_parallel_comm.py [--length 8192]

Compiles `vjp` of ring (ring 8), Ulysses (ulysses 8) and hybrid (ring 2 x ulysses 4) attention on 8
fake CPU devices, sums the result sizes of every collective in the per-device HLO module
(collective-permute, all-to-all, all-gather, all-reduce, reduce-scatter), and compares with the
formula below. Bytes are per device and count each collective's *result* buffer (for an all-to-all
the wire traffic is (P-1)/P of it). The ring loop is unrolled in ring.py, so no collective is hidden
inside a while loop.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from af_next_jax.parallel import MeshConfig, make_mesh  # noqa: E402
from af_next_jax.parallel.mesh import kv_replication  # noqa: E402
from af_next_jax.parallel.sequence_attention import sequence_parallel_attention  # noqa: E402

COLLECTIVES = ("collective-permute", "all-to-all", "all-gather", "all-reduce", "reduce-scatter")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
SETUPS = {"ring": MeshConfig(data=1, fsdp=1, ring=8), "ulysses": MeshConfig(data=1, fsdp=1, ulysses=8),
          "hybrid": MeshConfig(data=1, fsdp=1, ring=2, ulysses=4)}


def _shape_bytes(type_text: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", type_text):
        if dtype in DTYPE_BYTES:
            size = 1
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            total += size * DTYPE_BYTES[dtype]
    return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Result bytes of each collective kind in an HLO module (async *-start ops counted once)."""
    totals = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\(", line)
        if not match:
            continue
        type_text, op = match.groups()
        kind = op[:-len("-start")] if op.endswith("-start") else op
        if kind in totals and not op.endswith("-done"):
            if op.endswith("-start"):  # (operands, results, ...) tuple: take the results half
                type_text = type_text.split("}, ", 1)[-1] if "}, " in type_text else type_text
            totals[kind] += _shape_bytes(type_text)
    return totals


def analytic_bytes(implementation, mesh_config, batch, length, heads, kv_heads, head_dim, itemsize=4):
    """Per-device result bytes of the collectives of one forward + backward (see module docstring).

    Ring over R with n = L/R local tokens: R-1 shifts of (K, V, kv segment ids) and R shifts of the
    float32 (dK, dV) accumulators. The backward's K/V tour repeats the forward's exactly and XLA CSEs
    it when both are in one jit (as in a train step); across a remat boundary it would run twice.
    Ulysses over U: four all-to-alls each way (Q, K, V in, O out; dO in, dQ, dK, dV out), each the
    size of the local tensor, K/V with replicated heads; plus two all-gathers of segment ids.
    Hybrid: Ulysses on L/(R U) local tokens, then the ring on L/R tokens with H/U heads.
    """
    ring, ulysses = mesh_config.ring, mesh_config.ulysses
    local = length // (ring * ulysses)
    kv_heads_after = kv_heads * kv_replication(kv_heads, ulysses) if ulysses > 1 else kv_heads
    total = 0
    if ulysses > 1:
        q_bytes = batch * local * heads * head_dim * itemsize
        kv_bytes = batch * local * kv_heads_after * head_dim * itemsize
        total += 2 * (2 * q_bytes + 2 * kv_bytes) + 2 * batch * local * ulysses * 4
    if ring > 1:
        ring_tokens = local * ulysses
        kv_block = 2 * batch * ring_tokens * (kv_heads_after // ulysses) * head_dim * itemsize
        segments = batch * ring_tokens * 4
        grad_block = 2 * batch * ring_tokens * (kv_heads_after // ulysses) * head_dim * 4
        total += (ring - 1) * (kv_block + segments) + ring * grad_block
    return total


def measure(implementation, mesh_config, batch, length, heads, kv_heads, head_dim):
    shape_q, shape_kv = (batch, length, heads, head_dim), (batch, length, kv_heads, head_dim)
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in (shape_q, shape_kv, shape_kv, shape_q)]
    segments = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    with jax.set_mesh(make_mesh(mesh_config)):
        def step(query, key, value, dout, segment_ids):
            attend = lambda q, k, v: sequence_parallel_attention(  # noqa: E731
                q, k, v, implementation=implementation, causal=True, segment_ids_q_BxL=segment_ids,
                segment_ids_kv_BxS=segment_ids)
            out, vjp = jax.vjp(attend, query, key, value)
            return out, vjp(dout)
        compiled = jax.jit(step).lower(*args, segments).compile()
    return collective_bytes(compiled.as_text())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    dims = dict(batch=1, length=args.length, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    print(f"Collective bytes per device, attention fwd+bwd, float32, B=1 L={args.length} H={args.heads} "
          f"K={args.kv_heads} D={args.head_dim}, 8 devices")
    print("| implementation | mesh | HLO collective bytes (by kind) | HLO total MiB | analytic MiB | ratio |")
    print("|---|---|---|---|---|---|")
    for implementation, mesh_config in SETUPS.items():
        measured = measure(implementation, mesh_config, **dims)
        expected = analytic_bytes(implementation, mesh_config, **dims)
        kinds = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in measured.items() if v)
        total = sum(measured.values())
        print(f"| {implementation} | ring {mesh_config.ring} x ulysses {mesh_config.ulysses} | {kinds} | "
              f"{total / 2**20:.2f} | {expected / 2**20:.2f} | {total / expected:.3f} |")


if __name__ == "__main__":
    main()
