"""The kernels lower for real accelerators from this CPU-only machine.

Lowering only: it checks the Pallas -> Triton IR and Pallas -> Mosaic MLIR conversions (block shapes,
supported primitives, index maps). The Triton -> PTX compile and Mosaic's layout passes run inside
the accelerator's own compiler and are not exercised here.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from af_next_kernels.flash_attention import flash_attention


def _forward_and_backward(backend):
    def run(query, key, value, segment_ids):
        attention = lambda q, k, v: flash_attention(
            q, k, v, causal=True, segment_ids_q_BxL=segment_ids, segment_ids_kv_BxS=segment_ids,
            q_offset=3, backend=backend, interpret=False)
        out, vjp = jax.vjp(attention, query, key, value)
        return out, vjp(out)
    return run


def _shapes(length=1000, num_heads=8, num_kv_heads=2, head_dim=128, dtype=jnp.bfloat16):
    query = jax.ShapeDtypeStruct((1, length, num_heads, head_dim), dtype)
    key = jax.ShapeDtypeStruct((1, length, num_kv_heads, head_dim), dtype)
    return query, key, key, jax.ShapeDtypeStruct((1, length), jnp.int32)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_gpu_kernels_lower_to_triton_for_an_h100():
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
    with use_abstract_mesh(AbstractMesh((1,), ("data",), abstract_device=h100)):
        lowered = jax.jit(_forward_and_backward("gpu")).trace(*_shapes()).lower(lowering_platforms=("cuda",))
    # forward, dQ, dK/dV
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3


@pytest.mark.parametrize("head_dim", [64, 128])
def test_tpu_kernels_lower_to_mosaic_for_a_v5p(head_dim):
    v5p = AbstractDevice(device_kind="TPU v5p", num_cores=2, platform="tpu")
    with use_abstract_mesh(AbstractMesh((1,), ("data",), abstract_device=v5p)):
        lowered = jax.jit(_forward_and_backward("tpu")).trace(*_shapes(head_dim=head_dim)).lower(
            lowering_platforms=("tpu",))
    assert lowered.as_text().count("tpu_custom_call") == 3
