"""`python -m af_next_jax.generate` on a host without a TPU prints no libtpu start-up errors, libtpu
installed or not (af_next_jax/process_setup.py, issue 26).

The command runs as users run it, JAX_PLATFORMS unset, up to loading the checkpoint (JAX has started
its backends by then) and refusing a missing audio file. The same command without the set-up's
platform step is the control: where it prints no libtpu line either (no libtpu, a TPU host, a quiet
libtpu) the test has nothing to check and skips."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBTPU_LINE = re.compile(r"^[EWF]\d{4} |TPU_WORKER_HOSTNAMES|TPU_ACCELERATOR_TYPE|InitGoogle|libtpu", re.MULTILINE)
GENERATE = """
import runpy, sys
from af_next_jax import process_setup
if sys.argv[1] == "control":
    process_setup.cpu_platform_without_tpu = lambda *args, **kwargs: None  # the set-up minus its platform step
sys.argv = ["af_next_jax.generate", *sys.argv[2:]]
runpy.run_module("af_next_jax.generate", run_name="__main__", alter_sys=True)
"""


def _generate(checkpoint, mode: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items()
           if name not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "JAX_FORCE_TPU_INIT")}
    # libtpu gets as far as its errors even while another process on this host holds its lock (a
    # compile test, another session); holding it, libtpu stops quietly and the control would skip.
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    arguments = ["--checkpoint", str(checkpoint / "ckpt"), "--audio", str(checkpoint / "missing.wav"),
                 "--prompt", "When does the beep start?"]
    return subprocess.run([sys.executable, "-c", GENERATE, mode, *arguments], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_generate_prints_no_libtpu_errors_on_a_host_without_a_tpu(checkpoint):
    control = _generate(checkpoint, "control")
    assert control.returncode == 2, control.stderr[-3000:]  # it got as far as the audio file
    if not LIBTPU_LINE.search(control.stderr):
        pytest.skip("without the platform step nothing of libtpu is printed here (no libtpu, a TPU host, "
                    "or a quiet libtpu): nothing to prevent")
    result = _generate(checkpoint, "setup")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if line.startswith("error: ")], result.stderr
    assert "missing.wav" in result.stderr and not LIBTPU_LINE.search(result.stderr)
