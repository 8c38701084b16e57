"""Entry point: `python -m af_next_jax.convert --help`."""

import sys

if __name__ == "__main__":
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # first, before JAX starts: XLA flags, allocator, platforms (process_setup.py)
    from af_next_jax.convert.cli import main

    sys.exit(main())
