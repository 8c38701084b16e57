"""Entry point: `python -m af_next_jax.convert --help`.

Exit status 2 for bad input (cli.py) and for a full disk (disk_space.DiskFull: the partial output was
removed, the message says how much space is needed where); 1 for anything else.
"""

import sys

if __name__ == "__main__":
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # first, before JAX starts: XLA flags, allocator, platforms (process_setup.py)
    from af_next_jax.convert.cli import main
    from af_next_jax.disk_space import DiskFull

    try:
        status = main()
    except DiskFull as error:
        print(f"error: {error}", file=sys.stderr)
        status = 2
    sys.exit(status)
