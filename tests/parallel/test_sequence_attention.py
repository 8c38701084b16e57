"""Ring, Ulysses and hybrid attention equal the single-device reference (attention/reference.py).

Reference: `xla_attention` on the whole sequence, natural token order. Checked: the output and
dQ/dK/dV (float32, <= 1e-5 relative to the largest entry), with a causal mask, packed segment ids
and GQA, on several mesh shapes of 8 fake CPU devices. Ring and hybrid get their inputs in the zigzag
layout (as the model passes them) and their outputs are un-permuted before comparing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af_next_jax.attention.reference import xla_attention
from af_next_jax.parallel import MeshConfig, from_load_balanced, make_mesh, to_load_balanced
from af_next_jax.attention.blockwise import attention_delta, block_backward, block_forward
from af_next_jax.attention.sequence_parallel import sequence_parallel_attention

TOLERANCE = 1e-5


def packed_segment_ids(batch, length, seed):
    """Rows of 1..3 packed examples plus trailing padding (segment 0), as the data pipeline packs them."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, length), size=3, replace=False))
        row = np.zeros(length, np.int32)
        for segment, (start, stop) in enumerate(zip([0, *cuts[:2]], cuts), start=1):
            row[start:stop] = segment
        rows.append(row)
    return jnp.asarray(np.stack(rows))


