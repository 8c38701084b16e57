"""Platform-specific numerics, passed explicitly into the model (as MaxText injects its dot_general).

XLA:CPU runs the dots that autodiff emits for a backward pass in slow layouts, so a program compiled
for the CPU differentiates three things by hand: Dense's matmul and the loss's lm_head (contract.py),
SwiGLU (layers.swiglu) and the "xla" attention kernel (attention/recompute.py). Everything else (TPU
and GPU programs, and the default `Numerics()`) is plain autodiff and lets XLA choose the layouts.
Why, with measurements: docs/PERFORMANCE.md, "Second pass: backward layouts for XLA:CPU".

The program builder decides once, from the devices it compiles for:
`AFNextModel(config, numerics=numerics_for_platform(platform))`.
"""

from __future__ import annotations

import dataclasses

PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Which hand-written CPU backward passes the model runs (all off: plain autodiff everywhere)."""

    # Dense / lm_head matmuls as 2-D matmuls with an x^T dy weight gradient, and SwiGLU's backward
    # that keeps only its inputs. Both are custom VJPs, so `for_layer_stack` turns them off under remat.
    cpu_dense_backward: bool = False
    # The "xla" attention kernel's backward on the transposed scores, behind optimization barriers.
    # Inside its own custom VJP whatever this says, so remat policies see the same attention either way.
    cpu_attention_layouts: bool = False

    def for_layer_stack(self, remat_policy: str) -> Numerics:
        """What the layers of a stack under `remat_policy` run: a custom VJP hides its dots from
        jax.checkpoint's policies ("dots" would recompute them instead of saving them), so under any
        policy but "none" the Dense and SwiGLU backward passes are plain autodiff."""
        if remat_policy == "none":
            return self
        return dataclasses.replace(self, cpu_dense_backward=False)


def numerics_for_platform(platform: str) -> Numerics:
    """The numerics of a program compiled for `platform` ("cpu" | "gpu" | "tpu": the mesh devices'
    platform, never the host's): the CPU backward passes on the CPU, plain autodiff elsewhere."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS} (the platform of the devices compiled for), "
                         f"got {platform!r}")
    on_cpu = platform == "cpu"
    return Numerics(cpu_dense_backward=on_cpu, cpu_attention_layouts=on_cpu)
