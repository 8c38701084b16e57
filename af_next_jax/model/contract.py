"""The matmul of every Dense layer (and of the loss's lm_head): x [..., *contracted] . w [*contracted, *out].

With `Numerics.cpu_dense_backward` (CPU programs, outside remat'd stacks: model/numerics.py) it runs
as 2-D matmuls whose weight gradient is x^T dy, x transposed explicitly behind an optimization
barrier (`cpu_friendly_contract`): XLA:CPU runs autodiff's dots with several free dimensions and its
token-contracting ("TN") weight-gradient dot slowly. Otherwise one `dot_general` that autodiff
differentiates. Measurements: docs/PERFORMANCE.md, "Second pass: backward layouts for XLA:CPU".
"""

from __future__ import annotations

import functools
import math

import jax

from af_next_jax.model.numerics import Numerics


def contract(x, kernel, contract_dims: int = 1, preferred_element_type=None, *, numerics: Numerics):
    """x [..., *contracted] . kernel [*contracted, *features] -> [..., *features], differentiated as
    `numerics` says."""
    if numerics.cpu_dense_backward:
        return cpu_friendly_contract(x, kernel, contract_dims, preferred_element_type)
    return _dot_general(x, kernel, contract_dims, preferred_element_type)


def _dot_general(x, kernel, contract_dims, preferred_element_type):
    x_axes = tuple(range(x.ndim - contract_dims, x.ndim))
    return jax.lax.dot_general(x, kernel, ((x_axes, tuple(range(contract_dims))), ((), ())),
                               preferred_element_type=preferred_element_type)


def _as_matrix(x, leading_dims: int):
    """[*a, *b] -> [prod(a), prod(b)], split after the first `leading_dims` axes."""
    return x.reshape(math.prod(x.shape[:leading_dims]), math.prod(x.shape[leading_dims:]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def cpu_friendly_contract(x, kernel, contract_dims: int, preferred_element_type=None):
    """`contract` as [tokens, in] x [in, out] matmuls, with the backward described in the module docstring."""
    token_dims = x.ndim - contract_dims
    y_TxO = jax.lax.dot(_as_matrix(x, token_dims), _as_matrix(kernel, contract_dims),
                        preferred_element_type=preferred_element_type)
    return y_TxO.reshape(x.shape[:token_dims] + kernel.shape[contract_dims:])


def _cpu_friendly_forward(x, kernel, contract_dims, preferred_element_type):
    return cpu_friendly_contract(x, kernel, contract_dims, preferred_element_type), (x, kernel)


def _cpu_friendly_backward(contract_dims, preferred_element_type, residuals, dy):
    del preferred_element_type  # the cotangents take their primal's dtype, as autodiff's do
    x, kernel = residuals
    token_dims = x.ndim - contract_dims
    x_TxI, kernel_IxO, dy_TxO = _as_matrix(x, token_dims), _as_matrix(kernel, contract_dims), _as_matrix(dy, token_dims)
    dx_TxI = jax.lax.dot(dy_TxO, kernel_IxO.T.astype(dy.dtype))
    # Without the barrier XLA folds the transpose back into the dot: the slow TN layout again.
    x_IxT = jax.lax.optimization_barrier(x_TxI.T.astype(dy.dtype))
    dkernel_IxO = jax.lax.dot(x_IxT, dy_TxO)
    return dx_TxI.reshape(x.shape).astype(x.dtype), dkernel_IxO.reshape(kernel.shape).astype(kernel.dtype)


cpu_friendly_contract.defvjp(_cpu_friendly_forward, _cpu_friendly_backward)
