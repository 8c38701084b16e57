"""The XLA:CPU options the package sets (af_next_jax/xla_cpu_options.py): added to XLA_FLAGS, never over
a value the user chose, and in effect in this process (the package is imported before any computation)."""

import os

from af_next_jax.xla_cpu_options import XLA_CPU_OPTIONS, apply_xla_cpu_options


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


def test_importing_the_package_set_them_in_this_process():
    import af_next_jax  # noqa: F401

    for name in XLA_CPU_OPTIONS:
        assert f"--{name}" in os.environ.get("XLA_FLAGS", "")
