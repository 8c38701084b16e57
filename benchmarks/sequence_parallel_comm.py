"""Collective bytes per attention step (forward + backward) from compiled HLO vs the analytic volume.

    python benchmarks/sequence_parallel_comm.py [--length 8192]

Compiles `vjp` of ring (ring 8), Ulysses (ulysses 8) and hybrid (ring 2 x ulysses 4) attention on 8
fake CPU devices and sums the result sizes of every collective in the per-device HLO module, next to
the analytic volume (af_next_jax/parallel/compiled_cost.py: `collective_bytes_per_device`,
`analytic_bytes`, which derives the formula).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

from af_next_jax.process_setup import configure_cli_process  # noqa: E402

from af_next_jax.parallel.compiled_cost import SETUPS, analytic_bytes, collective_bytes_per_device  # noqa: E402


def main():
    configure_cli_process()  # as the commands do: the XLA:CPU flags the tables were measured with
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
        measured = collective_bytes_per_device(implementation, mesh_config, **dims)
        expected = analytic_bytes(implementation, mesh_config, **dims)
        kinds = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in measured.items() if v)
        total = sum(measured.values())
        print(f"| {implementation} | ring {mesh_config.ring} x ulysses {mesh_config.ulysses} | {kinds} | "
              f"{total / 2**20:.2f} | {expected / 2**20:.2f} | {total / expected:.3f} |")


if __name__ == "__main__":
    main()
