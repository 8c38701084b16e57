"""Execute a notebook of notebooks/ and save it with its outputs.

    python -m af_next_jax.notebooks run notebooks/rote_ablation.ipynb [--quick] [--out COPY.ipynb]

Runs every cell in a fresh kernel (nbclient) from the repository root, then writes the notebook with
its outputs, and the machine and wall time of this run in the header's `Executed:` line, to --out
(default: in place). `--quick` sets AF_NEXT_NOTEBOOK_QUICK=1, which each notebook reads in its first
cell to run a few steps only (what CI does, tests/notebooks); a quick run is never saved in place.
A cell that raises stops the run: exit status 1 and the error, nothing written.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

QUICK_VARIABLE = "AF_NEXT_NOTEBOOK_QUICK"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXECUTED_LINE = re.compile(r"^\*\*Executed:\*\*.*$", re.MULTILINE)


def machine_description() -> str:
    """CPU model, core count and load: what a reader needs to compare the timings."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} cores, load {load:.1f} at the start, {platform.system()}"


# Seconds one cell may run: rote_ablation trains all its runs in one cell (~80 min on one CPU core).
CELL_TIMEOUT_SECONDS = 4 * 3600


def execute(path: str, out: str | None = None, *, quick: bool = False, timeout: int = CELL_TIMEOUT_SECONDS) -> float:
    """Runs the notebook; writes it (with outputs) to `out`; returns the wall time in seconds."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    machine = machine_description()
    previous = os.environ.get(QUICK_VARIABLE)
    os.environ[QUICK_VARIABLE] = "1" if quick else "0"
    started = time.perf_counter()
    try:
        nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": REPO}}).execute()
    finally:
        if previous is None:
            os.environ.pop(QUICK_VARIABLE)
        else:
            os.environ[QUICK_VARIABLE] = previous
    seconds = time.perf_counter() - started
    header = notebook.cells[0]
    mode = "quick (AF_NEXT_NOTEBOOK_QUICK=1)" if quick else "full"
    stamp = (f"**Executed:** {time.strftime('%Y-%m-%d', time.gmtime())}, {mode} run, on {machine}, "
             f"in {seconds / 60:.1f} min (`python -m af_next_jax.notebooks run {os.path.relpath(path, REPO)}`).")
    if header.cell_type == "markdown" and EXECUTED_LINE.search(header.source):
        header.source = EXECUTED_LINE.sub(stamp.replace("\\", "\\\\"), header.source)
    nbformat.write(notebook, out or path)
    return seconds


def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    # First: XLA_FLAGS and JAX_PLATFORMS go to the kernels this starts (child processes inherit them);
    # glibc's malloc settings would not (they are per process), and this process runs no XLA program.
    configure_cli_process(tune_malloc=False)
    parser = argparse.ArgumentParser(prog="python -m af_next_jax.notebooks", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute a notebook and save it with its outputs")
    run.add_argument("notebook", help="notebooks/NAME.ipynb")
    run.add_argument("--out", help="where to write the executed notebook (default: in place)")
    run.add_argument("--quick", action="store_true", help=f"a few steps only ({QUICK_VARIABLE}=1); needs --out")
    run.add_argument("--timeout", type=int, default=CELL_TIMEOUT_SECONDS, help="seconds per cell")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.notebook):
        parser.error(f"{args.notebook} is not a file; the notebooks are notebooks/*.ipynb")
    if args.quick and (args.out is None or os.path.abspath(args.out) == os.path.abspath(args.notebook)):
        parser.error("--quick needs --out elsewhere: the committed notebook keeps the full run's outputs")
    try:
        import nbclient  # noqa: F401
    except ImportError:
        parser.error("nbclient is not installed: pip install nbclient nbformat ipykernel matplotlib")
    from nbclient.exceptions import CellExecutionError

    try:
        seconds = execute(args.notebook, args.out, quick=args.quick, timeout=args.timeout)
    except CellExecutionError as error:
        print(f"error: a cell of {args.notebook} failed:\n{error}", file=sys.stderr)
        return 1
    print(f"executed {args.notebook} in {seconds:.0f} s -> {args.out or args.notebook}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
