"""Every attention-related module imports on its own, first, in a fresh interpreter (no import cycle).

tests/test_import_graph.py checks the whole package's import graph statically; this runs the imports.
A cycle only shows when one of its modules is imported first, so each module gets its own interpreter: one
subprocess loads the third-party libraries (jax, flax, Pallas: seconds), then forks one child per
module, in which none of this project's modules is loaded yet, and the child imports that module.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _modules():
    names = [f"af_next_jax.attention.{p.stem}" for p in sorted((ROOT / "af_next_jax" / "attention").glob("*.py"))
             if p.stem != "__init__"]
    names += [f"af_next_jax.parallel.{p.stem}" for p in sorted((ROOT / "af_next_jax" / "parallel").glob("*.py"))
              if p.stem != "__init__"]
    names += [f"af_next_kernels.{p.stem}" for p in sorted((ROOT / "kernels").glob("*.py")) if p.stem != "__init__"]
    names += ["af_next_jax.model.numerics", "af_next_jax.model.encoder", "af_next_jax.model.decoder",
              "af_next_jax.model.af_next"]
    return names


FORK_EACH = """
import os, sys, traceback
import jax, jax.numpy, flax.linen, jax.experimental.pallas  # third party only: shared by the children
assert not any(m.startswith(("af_next_jax", "af_next_kernels")) for m in sys.modules)
failed = []
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(module)
print("FAILED:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_attention_module_imports_alone_in_a_fresh_interpreter():
    modules = _modules()
    assert "af_next_jax.attention.dispatch" in modules and "af_next_kernels.flash_attention" in modules
    result = subprocess.run([sys.executable, "-c", FORK_EACH, *modules], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{result.stdout[-500:]}\n{result.stderr[-4000:]}"
