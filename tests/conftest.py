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
def debug_run(tmp_path_factory):
    """{workdir, demo_data, cache_dir}: the `make run` experiment trained for debug_run.TOTAL_STEPS steps
    (once per session, shared by the pytest-xdist workers; its compilation cache is shared with the runs
    that resume from it). Tests copy from its workdir and never write into it."""
    from debug_run import make_demo_data, train_debug_run

    def build(root):
        demo = make_demo_data(str(root / "demo_data"))
        cache_dir = str(root / "compilation_cache")
        return dict(workdir=train_debug_run(str(root / "workdir"), demo, cache_dir), demo_data=demo,
                    cache_dir=cache_dir)

    return once_per_session(tmp_path_factory, "debug_run", build)


def once_per_session(tmp_path_factory, name: str, build):
    """build(root) once per test session, under pytest-xdist too: the first worker to get here builds it in
    the session's shared temporary folder, holding a lock; the others wait and read what it returned (json)."""
    import json

    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / name        # the folder above the workers' own ones
    with FileLock(str(shared) + ".lock"):
        result_file = shared / "result.json"
        if not result_file.exists():
            shared.mkdir(exist_ok=True)
            result = build(shared)
            result_file.write_text(json.dumps(result))
        return json.loads(result_file.read_text())
