"""A library does not change the process that imports it; the commands set their own process up
(af_next_jax/process_setup.py): XLA:CPU flags, glibc's malloc settings, and JAX_PLATFORMS=cpu on a host
with libtpu installed and no TPU, so that JAX does not start libtpu there and print its start-up errors.

The process-level checks run in fresh interpreters: the test process itself was set up by conftest.py.
glibc's `mallopt` is observed by wrapping ctypes.CDLL before anything else is imported (the only way
the package reaches it, xla_cpu_options._glibc)."""

import json
import os
import re
import subprocess
import sys

import pytest

from af_next_jax import process_setup
from af_next_jax.process_setup import cpu_platform_without_tpu
from af_next_jax.xla_cpu_options import MALLOC_SETTINGS, XLA_CPU_OPTIONS, accelerator_plugins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m NAME` for every command: the module runpy runs as __main__ (a package runs its __main__.py).
COMMANDS = ["af_next_jax.train", "af_next_jax.generate", "af_next_jax.evaluate", "af_next_jax.convert",
            "af_next_jax.data", "af_next_jax.compile", "af_next_jax.notebooks"]
# Commands that run no XLA:CPU program in their own process leave malloc alone (process_setup.py).
NO_MALLOC = {"af_next_jax.compile", "af_next_jax.notebooks"}
USER_FLAGS = "--xla_force_host_platform_device_count=2"
# What libtpu prints when it starts on a host without a TPU (glog lines E/W/F, its own warnings).
LIBTPU_LINE = re.compile(r"^[EWF]\d{4} |TPU_WORKER_HOSTNAMES|TPU_ACCELERATOR_TYPE|InitGoogle|libtpu", re.MULTILINE)

RECORD_MALLOPT = """
import ctypes, json, os, sys
MALLOPT_CALLS = []
_CDLL = ctypes.CDLL
class _RecordingLibrary:
    def __init__(self, *args, **kwargs):
        self._library = _CDLL(*args, **kwargs)
    def __getattr__(self, name):
        if name == "mallopt":
            return lambda parameter, value: MALLOPT_CALLS.append([parameter, value]) or self._library.mallopt(parameter, value)
        return getattr(self._library, name)
ctypes.CDLL = _RecordingLibrary
"""

IMPORT_EVERYTHING = RECORD_MALLOPT + """
import jax, numpy  # third party first: what they do to the environment is not ours to check
before = dict(os.environ)
import af_next_jax, af_next_jax.process_setup, af_next_jax.convert.cli, af_next_jax.compile.cli
for command in sys.argv[1:]:
    __import__(command + (".__main__" if command != "af_next_jax.generate" else ""))
changed = {name: [before.get(name), os.environ.get(name)] for name in set(before) | set(os.environ)
           if before.get(name) != os.environ.get(name)}
print(json.dumps({"changed": changed, "mallopt": MALLOPT_CALLS}))
"""

RUN_EACH_COMMAND = RECORD_MALLOPT + """
import runpy
import jax  # shared by the children; no backend started
results = {}
for command in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        sys.argv = [command, "--help"]
        sys.stdout = open(os.devnull, "w")
        try:
            runpy.run_module(command, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
        os.write(write, json.dumps({"XLA_FLAGS": os.environ.get("XLA_FLAGS"), "mallopt": MALLOPT_CALLS}).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        results[command] = json.loads(pipe.read())
    os.wait()
print(json.dumps(results))
"""


def _python(code: str, *args: str, remove=(), **environ) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name not in remove} | environ
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_package_and_every_command_changes_nothing_in_the_process():
    # A CPU-only process whose user tuned nothing: what the old import-time set-up acted on.
    result = _python(IMPORT_EVERYTHING, *COMMANDS, remove=("GLIBC_TUNABLES",), XLA_FLAGS=USER_FLAGS,
                     JAX_PLATFORMS="cpu")
    report = _last_json(result)
    assert report == {"changed": {}, "mallopt": []}


def test_importing_the_package_leaves_jax_platforms_unset():
    result = _python(IMPORT_EVERYTHING, *COMMANDS, remove=("JAX_PLATFORMS",), XLA_FLAGS=USER_FLAGS)
    assert _last_json(result)["changed"] == {}


def test_every_command_sets_its_process_up_before_anything_else():
    """`python -m <command> --help` in a fresh process: the XLA:CPU flags are added to the user's and,
    where the command runs XLA:CPU programs itself, the malloc settings are made."""
    result = _python(RUN_EACH_COMMAND, *COMMANDS, remove=("GLIBC_TUNABLES",), XLA_FLAGS=USER_FLAGS,
                     JAX_PLATFORMS="cpu")
    report = _last_json(result)
    assert sorted(report) == sorted(COMMANDS)
    for command, seen in report.items():
        flags = seen["XLA_FLAGS"].split()
        assert flags[0] == USER_FLAGS and {f"--{k}={v}" for k, v in XLA_CPU_OPTIONS.items()} <= set(flags), command
        expected_malloc = [] if command in NO_MALLOC else [list(setting) for setting in MALLOC_SETTINGS]
        assert seen["mallopt"] == expected_malloc, command


# JAX_PLATFORMS on a host without a TPU (step 1 of process_setup.py).

def _no_libtpu_noise_possible() -> str | None:
    if "libtpu" not in accelerator_plugins({}):
        return "libtpu is not installed: nothing of it can print"
    if process_setup._tpu_chips() != 0:
        return "this host has TPU chips (or JAX's chip count is unavailable): libtpu starts for real"
    return None


DEVICES_AFTER_SETUP = """
import sys
from af_next_jax import process_setup
if sys.argv[1] == "without":
    process_setup.cpu_platform_without_tpu = lambda *args, **kwargs: None  # the set-up minus step 1
print(process_setup.configure_cli_process().jax_platforms_set)
import jax
print(sorted({device.platform for device in jax.devices()}))
"""


def test_jax_devices_after_the_setup_prints_no_libtpu_errors_on_a_host_without_a_tpu():
    if reason := _no_libtpu_noise_possible():
        pytest.skip(reason)
    # ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu gets as far as its errors even while another process on this
    # host holds its lock (a compile test, another session); holding it, libtpu stops quietly.
    without = _python(DEVICES_AFTER_SETUP, "without", remove=process_setup.PLATFORM_VARIABLES,
                      ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    if not LIBTPU_LINE.search(without.stderr):
        pytest.skip("this libtpu prints nothing when it starts without a TPU: nothing to prevent")
    result = _python(DEVICES_AFTER_SETUP, "with", remove=process_setup.PLATFORM_VARIABLES,
                     ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not LIBTPU_LINE.search(result.stderr), result.stderr
    assert result.stdout.split("\n")[:2] == ["cpu", "['cpu']"]  # JAX_PLATFORMS=cpu set, and JAX saw it


def test_jax_platforms_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setattr(process_setup, "accelerator_plugins", lambda environ: {"libtpu"})
    no_tpu = lambda: 0  # noqa: E731
    for value in ("tpu", "cpu,tpu", "cuda", ""):
        assert cpu_platform_without_tpu({"JAX_PLATFORMS": value}, tpu_chips=no_tpu) is None
    assert cpu_platform_without_tpu({"JAX_PLATFORM_NAME": "tpu"}, tpu_chips=no_tpu) is None
    assert cpu_platform_without_tpu({"JAX_FORCE_TPU_INIT": "1"}, tpu_chips=no_tpu) is None
    assert cpu_platform_without_tpu({}, tpu_chips=no_tpu) == "cpu"


def test_the_setup_leaves_a_user_set_jax_platforms_in_a_fresh_process():
    code = ("import os; from af_next_jax.process_setup import configure_cli_process; "
            "print(configure_cli_process().jax_platforms_set, os.environ['JAX_PLATFORMS'])")
    result = _python(code, JAX_PLATFORMS="cpu,tpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "None cpu,tpu"


def test_cpu_only_when_libtpu_is_the_only_plugin_and_there_is_no_tpu_chip(monkeypatch):
    plugins = {"libtpu"}
    monkeypatch.setattr(process_setup, "accelerator_plugins", lambda environ: set(plugins))
    assert cpu_platform_without_tpu({}, tpu_chips=lambda: 0) == "cpu"
    assert cpu_platform_without_tpu({}, tpu_chips=lambda: 4) is None      # a TPU VM: JAX uses its TPU
    assert cpu_platform_without_tpu({}, tpu_chips=lambda: None) is None   # chips unknown: JAX decides
    plugins.add("xla_cuda12")                                             # a GPU plugin may have devices
    assert cpu_platform_without_tpu({}, tpu_chips=lambda: 0) is None
    plugins.clear()                                                       # no plugin: nothing to skip
    assert cpu_platform_without_tpu({}, tpu_chips=lambda: 0) is None


def test_plugins_are_found_as_jax_discovers_them(monkeypatch, tmp_path):
    """libtpu (package or TPU_LIBRARY_PATH), `jax_plugins` modules and entry points, PJRT_NAMES_AND_LIBRARY_PATHS."""
    import importlib.machinery
    import importlib.metadata
    import importlib.util
    import types

    (tmp_path / "xla_rocm7").mkdir()
    (tmp_path / "xla_rocm7" / "__init__.py").write_text("")
    namespace = importlib.machinery.ModuleSpec("jax_plugins", None, is_package=True)
    namespace.submodule_search_locations = [str(tmp_path)]
    specs = {"libtpu": None, "jax_plugins": None}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: specs[name])
    entry_points = []
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: list(entry_points) if group == "jax_plugins" else [])
    assert accelerator_plugins({}) == set()
    assert accelerator_plugins({"TPU_LIBRARY_PATH": "/opt/libtpu.so"}) == {"libtpu"}
    specs["libtpu"] = object()
    assert accelerator_plugins({}) == {"libtpu"}
    specs["jax_plugins"] = namespace
    entry_points.append(types.SimpleNamespace(name="xla_cuda12"))
    assert accelerator_plugins({}) == {"libtpu", "xla_rocm7", "xla_cuda12"}
    assert accelerator_plugins({"PJRT_NAMES_AND_LIBRARY_PATHS": f"my_plugin{os.pathsep}/x.so"}) == {
        "libtpu", "xla_rocm7", "xla_cuda12", "my_plugin"}


# The generate command (issue 26): a user's run on a CPU host with libtpu installed.

GENERATE_NOISE = re.compile(r"TPU_WORKER_HOSTNAMES|E0000|Failed to find host bounds")


def test_generate_prints_no_libtpu_errors_once_jax_has_started_on_a_host_without_a_tpu(tmp_path):
    """`python -m af_next_jax.generate` as users run it (JAX_PLATFORMS unset) on a converted checkpoint
    with no tokenizer: it loads the parameters (JAX's backends start) and stops at the tokenizer."""
    if reason := _no_libtpu_noise_possible():
        pytest.skip(reason)
    import numpy as np

    from af_next_jax.config import tiny
    from af_next_jax.convert import orbax_io

    orbax_io.save_checkpoint(tmp_path, {"params": {"decoder": {"w": np.zeros(3, np.float32)}}}, tiny())
    env = {name: value for name, value in os.environ.items() if name not in process_setup.PLATFORM_VARIABLES}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # libtpu prints its errors even while another process holds its lock
    result = subprocess.run([sys.executable, "-m", "af_next_jax.generate", "--checkpoint", str(tmp_path), "--prompt",
                             "When does the beep start?"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "error: no tokenizer found for the model" in result.stderr, result.stderr[-3000:]
    assert not GENERATE_NOISE.search(result.stderr), result.stderr
