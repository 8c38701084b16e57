"""XLA:CPU options the package sets itself, each because it measured faster here (never needed from the user).

XLA reads `XLA_FLAGS` once, when the first backend starts; `af_next_jax/__init__.py` calls
`apply_xla_cpu_options()` on import, so they apply to any program that imports the package before its
first JAX computation (and do nothing otherwise). A flag the user already set in `XLA_FLAGS` wins. The
options only concern the CPU compiler; GPU and TPU compilations ignore them.

  --xla_cpu_copy_insertion_use_region_analysis=true
      Copy insertion analyses while-loop bodies region by region, so the layer scan (nn.scan) keeps
      fewer defensive copies of its stacked per-layer buffers. Train step of benchmarks/train_step.py
      (tiny preset, 2-core CPU, load ~7): 142 -> 133 CPU ms per step (two runs each), compile time
      unchanged (8.4 s -> 7.6 s). docs/PERFORMANCE.md, "Train step vs PyTorch".
"""

from __future__ import annotations

import os

XLA_CPU_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": "true"}


def apply_xla_cpu_options(environ=os.environ) -> str:
    """Append each option missing from `environ["XLA_FLAGS"]`; returns the resulting flags."""
    flags = environ.get("XLA_FLAGS", "")
    for name, value in XLA_CPU_OPTIONS.items():
        if f"--{name}" not in flags:
            flags = f"{flags} --{name}={value}".strip()
    environ["XLA_FLAGS"] = flags
    return flags
