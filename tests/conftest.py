"""Test session set-up: 8 fake CPU devices (sharding tests) and the commands' process set-up, before jax
starts a backend; the session fixtures several folders share: `demo_data` and `debug_run` (the `make run`
experiment, trained once)."""

import os
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The test session is a command-line process too: the XLA:CPU flags and allocator settings the commands
# use (the suite's speed depends on them), before jax starts a backend.
from af_next_jax.process_setup import configure_cli_process  # noqa: E402

configure_cli_process()
# Shared test helpers (tests/hf_reference.py) import as top-level modules.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The bundled demo dataset, 16 training and 4 held-out clips (generated, ~1 s)."""
    from debug_run import make_demo_data

    return make_demo_data(str(tmp_path_factory.mktemp("demo") / "demo_data"))


@pytest.fixture(scope="session")
def debug_run(demo_data, tmp_path_factory):
    """{workdir, demo_data, cache_dir}: the `make run` experiment trained for debug_run.TOTAL_STEPS steps
    (once per session; its compilation cache is shared with the runs that resume from it)."""
    from debug_run import train_debug_run

    root = tmp_path_factory.mktemp("debug_run")
    cache_dir = str(root / "compilation_cache")
    return dict(workdir=train_debug_run(str(root / "workdir"), demo_data, cache_dir), demo_data=demo_data,
                cache_dir=cache_dir)
