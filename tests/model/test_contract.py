"""model/contract.py and layers.swiglu under model/numerics.py's `Numerics`: both variants equal plain
autodiff of `dot_general` / silu(gate) * up in value and gradient, and the hand-written (custom VJP)
backward is traced only where the numerics ask for it: CPU programs, never inside a remat'd stack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af_next_jax.model.contract import contract
from af_next_jax.model.layers import swiglu
from af_next_jax.model.numerics import Numerics, numerics_for_platform

# (x shape, kernel shape, contracted dims): a projection, q_proj's [in] -> [heads, head_dim], o_proj's
# [heads, head_dim] -> [out].
CASES = [((2, 5, 8), (8, 6), 1), ((2, 5, 8), (8, 3, 4), 1), ((2, 5, 3, 4), (3, 4, 8), 2)]
VARIANTS = {"plain": Numerics(), "cpu": numerics_for_platform("cpu")}


def _pulled_back(f, inputs, cotangent):
    y, vjp = jax.vjp(f, *inputs)
    return (y,) + vjp(cotangent)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("x_shape,kernel_shape,contract_dims", CASES)
def test_contract_equals_dot_general_in_value_and_gradient(variant, x_shape, kernel_shape, contract_dims):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x, kernel = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], kernel_shape)
    out_shape = x_shape[:len(x_shape) - contract_dims] + kernel_shape[contract_dims:]
    cotangent = jax.random.normal(keys[2], out_shape)
    actual = _pulled_back(lambda a, b: contract(a, b, contract_dims, numerics=VARIANTS[variant]), (x, kernel),
                          cotangent)
    expected = _pulled_back(lambda a, b: jnp.tensordot(a, b, axes=contract_dims), (x, kernel), cotangent)
    for name, a, e in zip(("y", "dx", "dkernel"), actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, err_msg=f"{variant} {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_swiglu_equals_autodiff_of_silu_times_up_in_value_and_gradient(variant):
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    gate, up, cotangent = (3 * jax.random.normal(key, (2, 7, 16)) for key in keys)
    actual = _pulled_back(lambda g, u: swiglu(g, u, numerics=VARIANTS[variant]), (gate, up), cotangent)
    expected = _pulled_back(lambda g, u: jax.nn.silu(g) * u, (gate, up), cotangent)
    for name, a, e in zip(("h", "dgate", "dup"), actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, err_msg=f"{variant} {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bfloat16_inputs_with_float32_accumulation_keep_each_dtype(variant):
    x = jnp.ones((2, 4, 8), jnp.bfloat16)
    kernel = jnp.ones((8, 16), jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: contract(a, b, 1, jnp.float32, numerics=VARIANTS[variant]), x, kernel)
    dx, dkernel = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dkernel, np.float32), np.full((8, 16), 8.0))  # 2 x 4 tokens


def _primitives(f, *args):
    """The primitives `f` traces to now (a fresh function each time: make_jaxpr caches by function)."""
    return {equation.primitive.name for equation in jax.make_jaxpr(lambda *a: f(*a))(*args).jaxpr.eqns}


# Which numerics trace the hand-written backward: only the CPU's, and not what a remat'd layer stack runs.
CUSTOM_BACKWARD = {
    "cpu": (numerics_for_platform("cpu"), True),
    "cpu, stack without remat": (numerics_for_platform("cpu").for_layer_stack("none"), True),
    "cpu, stack under remat dots": (numerics_for_platform("cpu").for_layer_stack("dots"), False),
    "cpu, stack under remat full": (numerics_for_platform("cpu").for_layer_stack("full"), False),
    "tpu": (numerics_for_platform("tpu"), False),
    "gpu": (numerics_for_platform("gpu"), False),
    "default": (Numerics(), False),
}


@pytest.mark.parametrize("numerics_name", list(CUSTOM_BACKWARD))
@pytest.mark.parametrize("function", ["contract", "swiglu"])
def test_only_cpu_numerics_outside_remat_trace_the_custom_backward(function, numerics_name):
    numerics, custom = CUSTOM_BACKWARD[numerics_name]
    if function == "contract":
        traced = _primitives(lambda a, b: contract(a, b, numerics=numerics), jnp.ones((2, 5, 8)), jnp.ones((8, 6)))
    else:
        traced = _primitives(lambda g, u: swiglu(g, u, numerics=numerics), jnp.ones((2, 8)), jnp.ones((2, 8)))
    assert ("custom_vjp_call" in traced) == custom, traced


def test_a_remat_policy_keeps_the_attention_layouts():
    """Under remat only the Dense/SwiGLU custom VJPs go (they would hide their dots from the policy);
    the attention's backward is its own custom VJP either way, so its CPU layout stays."""
    stacked = numerics_for_platform("cpu").for_layer_stack("full")
    assert stacked == Numerics(cpu_dense_backward=False, cpu_attention_layouts=True)


def test_numerics_for_platform_names_the_valid_platforms():
    assert numerics_for_platform("cpu") == Numerics(cpu_dense_backward=True, cpu_attention_layouts=True)
    with pytest.raises(ValueError, match=r"\('cpu', 'gpu', 'tpu'\).*'cuda'"):
        numerics_for_platform("cuda")
