"""Entry point: `python -m af_next_jax.convert --help`."""

import sys

from af_next_jax.convert.cli import main

sys.exit(main())
