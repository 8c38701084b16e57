"""Compile time of the tiny model's forward+backward vs depth, with nn.scan and with unrolled layers.

    python benchmarks/compile_time.py [--depths 2 16]

Scan compiles one layer body whatever the depth; unrolled layers compile every layer. Prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import jax
import jax.numpy as jnp

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import synthetic_batch


def compile_seconds(num_layers: int, scan: bool) -> float:
    base = tiny(scan_layers=scan)
    config = base.replace(encoder=dataclasses.replace(base.encoder, num_layers=num_layers),
                          decoder=dataclasses.replace(base.decoder, num_layers=num_layers))
    batch = synthetic_batch(config, audio_frames_per_example=[[700]], seq_len=256)
    model = AFNextModel(config)
    params = jax.eval_shape(model.init, jax.random.key(0), batch)

    def loss(p):
        return jnp.mean(jnp.square(model.apply(p, batch, return_hidden=True)))

    start = time.perf_counter()
    jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    return time.perf_counter() - start


def main() -> None:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # the XLA:CPU flags and allocator settings the commands use, as measured
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 16])
    args = parser.parse_args()
    print(f"machine: {platform.machine()} CPU, {jax.device_count()} device(s), jax {jax.__version__}")
    compile_seconds(1, True)  # warm-up: the first compile in a process also pays for JAX start-up
    print("| layers (encoder + decoder each) | scan: compile s | unrolled: compile s |")
    print("| --- | --- | --- |")
    for depth in args.depths:
        print(f"| {depth} | {compile_seconds(depth, True):.1f} | {compile_seconds(depth, False):.1f} |", flush=True)


if __name__ == "__main__":
    main()
