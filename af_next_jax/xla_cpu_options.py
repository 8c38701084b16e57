"""XLA:CPU options the command-line entry points set, each because it measured faster here (never needed
from the user).

XLA reads `XLA_FLAGS` once, when the first backend starts; `process_setup.configure_cli_process()`, the
first call of every command's main (and of the test session), calls `apply_xla_cpu_options()` before
that. Importing the package sets nothing. A flag the user already set in `XLA_FLAGS` wins. The options
only concern the CPU compiler; GPU and TPU compilations ignore them.

  --xla_cpu_copy_insertion_use_region_analysis=true
      Copy insertion analyses while-loop bodies region by region, so the layer scan (nn.scan) keeps
      fewer defensive copies of its stacked per-layer buffers. Train step of benchmarks/train_step.py
      (tiny preset, 2-core CPU, load ~7): 142 -> 133 CPU ms per step (two runs each), compile time
      unchanged (8.4 s -> 7.6 s). docs/PERFORMANCE.md, "Train step vs PyTorch".

And one allocator setting (`keep_freed_memory_in_process`, applied by the same setup): XLA:CPU allocates an
executable's temporaries as one buffer per run (84 MB for that step) from its worker thread. glibc gives
each thread its own arena, whose heaps are capped at 64 MB, so that buffer is a fresh `mmap` each step:
21,500 page faults and ~37 ms of kernel time per step (a quarter of its CPU time), invisible in the
profiler's kernel times. One arena, no `mmap` for large blocks and a 1 GiB trim threshold keep the
freed buffer in the heap for the next step: 0-32 faults, 1-6 ms of kernel time, CPU 129-132 -> 109-112 ms
per step (that step alone in its process; docs/PERFORMANCE.md, "Page faults"). The cost: up to
MALLOC_TRIM_THRESHOLD_BYTES of freed memory stays with the process, and threads share one arena.
Skipped when the user set any glibc malloc option (a `MALLOC_*_` variable or `GLIBC_TUNABLES`), when the
C library is not glibc, and in any process that may drive an accelerator (JAX_PLATFORMS names another
platform, or, without JAX_PLATFORMS, a TPU/GPU plugin is installed): there the host holds multi-GB
checkpoint and batch buffers, which without `mmap` could only be returned to the system from the heap's
top, and the step's temporaries live in device memory anyway. So it acts on CPU-only processes (the
README's main job, the tests; on a CPU host with libtpu installed too, which process_setup.py makes
JAX_PLATFORMS=cpu first).
"""

from __future__ import annotations

import ctypes
import os

XLA_CPU_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": "true"}
# glibc's mallopt parameter numbers (malloc.h) and the values set.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
MALLOC_TRIM_THRESHOLD_BYTES = 1 << 30
MALLOC_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD_BYTES))


def apply_xla_cpu_options(environ=os.environ) -> str:
    """Append each option missing from `environ["XLA_FLAGS"]`; returns the resulting flags."""
    flags = environ.get("XLA_FLAGS", "")
    for name, value in XLA_CPU_OPTIONS.items():
        if f"--{name}" not in flags:
            flags = f"{flags} --{name}={value}".strip()
    environ["XLA_FLAGS"] = flags
    return flags


def _glibc():
    """The process's C library if it is glibc (it has `mallopt`), else None."""
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process: its C library among them
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def accelerator_plugins(environ=os.environ) -> set[str]:
    """Names of the accelerator plugins JAX would try to initialise here, looked up, never imported:
    "libtpu" (the libtpu package, or TPU_LIBRARY_PATH) and every PJRT plugin JAX discovers (modules of
    the `jax_plugins` namespace, `jax_plugins` entry points, PJRT_NAMES_AND_LIBRARY_PATHS; the CUDA
    and ROCm plugins are among them), as jax/_src/xla_bridge.py discovers them."""
    import importlib.metadata
    import importlib.util
    import pkgutil

    found = set()
    if importlib.util.find_spec("libtpu") is not None or environ.get("TPU_LIBRARY_PATH"):
        found.add("libtpu")
    namespace = importlib.util.find_spec("jax_plugins")
    if namespace is not None and namespace.submodule_search_locations:
        found |= {name for _, name, _ in pkgutil.iter_modules(list(namespace.submodule_search_locations))}
    found |= {entry_point.name for entry_point in importlib.metadata.entry_points(group="jax_plugins")}
    for plugin in filter(None, environ.get("PJRT_NAMES_AND_LIBRARY_PATHS", "").split(",")):
        found.add(plugin.split(os.path.pathsep)[0])
    return found


def _cpu_only_process(environ) -> bool:
    """True when JAX can only run on the CPU here: JAX_PLATFORMS is "cpu", or it is unset and no accelerator
    plugin is installed."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return {name.strip() for name in platforms.split(",") if name.strip()} == {"cpu"}
    return not accelerator_plugins(environ)


def keep_freed_memory_in_process(environ=os.environ, libc=None) -> bool:
    """Set MALLOC_SETTINGS through glibc's `mallopt` in a CPU-only process unless the user tuned malloc;
    True if they were set.

    Must run before JAX starts its threads (an arena is chosen per thread): process_setup.py calls it first."""
    if "GLIBC_TUNABLES" in environ or any(name.startswith("MALLOC_") and name.endswith("_") for name in environ):
        return False
    if not _cpu_only_process(environ):
        return False
    libc = libc if libc is not None else _glibc()
    if libc is None:
        return False
    return all([libc.mallopt(parameter, value) == 1 for parameter, value in MALLOC_SETTINGS])
