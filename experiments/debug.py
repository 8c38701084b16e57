"""debug: the tiny model on the bundled demo data, on the CPU, in a few minutes (the README main job).

    python -m af_next_jax.data make-demo --out demo_data
    python -m af_next_jax.train --config experiments/debug.py --workdir /tmp/debug_run

Every key is documented in experiments/common.py (`base_config`), which this returns unchanged
(but for the TPU slice it names as its compile target).
"""

from common import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.target_topology = "v5p-8"  # the smallest v5p slice (4 chips), for `python -m af_next_jax.compile`
    return config
