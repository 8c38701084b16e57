"""Per-device temp memory of one decoder layer's forward+backward: 64K tokens on 8 devices vs 8K on one.

    python benchmarks/sequence_parallel_memory.py [--tokens-per-device 8192]

Compiles (never runs) `grad` of one Qwen2-style decoder layer and reads its per-device temp bytes
(af_next_jax/parallel/compiled_cost.py says how). Sequence-parallel rows put 8 x tokens-per-device
tokens on 8 fake CPU devices; the baselines put tokens-per-device tokens on one device, once with the
same chunked local attention (`chunked_local_attention`: the fair comparison) and once with XLA's
materialised-scores attention. Target: sequence-parallel temp <= 1.5 x the chunked single-device temp.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

from af_next_jax.process_setup import configure_cli_process  # noqa: E402

from af_next_jax.attention.reference import xla_attention  # noqa: E402
from af_next_jax.parallel.compiled_cost import (HEAD_DIM, HEADS, HIDDEN, KV_HEADS, MLP, SETUPS,  # noqa: E402
                                                chunked_local_attention, sequence_parallel_temp_bytes, temp_bytes)


def main():
    configure_cli_process()  # as the commands do: the XLA:CPU flags the tables were measured with
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens-per-device", type=int, default=8192)
    args = parser.parse_args()
    local = args.tokens_per_device
    chunked = temp_bytes(chunked_local_attention, local)
    materialised = temp_bytes(lambda q, k, v: xla_attention(q, k, v, causal=True), local)
    print(f"One decoder layer fwd+bwd, float32, hidden {HIDDEN}, {HEADS} heads / {KV_HEADS} KV heads x {HEAD_DIM}, "
          f"MLP {MLP}; CPU, 8 fake devices, temp_size_in_bytes per device")
    print("| setup | tokens (total) | devices | temp MiB per device | vs 1 device chunked |")
    print("|---|---:|---:|---:|---:|")
    print(f"| 1 device, chunked local attention | {local} | 1 | {chunked / 2**20:.1f} | 1.00x |")
    print(f"| 1 device, XLA attention (scores materialised) | {local} | 1 | {materialised / 2**20:.1f} | "
          f"{materialised / chunked:.2f}x |")
    for implementation, mesh_config in SETUPS.items():
        sharded = sequence_parallel_temp_bytes(implementation, mesh_config, 8 * local)
        print(f"| {implementation} (ring {mesh_config.ring} x ulysses {mesh_config.ulysses}) | {8 * local} | 8 | "
              f"{sharded / 2**20:.1f} | {sharded / chunked:.2f}x |")


if __name__ == "__main__":
    main()
