"""Small inputs shared by the attention tests (host-side numpy: no eager device ops to compile)."""

import jax
import jax.numpy as jnp
import numpy as np


def random_inputs(batch, length, heads, kv_heads, head_dim, seed=0):
    """q, k, v and an output cotangent, float32."""
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, heads, head_dim), (batch, length, kv_heads, head_dim),
              (batch, length, kv_heads, head_dim), (batch, length, heads, head_dim)]
    return tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for shape in shapes)


def output_and_grads(attention, query, key, value, dout):
    out, vjp = jax.vjp(attention, query, key, value)
    return (out, *vjp(dout))


def assert_close(actual, expected, name, tolerance=1e-5):
    error = float(jnp.abs(actual - expected).max() / jnp.abs(expected).max())
    assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance}"
