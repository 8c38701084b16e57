"""Temp memory of a jitted attention forward+backward: the Pallas kernel vs the XLA path.

Exact and device-free: XLA's `memory_analysis()` of the compiled program (nothing is run). On a
CPU the Pallas kernel compiles in interpret mode, so this measures what the kernel's algorithm
keeps alive between blocks (O(N): q/k/v, out, lse, delta, transposed copies), not GPU SRAM use.

    python benchmarks/attention_memory.py [--lengths 4096 8192 16384]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from af_next_jax.attention.dispatch import dot_product_attention

BATCH, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 1, 4, 1, 128


def forward_backward(implementation):
    def loss(query, key, value):
        out = dot_product_attention(query, key, value, causal=True, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))


def temp_bytes(implementation, length, dtype=jnp.bfloat16):
    query = jax.ShapeDtypeStruct((BATCH, length, NUM_HEADS, HEAD_DIM), dtype)
    key = jax.ShapeDtypeStruct((BATCH, length, NUM_KV_HEADS, HEAD_DIM), dtype)
    compiled = jax.jit(forward_backward(implementation)).lower(query, key, key).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main():
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # the XLA:CPU flags and allocator settings the commands use, as measured
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    args = parser.parse_args()
    print(f"causal fwd+bwd, bf16, batch {BATCH}, {NUM_HEADS} heads / {NUM_KV_HEADS} KV head, head_dim {HEAD_DIM}; "
          f"jax {jax.__version__}, backend {jax.default_backend()}")
    print("| tokens | pallas temp (MiB) | xla temp (MiB) | xla / pallas |")
    print("|---:|---:|---:|---:|")
    for length in args.lengths:
        pallas, xla = temp_bytes("pallas", length), temp_bytes("xla", length)
        print(f"| {length} | {pallas / 2**20:.1f} | {xla / 2**20:.1f} | {xla / pallas:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
