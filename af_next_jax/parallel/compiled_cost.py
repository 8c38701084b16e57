"""What ring, Ulysses and hybrid attention cost per device, read from compiled programs (never run).

Two measurements, on the mesh's fake or real devices (8 fake CPU devices: set
XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX starts):

  memory   `sequence_parallel_temp_bytes`: `memory_analysis().temp_size_in_bytes` of `grad` of one
           Qwen2-style decoder layer (RMSNorm, q/k/v projections with GQA, attention, o_proj, SwiGLU
           MLP; float32), which for an SPMD program is per device. `temp_bytes` of the same layer on
           one device with `chunked_local_attention` is the fair baseline (never the [L, L] scores).
           Layer widths are small (CPU compile time) but the attention memory terms scale as in the
           real model.
  traffic  `collective_bytes_per_device`: the result bytes of every collective (collective-permute,
           all-to-all, all-gather, all-reduce, reduce-scatter) in the per-device HLO of attention's
           forward + backward, next to `analytic_bytes`, the volume the algorithms should move. Each
           collective counts its *result* buffer (for an all-to-all the wire traffic is (P-1)/P of
           it). The ring's steps are a loop (attention/ring.py): every collective is counted as many
           times as one run executes it (af_next_jax/compile/hlo_counts.py, loops by trip count).

benchmarks/sequence_parallel_memory.py and benchmarks/sequence_parallel_comm.py print the tables of
docs/PERFORMANCE.md from these; notebooks/sequence_parallelism.ipynb sweeps them over the length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from af_next_jax.attention.block_kernels import select_block_kernel
from af_next_jax.compile import hlo_counts
from af_next_jax.compile.report import COLLECTIVES
from af_next_jax.attention.sequence_parallel import local_flash_attention, sequence_parallel_attention
from af_next_jax.parallel.mesh import SEQUENCE_AXES, MeshConfig, kv_replication, make_mesh

# The three strategies on 8 devices, as the benchmarks and the notebook compare them.
SETUPS = {"ring": MeshConfig(data=1, fsdp=1, ring=8), "ulysses": MeshConfig(data=1, fsdp=1, ulysses=8),
          "hybrid": MeshConfig(data=1, fsdp=1, ring=2, ulysses=4)}
# The measured decoder layer's widths.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP = 256, 8, 2, 32, 512



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


def temp_bytes(attention, tokens: int, mesh=None) -> int:
    """Per-device temp bytes of the layer's fwd+bwd on `tokens` tokens (split over the mesh's sequence axes)."""
    x = jax.ShapeDtypeStruct((1, tokens, HIDDEN), jnp.float32)
    loss = lambda p, x: jnp.sum(decoder_layer(p, x, attention))  # noqa: E731
    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    if mesh is not None:
        x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(None, SEQUENCE_AXES)))
    return step.lower(layer_params(), x).compile().memory_analysis().temp_size_in_bytes


def chunked_local_attention(q, k, v):
    """Causal attention on one device in key blocks (never the [L, L] scores): the fair baseline."""
    ones = jnp.ones(q.shape[:2], jnp.int32)
    return local_flash_attention(q, k, v, ones, ones, True, select_block_kernel("xla"))


def sequence_parallel_temp_bytes(implementation: str, mesh_config: MeshConfig, total_tokens: int) -> int:
    """Per-device temp bytes of the layer's fwd+bwd with `total_tokens` split over the mesh's sequence axes."""
    mesh = make_mesh(mesh_config)
    with jax.set_mesh(mesh):
        def attention(q, k, v):
            return sequence_parallel_attention(q, k, v, implementation=implementation, causal=True)
        # Inputs are taken as already zigzag-ordered: the permutation happens once per model, not per layer.
        return temp_bytes(attention, total_tokens, mesh)


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Result bytes of each collective kind in one run of an HLO module (loop bodies x trip count)."""
    counted = hlo_counts.count(hlo_text).collective_bytes
    return {kind: int(counted.get(kind, 0)) for kind in COLLECTIVES}


def analytic_bytes(implementation, mesh_config, batch, length, heads, kv_heads, head_dim, itemsize=4):
    """Per-device result bytes of the collectives of one forward + backward.

    Ring over R with n = L/R local tokens: R-1 shifts of (K, V, kv segment ids) in the forward, R-2
    more in the backward (its K/V tour repeats the forward's: the first shift, of the rank's own block,
    is the same operation in both and XLA merges the two; the later ones run in loops and are sent
    again) and R shifts of the float32 (dK, dV) accumulators.
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
        total += (2 * ring - 3) * (kv_block + segments) + ring * grad_block
    return total


def collective_bytes_per_device(implementation, mesh_config, batch, length, heads, kv_heads, head_dim) -> dict[str, int]:
    """`collective_bytes` of the compiled vjp of causal, packed attention (float32) with that strategy."""
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
