"""The model's dispatch point gives the same attention with implementation="pallas" as with "xla"."""

import jax
import jax.numpy as jnp
import numpy as np

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.attention.dispatch import dot_product_attention
from af_next_jax.model.synthetic import synthetic_batch


def _inputs(seed, batch, length, num_heads, num_kv_heads, head_dim):
    keys = jax.random.split(jax.random.key(seed), 4)
    query = jax.random.normal(keys[0], (batch, length, num_heads, head_dim))
    key = jax.random.normal(keys[1], (batch, length, num_kv_heads, head_dim))
    value = jax.random.normal(keys[2], (batch, length, num_kv_heads, head_dim))
    return query, key, value, jax.random.normal(keys[3], query.shape)


def _out_and_grads(implementation, query, key, value, dout, **mask):
    attention = lambda q, k, v: dot_product_attention(q, k, v, implementation=implementation, **mask)
    out, vjp = jax.vjp(attention, query, key, value)
    return (out, *vjp(dout))


FAST_COMPILE = {"xla_backend_optimization_level": 0}  # compile time dominates these tests


def _assert_same(pallas, xla):
    for name, a, b in zip(("out", "dq", "dk", "dv"), pallas, xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


def test_decoder_like_causal_packed_gqa_matches_xla():
    query, key, value, dout = _inputs(0, 2, 40, 4, 2, 64)
    segments = jnp.asarray([[1] * 13 + [2] * 20 + [0] * 7, [1] * 40], jnp.int32)  # 0: padding tokens
    mask = dict(causal=True, segment_ids_q_BxL=segments, segment_ids_kv_BxS=segments)
    _assert_same(jax.jit(lambda *a: _out_and_grads("pallas", *a, **mask), compiler_options=FAST_COMPILE)(
        query, key, value, dout), jax.jit(lambda *a: _out_and_grads("xla", *a, **mask))(query, key, value, dout))


def test_encoder_like_key_validity_with_a_fully_padded_window_matches_xla():
    # Window 0 has 30 valid frames of 40, window 1 none. Both give the empty window zeros (the one
    # masking convention, tests/attention/test_fully_masked_rows.py checks it in every path); nothing
    # reads it, so its cotangent is 0 and only window 0's outputs are compared.
    query, key, value, dout = _inputs(1, 2, 40, 4, 4, 64)
    validity = jnp.asarray([[1] * 30 + [0] * 10, [0] * 40], jnp.int32)
    dout = dout.at[1].set(0.0)
    mask = dict(causal=False, segment_ids_q_BxL=jnp.ones_like(validity), segment_ids_kv_BxS=validity)
    pallas = jax.jit(lambda *a: _out_and_grads("pallas", *a, **mask), compiler_options=FAST_COMPILE)(
        query, key, value, dout)
    xla = jax.jit(lambda *a: _out_and_grads("xla", *a, **mask))(query, key, value, dout)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in pallas)
    np.testing.assert_array_equal(np.asarray(pallas[0][1]), 0.0)
    _assert_same((pallas[0][:1], *pallas[1:]), (xla[0][:1], *xla[1:]))


def test_tiny_model_logits_with_pallas_attention_match_xla():
    # Two real windows and two padding windows (num_windows=4): the encoder sees fully masked rows.
    config = tiny()
    batch = synthetic_batch(config, audio_frames_per_example=[[700], []], seq_len=256, num_windows=4)
    params = jax.jit(AFNextModel(config).init, compiler_options=FAST_COMPILE)(jax.random.key(0), batch)
    xla = jax.jit(AFNextModel(config).apply, compiler_options=FAST_COMPILE)(params, batch)
    pallas = jax.jit(AFNextModel(config.replace(attention_kernel="pallas")).apply,
                     compiler_options=FAST_COMPILE)(params, batch)
    np.testing.assert_allclose(np.asarray(pallas), np.asarray(xla), rtol=1e-4, atol=1e-4)
