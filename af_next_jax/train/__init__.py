"""The trainer: experiment configs, optimizer, chunked loss, the sharded train step, checkpoints, the loop.

    python -m af_next_jax.train --config experiments/debug.py --workdir /tmp/run [--config.key=value ...]
"""
