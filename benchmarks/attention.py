"""Attention speed on a GPU: the Pallas kernel vs cuDNN, XLA and tokamax (causal, bf16, head_dim 128).

Times the forward and the forward+backward at 4K-32K tokens, with batch x heads sized to fill the
chip, and prints TFLOP/s (causal FLOPs counted as half of the full matrix) and the ratio to cuDNN.
Needs a GPU: elsewhere it says so and exits 0.

    python benchmarks/attention.py [--lengths 4096 8192 16384 32768] [--tokens 65536]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 28, 4, 128  # the AF-Next decoder (Qwen2.5-7B)


def implementations():
    from af_next_kernels.flash_attention import flash_attention
    table = {
        "pallas": lambda q, k, v: flash_attention(q, k, v, causal=True, backend="gpu"),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
    }
    try:
        import tokamax
        table["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True)
    except ImportError:
        print("tokamax not importable: skipped")
    return table


def attention_flops(batch, length, with_backward):
    forward = 4 * batch * NUM_HEADS * length * length * HEAD_DIM / 2  # two matmuls, causal half
    return forward * (3.5 if with_backward else 1.0)  # backward: 5 matmuls to the forward's 2


def median_seconds(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(attention, batch, length, with_backward, repeats):
    keys = jax.random.split(jax.random.key(0), 3)
    query = jax.random.normal(keys[0], (batch, length, NUM_HEADS, HEAD_DIM), jnp.bfloat16)
    key = jax.random.normal(keys[1], (batch, length, NUM_KV_HEADS, HEAD_DIM), jnp.bfloat16)
    value = jax.random.normal(keys[2], (batch, length, NUM_KV_HEADS, HEAD_DIM), jnp.bfloat16)
    if with_backward:
        loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32))
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    else:
        fn = jax.jit(attention)
    return median_seconds(fn, (query, key, value), repeats)


def main():
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # the XLA:CPU flags and allocator settings the commands use, as measured
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=65536, help="batch x length per measurement")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        print(f"benchmarks/attention.py needs a GPU (default backend is {jax.default_backend()!r}); "
              "nothing measured.")
        return 0
    device = jax.devices()[0]
    print(f"{device.device_kind}, jax {jax.__version__}; causal, bf16, {NUM_HEADS} heads / "
          f"{NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}")
    print("| pass | tokens | batch | implementation | ms | TFLOP/s | vs cuDNN |")
    print("|---|---:|---:|---|---:|---:|---:|")
    table = implementations()
    for with_backward in (False, True):
        for length in args.lengths:
            batch = max(1, args.tokens // length)
            results = {}
            for name, attention in table.items():
                try:
                    results[name] = benchmark(attention, batch, length, with_backward, args.repeats)
                except Exception as error:  # an OOM (XLA at 32K) or an unsupported shape: report, go on
                    print(f"| {'fwd+bwd' if with_backward else 'fwd'} | {length} | {batch} | {name} | "
                          f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]} | | |")
            for name, seconds in results.items():
                tflops = attention_flops(batch, length, with_backward) / seconds / 1e12
                ratio = (f"{results['cudnn'] / seconds:.2f}x" if "cudnn" in results else "n/a")
                print(f"| {'fwd+bwd' if with_backward else 'fwd'} | {length} | {batch} | {name} | "
                      f"{seconds * 1e3:.2f} | {tflops:.0f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
