"""Small building blocks shared by the encoder, projector and decoder, each with logical axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from af_next_jax.model import axes
from af_next_jax.model.contract import contract
from af_next_jax.model.numerics import Numerics

DEFAULT_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


class Dense(nn.Module):
    """y = x . kernel (+ bias), contracting the last `contract_dims` axes of x; float32 parameters.

    The kernel is created at its full shape ([*contracted, *features]) so its logical axes apply as
    named under a rules context (flax's DenseGeneral creates a flattened 2-D kernel first).
    `numerics` says how the matmul is differentiated (contract.py).
    """

    features: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    use_bias: bool
    dtype: jnp.dtype
    numerics: Numerics
    contract_dims: int = 1

    @nn.compact
    def __call__(self, x):
        contracted_shape = x.shape[x.ndim - self.contract_dims:]
        kernel = self.param("kernel", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, self.kernel_axes),
                            contracted_shape + self.features, jnp.float32)
        y = contract(x.astype(self.dtype), kernel.astype(self.dtype), self.contract_dims, numerics=self.numerics)
        if self.use_bias:
            bias_axes = self.kernel_axes[self.contract_dims:]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), bias_axes),
                              self.features, jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def dense(features, kernel_axes, *, use_bias, name, dtype, numerics: Numerics, axis=-1):
    """A `Dense` to `features` (an int or a tuple such as (heads, head_dim)), contracting `axis`
    (-1, or (-2, -1) to contract [heads, head_dim])."""
    features_tuple = features if isinstance(features, tuple) else (features,)
    contract_dims = len(axis) if isinstance(axis, tuple) else 1
    return Dense(features_tuple, tuple(kernel_axes), use_bias, dtype, numerics, contract_dims, name=name)


def layer_norm(*, epsilon, name, dtype, feature_axis):
    """LayerNorm with scale and bias (Whisper); statistics are reduced in float32."""
    return nn.LayerNorm(
        epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (feature_axis,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (feature_axis,)))


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale (transformers' op order)."""

    epsilon: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x_BxLxD):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (axes.EMBED,)),
                           (x_BxLxD.shape[-1],), jnp.float32)
        x32 = x_BxLxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (scale.astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


def gelu_exact(x):
    """erf GELU, as Whisper and the projector use (not the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


def swiglu(gate, up, *, numerics: Numerics):
    """silu(gate) * up, Qwen2's MLP activation; with `numerics.cpu_dense_backward` (CPU programs outside
    remat'd stacks) differentiated by `_swiglu_keeping_inputs`'s backward, otherwise by autodiff."""
    if numerics.cpu_dense_backward:
        return _swiglu_keeping_inputs(gate, up)
    return jax.nn.silu(gate) * up


@jax.custom_vjp
def _swiglu_keeping_inputs(gate, up):
    """silu(gate) * up with a backward that keeps only gate and up.

    Autodiff of `jax.nn.silu(gate) * up` keeps four [tokens, intermediate] tensors per layer (the
    sigmoid, its complement, silu and up), which the layer scan stacks for the backward pass; this
    saves the two inputs and recomputes the sigmoid. Same values: d up = dh silu(g), d gate =
    dh up s (1 + g (1 - s)) with s = sigmoid(g), the derivative autodiff takes."""
    return jax.nn.silu(gate) * up


def _swiglu_forward(gate, up):
    return _swiglu_keeping_inputs(gate, up), (gate, up)


def _swiglu_backward(residuals, dh):
    gate, up = residuals
    sigmoid = jax.nn.sigmoid(gate)
    dgate = dh * up * (sigmoid * (1 + gate * (1 - sigmoid)))
    return dgate, dh * (gate * sigmoid)


_swiglu_keeping_inputs.defvjp(_swiglu_forward, _swiglu_backward)


def remat_policy(name: str):
    """Map a config remat name to a jax.checkpoint policy; None = no remat."""
    policies = {
        "none": None,
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
    }
    return policies[name]


def stack_layers(layer_cls, *, num_layers: int, remat: str, scan: bool, name: str, numerics: Numerics,
                 in_axes=nn.broadcast, **layer_kwargs):
    """Build `num_layers` copies of a layer `(x, *args) -> (x, per_layer_output)`.

    Each layer gets `numerics.for_layer_stack(remat)` as its `numerics` (no hand-written Dense or
    SwiGLU backward under a remat policy: model/numerics.py), decided here, next to the remat itself.

    With `scan`, parameters are stacked on a leading `layers` axis and the body is compiled once, so
    compile time does not grow with depth. Remat wraps one layer (the per-layer policy).
    `in_axes` says, per argument after `x`, whether every layer sees it whole (`nn.broadcast`) or its
    own slice of a leading layers axis (`0`: the decoder's KV cache); the per-layer outputs come
    back stacked on a leading layers axis (None when the layer returns None).
    """
    layer_kwargs = dict(layer_kwargs, numerics=numerics.for_layer_stack(remat))
    policy = remat_policy(remat)
    body = layer_cls if remat == "none" else nn.remat(layer_cls, policy=policy, prevent_cse=not scan)
    if scan:
        scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=in_axes, length=num_layers,
                          metadata_params={nn.PARTITION_NAME: axes.LAYERS})
        return scanned(name=name, **layer_kwargs)
    return _UnrolledLayers(body=body, num_layers=num_layers, in_axes=in_axes,
                           layer_kwargs=tuple(layer_kwargs.items()), name=name)


class _UnrolledLayers(nn.Module):
    """Python loop over layers (`scan_layers=False`); used to measure what scan saves."""

    body: type
    num_layers: int
    layer_kwargs: tuple
    in_axes: object = nn.broadcast

    @nn.compact
    def __call__(self, x, *args):
        scanned = self.in_axes if isinstance(self.in_axes, tuple) else (self.in_axes,) * len(args)
        outputs = []
        for index in range(self.num_layers):
            layer_args = [jax.tree.map(lambda leaf: leaf[index], arg) if axis == 0 else arg
                          for arg, axis in zip(args, scanned)]
            x, output = self.body(name=f"layer_{index}", **dict(self.layer_kwargs))(x, *layer_args)
            outputs.append(output)
        return x, jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)