def random_inputs(batch, length, heads, kv_heads, head_dim, seed=0):
    """Host-side (numpy) random q, k, v and output cotangent: no eager device ops to compile."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, heads, head_dim), (batch, length, kv_heads, head_dim),
              (batch, length, kv_heads, head_dim), (batch, length, heads, head_dim)]
    return tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in shapes)


@jax.jit(static_argnums=0)
def output_and_grads(attention, query, key, value, dout):
    out, vjp = jax.vjp(attention, query, key, value)
    return (out, *vjp(dout))


def assert_close(actual, expected, name):
    error = float(jnp.abs(actual - expected).max() / jnp.abs(expected).max())
    assert error <= TOLERANCE, f"{name}: relative error {error:.2e} > {TOLERANCE}"


MESHES = [
    # (implementation, mesh, batch, heads, kv_heads, causal)
    ("ring", MeshConfig(data=2, fsdp=1, ring=4), 2, 4, 2, True),
    ("ring", MeshConfig(data=4, fsdp=1, ring=2), 4, 4, 1, False),
    ("ulysses", MeshConfig(data=1, fsdp=2, ulysses=4), 2, 8, 4, True),      # K/V heads split: GQA kept
    ("ulysses", MeshConfig(data=1, fsdp=1, ulysses=8), 1, 8, 2, True),      # K/V heads replicated x4
    ("hybrid", MeshConfig(data=1, fsdp=1, ring=2, ulysses=2, tensor=2), 1, 8, 2, True),
    ("hybrid", MeshConfig(data=1, fsdp=1, ring=4, ulysses=2), 1, 4, 2, True),
]


@pytest.mark.parametrize("implementation,mesh_config,batch,heads,kv_heads,causal", MESHES,
                         ids=[f"{m[0]}-r{m[1].ring}u{m[1].ulysses}t{m[1].tensor}-K{m[4]}-{'causal' if m[5] else 'full'}"
                              for m in MESHES])
def test_sequence_parallel_attention_matches_single_device_reference(implementation, mesh_config, batch, heads,
                                                                      kv_heads, causal):
    length, head_dim = 64, 8
    query, key, value, dout = random_inputs(batch, length, heads, kv_heads, head_dim)
    segment_ids = packed_segment_ids(batch, length, seed=1)

    def reference(q, k, v):
        return xla_attention(q, k, v, causal=causal, segment_ids_q_BxL=segment_ids, segment_ids_kv_BxS=segment_ids)

    expected = output_and_grads(reference, query, key, value, dout)
    balanced = implementation in ("ring", "hybrid")
    mesh = make_mesh(mesh_config)
    with jax.set_mesh(mesh):
        permute = to_load_balanced if balanced else (lambda x: x)
        unpermute = from_load_balanced if balanced else (lambda x: x)

        def sharded(q, k, v):
            out = sequence_parallel_attention(
                permute(q), permute(k), permute(v), implementation=implementation, causal=causal,
                segment_ids_q_BxL=permute(segment_ids), segment_ids_kv_BxS=permute(segment_ids))
            return unpermute(out)

        actual = output_and_grads(sharded, query, key, value, dout)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, name)


def test_block_forward_and_backward_match_reference_with_offsets_and_chunks():
    """The plain-JAX block (kernel fallback) with a kv offset and several key chunks equals xla_attention."""
    query, key, value, dout = random_inputs(2, 32, 4, 2, 8, seed=3)
    segment_ids = packed_segment_ids(2, 32, seed=4)
    # Queries 16..31 against keys 0..31: the bottom half of the causal square, via q_offset.
    q_part, seg_q = query[:, 16:], segment_ids[:, 16:]

    def reference(q, k, v):
        full_q = jnp.concatenate([query[:, :16], q], axis=1)
        return xla_attention(full_q, k, v, causal=True, segment_ids_q_BxL=segment_ids,
                             segment_ids_kv_BxS=segment_ids)[:, 16:]

    expected_out, *expected_grads = output_and_grads(reference, q_part, key, value, dout[:, 16:])

    @jax.jit
    def block_output_and_grads(q, k, v, do):
        out, lse = block_forward(q, k, v, causal=True, segment_ids_q_BxL=seg_q, segment_ids_kv_BxS=segment_ids,
                                 q_offset=16, kv_offset=0, kv_chunk=8)
        return out, block_backward(q, k, v, do, lse, attention_delta(out, do), causal=True,
                                   segment_ids_q_BxL=seg_q, segment_ids_kv_BxS=segment_ids, q_offset=16, kv_chunk=8)

    out, grads = block_output_and_grads(q_part, key, value, dout[:, 16:])
    assert_close(out, expected_out, "out")
    for name, a, e in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(a, e, name)


def test_fully_masked_rows_are_finite():
    """A query whose segment id matches no key gets a finite output and finite gradients, never NaN."""
    query, key, value, dout = random_inputs(1, 64, 4, 2, 8, seed=5)
    segment_ids_q = jnp.full((1, 64), 7, jnp.int32)
    segment_ids_kv = jnp.ones((1, 64), jnp.int32)
    with jax.set_mesh(make_mesh(MeshConfig(data=4, fsdp=1, ring=2))):
        def sharded(q, k, v):
            return sequence_parallel_attention(q, k, v, implementation="ring", causal=True,
                                               segment_ids_q_BxL=to_load_balanced(segment_ids_q),
                                               segment_ids_kv_BxS=to_load_balanced(segment_ids_kv))
        results = output_and_grads(sharded, query, key, value, dout)
    for result in results:
        assert bool(jnp.isfinite(result).all())


def test_ring_without_a_mesh_raises_an_actionable_error():
    query, key, value, _ = random_inputs(1, 16, 2, 1, 8)
    with pytest.raises(ValueError, match="jax.set_mesh"):
        sequence_parallel_attention(query, key, value, implementation="ring", causal=True)


def test_ring_implementation_on_a_ulysses_mesh_is_rejected():
    query, key, value, _ = random_inputs(1, 16, 4, 2, 8)
    with jax.set_mesh(make_mesh(MeshConfig(data=1, fsdp=2, ulysses=4))):
        with pytest.raises(ValueError, match="hybrid"):
            sequence_parallel_attention(query, key, value, implementation="ring", causal=True)


PALLAS_RINGS = [(MeshConfig(data=2, fsdp=1, ring=4), 2, True), (MeshConfig(data=4, fsdp=1, ring=2), 4, False)]


# The kernel runs in the Pallas interpreter on the CPU: under 10 s per case on 2 cores, so CI runs it.
@pytest.mark.parametrize("mesh_config,batch,causal", PALLAS_RINGS,
                         ids=[f"r{m.ring}-{'causal' if c else 'full'}" for m, _, c in PALLAS_RINGS])
def test_ring_with_pallas_kernel_blocks_matches_reference(monkeypatch, mesh_config, batch, causal):
    """The Pallas flash kernel (interpret mode on the CPU) as the ring's block forward."""
    from af_next_kernels import flash_attention as kernel_module

    calls = []
    kernel = kernel_module.flash_attention

    def counted_kernel(*args, **kwargs):
        calls.append(kwargs.get("causal"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kernel_module, "flash_attention", counted_kernel)
    query, key, value, dout = random_inputs(batch, 64, 4, 2, 8, seed=6)
    segment_ids = packed_segment_ids(batch, 64, seed=7)

    def reference(q, k, v):
        return xla_attention(q, k, v, causal=causal, segment_ids_q_BxL=segment_ids, segment_ids_kv_BxS=segment_ids)

    expected = output_and_grads(reference, query, key, value, dout)
    with jax.set_mesh(make_mesh(mesh_config)):
        def sharded(q, k, v):
            out = sequence_parallel_attention(
                to_load_balanced(q), to_load_balanced(k), to_load_balanced(v), implementation="ring", causal=causal,
                segment_ids_q_BxL=to_load_balanced(segment_ids), segment_ids_kv_BxS=to_load_balanced(segment_ids),
                block_implementation="pallas")
            return from_load_balanced(out)
        actual = output_and_grads(sharded, query, key, value, dout)
    assert calls, "the ring never called the Pallas kernel"
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, name)
