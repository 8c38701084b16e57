"""The chunked loss under sequence parallelism moves a fixed amount per device, whatever the chunks.

Compiled by libtpu for v5p-16 (8 chips; nothing runs), as the 7B stages are: XLA:CPU reduces the
lm_head's gradient once per chunk where libtpu's pipeline reduces it once.

Tokens split over the sequence axes and the lm_head split on its hidden dimension over the same devices
(as FSDP over the sequence axes shards it): left alone, XLA computes each chunk's logits as a collective
matmul that moves float32 logit blocks between the devices, once per chunk. The loss gathers the lm_head
once and pins each chunk to its tokens' shards (train/loss.py), so its collectives are the lm_head's
gather and its gradient's reduction: the same bytes for 4 chunks as for 16.
"""

import flax.linen as nn
import jax
import pytest
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from af_next_jax.compile import hlo_counts
from af_next_jax.compile.topology import parse_topology, topology_devices
from af_next_jax.parallel import MeshConfig, make_mesh
from af_next_jax.parallel.mesh import SEQUENCE_AXES
from af_next_jax.parallel.rules import logical_axis_rules
from af_next_jax.train.loss import chunked_cross_entropy

B, L, D, V = 2, 256, 64, 1024
MESH = MeshConfig(data=1, fsdp=2, ring=2, ulysses=2)


def loss_collective_bytes(chunk_length: int) -> dict[str, float]:
    try:
        devices = topology_devices(parse_topology("v5p-16"))
    except Exception as error:  # noqa: BLE001 -- libtpu missing or unable to build the topology
        pytest.skip(f"libtpu cannot build a TPU topology here ({error}); `pip install -e \".[tpu]\"`")
    mesh = make_mesh(MESH, devices)
    rules = logical_axis_rules(MESH)
    hidden = jax.ShapeDtypeStruct((B, L, D), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", SEQUENCE_AXES)))
    lm_head = jax.ShapeDtypeStruct((D, V), jnp.float32, sharding=NamedSharding(mesh, P(("fsdp",) + SEQUENCE_AXES)))
    text = jax.ShapeDtypeStruct((B, L), jnp.int32, sharding=NamedSharding(mesh, P("fsdp", SEQUENCE_AXES)))
    mask = jax.ShapeDtypeStruct((B, L), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", SEQUENCE_AXES)))

    def loss(hidden, lm_head, targets, mask):
        return chunked_cross_entropy(hidden, lm_head, targets, mask, chunk_length=chunk_length,
                                     compute_dtype=jnp.bfloat16)[0]

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, lm_head, text, mask).compile()
    return hlo_counts.count(compiled.as_text()).collective_bytes


def test_loss_collectives_do_not_grow_with_the_chunks():
    few, many = loss_collective_bytes(L // 4), loss_collective_bytes(L // 16)
    lm_head_bf16 = D * V * 2
    assert sum(many.values()) <= sum(few.values()) * 1.05, (few, many)
    # The gather of the bf16 lm_head and the reduction of its gradient, a few small sums besides.
    assert sum(many.values()) <= 4 * lm_head_bf16, many
