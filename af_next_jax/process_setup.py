"""What a command-line entry point does to its own process; importing af_next_jax does none of it.

`configure_cli_process()` is the first call in the `main` of every command (`python -m af_next_jax.train`,
`.generate`, `.evaluate`, `.convert`, `.data`, `.compile`, `.notebooks`) and of the test session
(tests/conftest.py), before JAX starts a backend. A program of your own that wants the same settings
calls it first, too. In order:

1. `cpu_platform_without_tpu`: on a host without a TPU where libtpu is the only accelerator plugin
   installed (the `tpu` extra on a CPU machine, e.g. to run the compile tool), JAX_PLATFORMS=cpu.
   Without it JAX initialises every installed plugin to find out which work; libtpu, loaded on a host
   with no TPU, fails (quietly for JAX) after printing start-up errors on stderr ("E0000 ...
   unexpected worker hostname 'WARNING: could not determine TPU worker hostnames...' from env var
   TPU_WORKER_HOSTNAMES", "Failed to find host bounds for accelerator type"). JAX already skips the
   CUDA plugin when no NVIDIA device is visible (xla_bridge.backends); this is the same check for
   the TPU, with JAX's own test for TPU chips (`hardware_utils.num_available_tpu_chips_and_device_id`:
   Google PCI devices with a TPU device id, what `cloud_tpu_init` uses to decide it is not on a
   Cloud TPU VM). Nothing changes when the user set JAX_PLATFORMS (or JAX_PLATFORM_NAME,
   JAX_FORCE_TPU_INIT), on a host with TPU chips, or when another accelerator plugin is installed
   (then JAX must still look for that one's devices). Compiling for a TPU topology
   (af_next_jax/compile) loads libtpu by itself, through `get_topology_desc`, not the TPU backend;
   the compile command calls `compile_only_libtpu` for that.
2. `apply_xla_cpu_options` (xla_cpu_options.py): XLA:CPU flags measured faster here, added to XLA_FLAGS.
3. `keep_freed_memory_in_process` (xla_cpu_options.py): glibc malloc settings, in CPU-only processes
   only (after step 1, which may have just made this one CPU-only), unless `tune_malloc=False`.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from af_next_jax.xla_cpu_options import accelerator_plugins, apply_xla_cpu_options, keep_freed_memory_in_process

# Variables by which the user (or a launcher) says which platforms JAX should use.
PLATFORM_VARIABLES = ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "JAX_FORCE_TPU_INIT")


@dataclasses.dataclass(frozen=True)
class CliProcessSetup:
    """What `configure_cli_process` did."""

    jax_platforms_set: str | None  # JAX_PLATFORMS it set (None: left as it was)
    xla_flags: str                 # XLA_FLAGS afterwards
    malloc_tuned: bool             # whether glibc's malloc settings were changed


def configure_cli_process(*, tune_malloc: bool = True) -> CliProcessSetup:
    """Set up this process for a command-line run: steps 1-3 of the module docstring.

    Call it before JAX starts a backend (XLA reads its flags then) and before JAX starts threads
    (glibc picks a malloc arena per thread). `tune_malloc=False` for a command that runs no XLA:CPU
    program, which the allocator settings are for."""
    platforms = cpu_platform_without_tpu(os.environ)
    if platforms is not None:
        os.environ["JAX_PLATFORMS"] = platforms  # seen by jax if imported later, and by child processes
        if "jax" in sys.modules:  # jax read JAX_PLATFORMS when it was imported: tell its config too
            sys.modules["jax"].config.update("jax_platforms", platforms)
    flags = apply_xla_cpu_options()
    malloc_tuned = keep_freed_memory_in_process() if tune_malloc else False
    return CliProcessSetup(platforms, flags, malloc_tuned)


def compile_only_libtpu(topology_name: str, environ=os.environ, tpu_chips=None) -> bool:
    """Before libtpu loads to compile for `topology_name` on a host without TPU chips: tell it the worker
    (this host) and the accelerator type, which it otherwise looks up in a TPU VM's metadata and, not
    finding them, reports in start-up error lines. The compile-only devices (their count, processes and
    coordinates) are the same either way (checked for v5p-64, v5p-256 and v5e-16). Nothing changes on a
    TPU VM or where the user set either variable. True if it set them."""
    chips = tpu_chips() if tpu_chips is not None else _tpu_chips()
    if chips != 0 or "TPU_WORKER_HOSTNAMES" in environ or "TPU_ACCELERATOR_TYPE" in environ:
        return False
    environ["TPU_WORKER_HOSTNAMES"] = "localhost"
    environ["TPU_ACCELERATOR_TYPE"] = topology_name
    return True


def cpu_platform_without_tpu(environ=os.environ, tpu_chips=None) -> str | None:
    """"cpu" when the only accelerator plugin JAX could load here is libtpu and this host has no TPU
    chip; None to leave JAX's platform choice alone. `tpu_chips` (tests) replaces the hardware count."""
    if any(name in environ for name in PLATFORM_VARIABLES):  # the user's choice, even an empty one
        return None
    if accelerator_plugins(environ) != {"libtpu"}:
        return None
    chips = tpu_chips() if tpu_chips is not None else _tpu_chips()
    return "cpu" if chips == 0 else None


def _tpu_chips() -> int | None:
    """TPU chips on this host's PCI bus, by JAX's own test; None when that test cannot be found (a JAX
    that moved it), which leaves the platforms alone."""
    try:
        from jax._src import hardware_utils
    except ImportError:
        return None
    return hardware_utils.num_available_tpu_chips_and_device_id()[0]
