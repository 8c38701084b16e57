"""The matmul of every Dense layer (and of the loss's lm_head): x [..., *contracted] . w [*contracted, *out].

On XLA:CPU it runs as 2-D matmuls with a hand-written backward (`cpu_friendly_contract`); everywhere
else, and under a remat policy, as one `dot_general` that autodiff differentiates (`contract`).

Why the CPU needs its own layout (benchmarks/train_step_profile.py, docs/PERFORMANCE.md "Backward
layouts"): XLA:CPU runs a dot with several free dimensions ([B, L, D] . [D, F]) slower than the same dot
on [B*L, D]; and autodiff's weight gradient contracts the token axes of x and dy, their major axes (a
"TN" dot), which it runs slowly and for which it fuses a transposing copy of the larger operand into
that operand's producer (the MLP's [tokens, intermediate] gradient). Here every product is a
[tokens, in] x [in, out] style matmul and the weight gradient is x^T dy with x transposed explicitly,
behind an optimization barrier so that XLA cannot fold the transpose back into the dot. Train step of
benchmarks/train_step.py (tiny preset, 2-core CPU), old and new alternating in one process: Dense layers
0.89-0.90x the wall time, the loss's lm_head 0.85x, both 0.78-0.80x.

A custom VJP hides its dot from jax.checkpoint's policies ("dots" would recompute it instead of saving
it), so layer stacks under a remat policy are traced inside `dense_layout_for_remat(policy)`, which
turns the CPU layout off there: every remat policy sees the same dots on every platform. The same
switch (`cpu_backward_layouts`) gates `layers.swiglu`'s custom VJP.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import jax

from af_next_jax.attention.platform import target_platform

_REMAT_POLICY_ACTIVE = contextvars.ContextVar("remat_policy_active", default=False)


@contextlib.contextmanager
def dense_layout_for_remat(remat: str):
    """Trace a layer stack inside this: under a remat policy (anything but "none") `contract` is plain
    autodiff, so the policy sees its dots."""
    token = _REMAT_POLICY_ACTIVE.set(remat != "none")
    try:
        yield
    finally:
        _REMAT_POLICY_ACTIVE.reset(token)


def cpu_backward_layouts() -> bool:
    """Whether the hand-written CPU backward passes apply here (this module's and `layers.swiglu`'s): the
    program is compiled for the CPU (`target_platform()`, never the host's) and no remat policy is
    being traced. Everything else (TPU and GPU programs, remat'd stacks) is plain autodiff."""
    return target_platform() == "cpu" and not _REMAT_POLICY_ACTIVE.get()


def contract(x, kernel, contract_dims: int = 1, preferred_element_type=None):
    """x [..., *contracted] . kernel [*contracted, *features] -> [..., *features], in the layout that
    is fastest on the platform being compiled for."""
    if cpu_backward_layouts():
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
    """`contract` as 2-D matmuls with the backward described in the module docstring."""
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
    x_IxT = jax.lax.optimization_barrier(x_TxI.T.astype(dy.dtype))
    dkernel_IxO = jax.lax.dot(x_IxT, dy_TxO)
    return dx_TxI.reshape(x.shape).astype(x.dtype), dkernel_IxO.reshape(kernel.shape).astype(kernel.dtype)


cpu_friendly_contract.defvjp(_cpu_friendly_forward, _cpu_friendly_backward)
