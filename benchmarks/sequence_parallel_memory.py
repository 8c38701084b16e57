"""Per-device temp memory of one decoder layer's forward+backward: 64K tokens on 8 devices vs 8K on one.

    python benchmarks/sequence_parallel_memory.py [--tokens-per-device 8192]

Compiles (never runs) `grad` of one Qwen2-style decoder layer (RMSNorm, q/k/v projections with GQA,
attention, o_proj, SwiGLU MLP; float32) and reads `memory_analysis().temp_size_in_bytes`, which for an
SPMD program is per device. Sequence-parallel rows put 8 x tokens-per-device tokens on 8 fake CPU
devices; the baselines put tokens-per-device tokens on one device, once with the same chunked local
attention (block_attention.local_flash_attention: the fair comparison) and once with XLA's
materialised-scores attention. Target: sequence-parallel temp <= 1.5 x the chunked single-device temp.
Layer widths are small (CPU compile time) but the attention memory terms scale as in the real model.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from af_next_jax.model.attention import xla_attention  # noqa: E402
from af_next_jax.parallel import MeshConfig, make_mesh  # noqa: E402
from af_next_jax.parallel.block_attention import local_flash_attention, select_block_forward  # noqa: E402
from af_next_jax.parallel.sequence_attention import sequence_parallel_attention  # noqa: E402

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 256, 8, 2, 32, 512
SETUPS = {"ring": MeshConfig(data=1, fsdp=1, ring=8), "ulysses": MeshConfig(data=1, fsdp=1, ulysses=8),
          "hybrid": MeshConfig(data=1, fsdp=1, ring=2, ulysses=4)}


def layer_params():
    shapes = {"q": (HIDDEN, HEADS * HEAD_DIM), "k": (HIDDEN, KV_HEADS * HEAD_DIM), "v": (HIDDEN, KV_HEADS * HEAD_DIM),
              "o": (HEADS * HEAD_DIM, HIDDEN), "gate": (HIDDEN, MLP), "up": (HIDDEN, MLP), "down": (MLP, HIDDEN)}
    return {name: jax.ShapeDtypeStruct(shape, jnp.float32) for name, shape in shapes.items()}


def decoder_layer(params, x_BxLxD, attention):
    def rms_norm(x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    batch, length, _ = x_BxLxD.shape
    h = rms_norm(x_BxLxD)
    query = (h @ params["q"]).reshape(batch, length, HEADS, HEAD_DIM)
    key = (h @ params["k"]).reshape(batch, length, KV_HEADS, HEAD_DIM)
    value = (h @ params["v"]).reshape(batch, length, KV_HEADS, HEAD_DIM)
    x_BxLxD = x_BxLxD + attention(query, key, value).reshape(batch, length, -1) @ params["o"]
    h = rms_norm(x_BxLxD)
    return x_BxLxD + (jax.nn.silu(h @ params["gate"]) * (h @ params["up"])) @ params["down"]


def temp_bytes(attention, tokens, mesh=None):
    x = jax.ShapeDtypeStruct((1, tokens, HIDDEN), jnp.float32)
    loss = lambda p, x: jnp.sum(decoder_layer(p, x, attention))  # noqa: E731
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    if mesh is not None:
        x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(None, ("ring", "ulysses"))))
    return step.lower(layer_params(), x).compile().memory_analysis().temp_size_in_bytes


def chunked_local_attention(q, k, v):
    """Causal attention on one device in key blocks (never the [L, L] scores): the fair baseline."""
    ones = jnp.ones(q.shape[:2], jnp.int32)
    return local_flash_attention(q, k, v, ones, ones, True, select_block_forward("xla"))


def sequence_parallel_temp_bytes(implementation: str, mesh_config: MeshConfig, total_tokens: int) -> int:
    """Per-device temp bytes of the layer's fwd+bwd with `total_tokens` split over the mesh's sequence axes."""
    mesh = make_mesh(mesh_config)
    with jax.set_mesh(mesh):
        def attention(q, k, v):
            return sequence_parallel_attention(q, k, v, implementation=implementation, causal=True)
        # Inputs are taken as already zigzag-ordered: the permutation happens once per model, not per layer.
        return temp_bytes(attention, total_tokens, mesh)


def main():
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
