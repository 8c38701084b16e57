"""The XLA:CPU options the commands set (af_next_jax/xla_cpu_options.py): added to XLA_FLAGS, never over
a value the user chose, and in effect in this process (conftest.py sets the test session up as the commands
do; tests/test_process_setup.py checks that importing the package sets nothing and every command does)."""

import os

from af_next_jax.xla_cpu_options import (
    M_ARENA_MAX, M_MMAP_MAX, MALLOC_SETTINGS, XLA_CPU_OPTIONS, apply_xla_cpu_options, keep_freed_memory_in_process)


def test_options_are_appended_to_the_users_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    flags = apply_xla_cpu_options(environ)
    assert flags.startswith("--xla_force_host_platform_device_count=8 ")
    for name, value in XLA_CPU_OPTIONS.items():
        assert f"--{name}={value}" in flags.split()
    assert environ["XLA_FLAGS"] == flags
    assert apply_xla_cpu_options(environ) == flags  # idempotent


def test_a_flag_the_user_set_wins():
    name = next(iter(XLA_CPU_OPTIONS))
    environ = {"XLA_FLAGS": f"--{name}=false"}
    assert apply_xla_cpu_options(environ).split().count(f"--{name}=false") == 1
    assert f"--{name}={XLA_CPU_OPTIONS[name]}" not in environ["XLA_FLAGS"]


def test_the_test_session_set_them_in_this_process():
    for name in XLA_CPU_OPTIONS:
        assert f"--{name}" in os.environ.get("XLA_FLAGS", "")


class _RecordingLibc:
    """Stands in for glibc: records mallopt calls and accepts them (glibc returns 1 on success)."""

    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return self.result


def test_malloc_settings_are_set_in_a_cpu_only_process_when_the_user_tuned_nothing():
    libc = _RecordingLibc()
    assert keep_freed_memory_in_process({"PATH": "/bin", "JAX_PLATFORMS": "cpu"}, libc=libc)
    assert libc.calls == list(MALLOC_SETTINGS)
    assert dict(MALLOC_SETTINGS)[M_MMAP_MAX] == 0 and dict(MALLOC_SETTINGS)[M_ARENA_MAX] == 1


def test_a_malloc_option_the_user_set_wins():
    for environ in ({"MALLOC_ARENA_MAX_": "4"}, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}):
        libc = _RecordingLibc()
        assert not keep_freed_memory_in_process(environ, libc=libc)
        assert libc.calls == []


def test_a_rejected_malloc_setting_is_reported():
    assert not keep_freed_memory_in_process({"JAX_PLATFORMS": "cpu"}, libc=_RecordingLibc(result=0))


def test_malloc_is_left_alone_in_a_process_that_may_drive_an_accelerator(monkeypatch):
    for platforms in ("tpu", "cuda", "cpu,cuda"):
        libc = _RecordingLibc()
        assert not keep_freed_memory_in_process({"JAX_PLATFORMS": platforms}, libc=libc)
        assert libc.calls == []
    import importlib.util

    installed = {"libtpu"}  # JAX_PLATFORMS unset: a TPU plugin is installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name in installed else None)
    libc = _RecordingLibc()
    assert not keep_freed_memory_in_process({}, libc=libc) and libc.calls == []
    installed.clear()  # no plugin: CPU only
    assert keep_freed_memory_in_process({}, libc=libc) and libc.calls == list(MALLOC_SETTINGS)
