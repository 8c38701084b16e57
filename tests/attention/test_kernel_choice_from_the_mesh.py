"""The "auto" kernel is decided for the platform compiled for (the mesh's devices), not the host's.

Lowering only, from this CPU host: under an abstract TPU v5p mesh "auto" lowers to the Mosaic
kernel (tpu_custom_call), under an abstract H100 mesh to the Triton kernel, and with the CPU's own
devices to plain XLA. (Compiling the TPU program needs libtpu, which this environment does not
install; the lowering is where the kernel is chosen.)
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from af_next_jax.attention.dispatch import dot_product_attention
from af_next_jax.attention.platform import AttentionChoice, resolve_kernel, target_platform


def _attention_forward_and_backward(query, key, value, segment_ids):
    def attention(q, k, v):
        return dot_product_attention(q, k, v, causal=True, segment_ids_q_BxL=segment_ids,
                                     segment_ids_kv_BxS=segment_ids, implementation="auto")
    out, vjp = jax.vjp(attention, query, key, value)
    return out, vjp(out)


def _shapes():
    query = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
    key = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    return query, key, key, jax.ShapeDtypeStruct((1, 256), jnp.int32)


def _lowered_text(device, platform):
    with use_abstract_mesh(AbstractMesh((1,), ("data",), abstract_device=device)):
        assert target_platform() == {"cuda": "gpu"}.get(platform, platform)
        return jax.jit(_attention_forward_and_backward).trace(*_shapes()).lower(
            lowering_platforms=(platform,)).as_text()


def test_auto_kernel_lowers_to_mosaic_for_a_tpu_mesh_on_a_cpu_host():
    text = _lowered_text(AbstractDevice(device_kind="TPU v5p", num_cores=2, platform="tpu"), "tpu")
    assert text.count("tpu_custom_call") == 3  # forward, dQ, dK/dV


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
def test_auto_kernel_lowers_to_triton_for_a_gpu_mesh():
    text = _lowered_text(AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"),
                         "cuda")
    assert text.count("__gpu$xla.gpu.triton") == 3


def test_auto_kernel_is_xla_on_the_cpu():
    assert resolve_kernel("auto") == "xla" and resolve_kernel("auto", "tpu") == "pallas"
    text = jax.jit(_attention_forward_and_backward).trace(*_shapes()).lower().as_text()
    assert "tpu_custom_call" not in text and "triton" not in text and "pallas" not in text


def test_sequence_parallelism_and_kernel_are_separate_choices():
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        AttentionChoice(kernel="ring")
    with pytest.raises(ValueError, match="sequence_parallelism must be one of"):
        AttentionChoice(sequence_parallelism="xla")
