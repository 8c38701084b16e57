"""Ring and Ulysses with the Pallas block kernel run the kernel's backward, and match the reference.

Reference: `xla_attention` on the whole sequence (float32, <= 1e-5 relative to the largest entry),
output and dQ/dK/dV, causal with packed segment ids and GQA. The Pallas kernels run in the Pallas
interpreter on the CPU. Both kernel entry points are wrapped to prove the ring called them.
"""

import jax
import numpy as np
import pytest

from af_next_jax.attention.reference import xla_attention
from af_next_jax.attention.sequence_parallel import sequence_parallel_attention
from af_next_jax.parallel import MeshConfig, from_load_balanced, make_mesh, to_load_balanced
from af_next_kernels import flash_attention as kernel_module
from tests.attention.helpers import assert_close, output_and_grads, random_inputs


STRATEGIES = {"ring": MeshConfig(data=2, fsdp=1, ring=4), "ulysses": MeshConfig(data=2, fsdp=1, ulysses=4)}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_pallas_blocks_use_the_pallas_backward_and_match_reference(monkeypatch, strategy):
    calls = {"forward": 0, "backward": 0}
    forward, backward = kernel_module.flash_attention, kernel_module.flash_attention_backward

    def counted_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        calls["backward"] += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "flash_attention", counted_forward)
    monkeypatch.setattr(kernel_module, "flash_attention_backward", counted_backward)
    query, key, value, dout = random_inputs(2, 64, 4, 2, 8, seed=21)
    segment_ids = np.repeat(np.asarray([[1] * 20 + [2] * 30 + [0] * 14]), 2, axis=0)

    def reference(q, k, v):
        return xla_attention(q, k, v, causal=True, segment_ids_q_BxL=segment_ids, segment_ids_kv_BxS=segment_ids)

    expected = jax.jit(lambda *a: output_and_grads(reference, *a))(query, key, value, dout)
    with jax.set_mesh(make_mesh(STRATEGIES[strategy])):
        def sequence_parallel(q, k, v):
            # The ring's causal mask needs the zigzag layout; Ulysses (ring degree 1) takes any order.
            balanced_ids = to_load_balanced(segment_ids)
            return from_load_balanced(sequence_parallel_attention(
                to_load_balanced(q), to_load_balanced(k), to_load_balanced(v), implementation=strategy, causal=True,
                segment_ids_q_BxL=balanced_ids, segment_ids_kv_BxS=balanced_ids, block_implementation="pallas"))

        actual = jax.jit(lambda *a: output_and_grads(sequence_parallel, *a))(query, key, value, dout)
    assert calls["forward"] > 0, f"{strategy} never called the Pallas forward kernel"
    assert calls["backward"] > 0, f"{strategy}'s backward did not run the Pallas backward kernel"
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, name)
