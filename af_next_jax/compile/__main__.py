"""python -m af_next_jax.compile --config experiments/NAME.py[:ARG] [--topology v5p-8] [--slices N] [--config.k=v]

Compiles the experiment's train and eval steps for a TPU topology on this machine (no TPU needed, only
libtpu) and prints the per-device memory table, FLOPs, collectives and compile time. Exits 1 when a
step does not fit the chip's HBM (naming the knobs), 2 on bad input.
"""

import os
import sys


def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    # The host's own backend is irrelevant (the devices are libtpu's compile-only ones); never try to
    # open a TPU that a TPU VM might have. The allocator settings are for running XLA:CPU programs,
    # and this command only compiles.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    configure_cli_process(tune_malloc=False)
    from af_next_jax.compile.cli import main as compile_main

    return compile_main(argv)


if __name__ == "__main__":
    sys.exit(main())
