"""model/contract.py: the CPU layout of Dense's matmul equals `dot_general` in value and gradient, and
only the CPU gets it and swiglu's custom backward (TPU/GPU programs and remat'd stacks: plain autodiff)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af_next_jax.model import contract as contract_module
from af_next_jax.model.contract import contract, cpu_friendly_contract, dense_layout_for_remat
from af_next_jax.model.layers import swiglu

# (x shape, kernel shape, contracted dims): a projection, q_proj's [in] -> [heads, head_dim], o_proj's
# [heads, head_dim] -> [out].
CASES = [((2, 5, 8), (8, 6), 1), ((2, 5, 8), (8, 3, 4), 1), ((2, 5, 3, 4), (3, 4, 8), 2)]


def _dot_general(x, kernel, contract_dims):
    return jnp.tensordot(x, kernel, axes=contract_dims)


@pytest.mark.parametrize("x_shape,kernel_shape,contract_dims", CASES)
def test_cpu_layout_equals_dot_general_in_value_and_gradient(x_shape, kernel_shape, contract_dims):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x, kernel = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], kernel_shape)
    out_shape = x_shape[:len(x_shape) - contract_dims] + kernel_shape[contract_dims:]
    cotangent = jax.random.normal(keys[2], out_shape)

    def pulled_back(f):
        y, vjp = jax.vjp(lambda a, b: f(a, b, contract_dims), x, kernel)
        return (y,) + vjp(cotangent)

    for actual, expected in zip(pulled_back(cpu_friendly_contract), pulled_back(_dot_general)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_with_float32_accumulation_keep_each_dtype():
    x = jnp.ones((2, 4, 8), jnp.bfloat16)
    kernel = jnp.ones((8, 16), jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: cpu_friendly_contract(a, b, 1, jnp.float32), x, kernel)
    dx, dkernel = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dkernel, np.float32), np.full((8, 16), 8.0))  # 2 x 4 tokens


def _primitives(f, *args):
    """The primitives `f` traces to now (a fresh function each time: make_jaxpr caches by function)."""
    return {equation.primitive.name for equation in jax.make_jaxpr(lambda *a: f(*a))(*args).jaxpr.eqns}


@pytest.mark.parametrize("function", ["contract", "swiglu"])
def test_only_the_cpu_without_remat_gets_the_custom_backward(function, monkeypatch):
    f = {"contract": contract, "swiglu": swiglu}[function]
    x, y = (jnp.ones((2, 5, 8)), jnp.ones((8, 6))) if function == "contract" else (jnp.ones((2, 8)),) * 2
    assert "custom_vjp_call" in _primitives(f, x, y)
    with dense_layout_for_remat("dots"):  # a remat policy must see the plain computation
        assert "custom_vjp_call" not in _primitives(f, x, y)
    monkeypatch.setattr(contract_module, "target_platform", lambda: "tpu")
    assert "custom_vjp_call" not in _primitives(f, x, y)
