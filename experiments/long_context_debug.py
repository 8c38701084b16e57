"""long_context_debug: the long-context stage scaled down to run on 8 (fake) CPU devices.

The tiny model with hybrid sequence parallelism (Ulysses 2 x ring 2 over the decoder sequence,
FSDP 2), full remat, the `long_context` stage. Run it on a CPU with 8 fake devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m af_next_jax.train \\
        --config experiments/long_context_debug.py --workdir /tmp/long_debug
"""

from common import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.model.update(dict(attention_kernel="auto", sequence_parallelism="hybrid", remat_policy="full"))
    config.stage = "long_context"
    config.data.update(dict(seq_len=1024, batch_size=2, max_windows_per_batch=8))
    config.mesh.update(dict(data=1, fsdp=2, ring=2, ulysses=2))
    config.target_topology = "v5p-16"  # 8 chips: `python -m af_next_jax.compile` compiles for it
    config.loss_chunk_length = 256
    config.total_steps = 20
    config.eval_every = 10
    config.checkpoint_every = 10
    return config
