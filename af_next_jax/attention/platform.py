"""The (kernel, sequence-parallel strategy) pair, and the platform it is decided for.

Two independent choices (config: `attention_kernel`, `sequence_parallelism`):
  kernel     how one device computes attention on its block:
               xla     plain JAX (reference.py / blockwise.py): runs everywhere, the reference
               pallas  the fused flash kernels of `kernels/` (Triton on GPU, Mosaic on TPU,
                       the Pallas interpreter when the target is the CPU)
               auto    pallas when compiling for a GPU or TPU, xla for the CPU
  strategy   how the sequence is split over the mesh: none | ring | ulysses | hybrid
             (sequence_parallel.py). The encoder (1500-token windows) always uses `none`.

"auto" is resolved for the platform being compiled for: the devices of the ambient mesh (a concrete
mesh or an abstract one, e.g. a TPU topology compiled on a CPU host), and only without a mesh the
default device, where an unsharded jit runs. Never `jax.default_backend()` of the host.
"""

from __future__ import annotations

import dataclasses

import jax

from af_next_jax.config import ATTENTION_KERNELS as KERNELS, SEQUENCE_PARALLELISM

_PLATFORM_NAMES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """What to run: a kernel and a sequence-parallel strategy, chosen apart."""

    kernel: str = "auto"
    sequence_parallelism: str = "none"

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"attention kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.sequence_parallelism not in SEQUENCE_PARALLELISM:
            raise ValueError(f"sequence_parallelism must be one of {SEQUENCE_PARALLELISM}, "
                             f"got {self.sequence_parallelism!r}")


def target_platform() -> str:
    """"cpu" | "gpu" | "tpu": the platform of the ambient mesh's devices, else of the default device."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    platform = device.platform if device is not None else jax.devices()[0].platform
    if platform not in _PLATFORM_NAMES:
        raise ValueError(f"attention has no kernel for platform {platform!r}; known: {sorted(_PLATFORM_NAMES)}")
    return _PLATFORM_NAMES[platform]


def resolve_kernel(kernel: str, platform: str | None = None) -> str:
    """"xla" or "pallas" for `kernel` on `platform` (default: `target_platform()`)."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    return "xla" if (platform or target_platform()) == "cpu" else "pallas"
