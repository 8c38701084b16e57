"""Decoding speed: our prefill + jitted KV-cache decode loop vs transformers' `generate`, side by side.

    python benchmarks/generate.py [--batch 2] [--new-tokens 64] [--repeats 3]

Same model (the `tiny` preset, float32; random weights copied into both), same left-padded prompts
(each row one 5 s clip + text, rows of different lengths), greedy, no stop token, one process; the
runs alternate so a busy machine slows both alike. Decode tokens/s = batch x (N - 1) / (time of N new
tokens - time of 1 new token), so the prefill (and the encoder) cancel out; prefill time is timed on
its own. transformers runs `MusicFlamingoForConditionalGeneration.generate` (sdpa attention, its
dynamic cache) with 1 thread and with every core; the speed-up is against the faster.
Then the KV-cache memory of AF-Next-7B at 32K and 128K tokens, from the cache's shapes (bf16).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_seconds(functions: dict, repeats: int) -> dict:
    for function in functions.values():  # compile / warm up
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(values)) for name, values in times.items()}


def build_models(config, seed: int = 0):
    import torch
    import transformers

    from af_next_jax.convert.hf_config import to_hf_config
    from af_next_jax.convert.mapping import canonical_key, params_from_tensors

    hf_config = transformers.MusicFlamingoConfig.from_dict(to_hf_config(config))
    torch.manual_seed(seed)
    model = transformers.MusicFlamingoForConditionalGeneration._from_config(hf_config, attn_implementation="sdpa")
    model = model.eval()
    tensors = {canonical_key(k): v.numpy() for k, v in model.state_dict().items()}
    return model, params_from_tensors(tensors, config)


def prompts(config, batch_size: int, seed: int = 0) -> dict:
    from af_next_jax.model.synthetic import synthetic_batch

    frames = config.encoder.mel_frames_per_window
    batch = synthetic_batch(config, audio_frames_per_example=[[frames]] * batch_size, seq_len=512, seed=seed,
                            text_tokens_between=8)
    lengths = (batch["segment_ids"] > 0).sum(axis=1) - np.arange(batch_size) * 5  # rows of different lengths
    length = int(lengths.max())
    out = {"token_ids": np.zeros((batch_size, length), np.int32)}
    for row, n in enumerate(lengths):
        out["token_ids"][row, length - n:] = batch["token_ids"][row, 5 * row:5 * row + n]
    real = out["token_ids"] != 0
    out["segment_ids"] = real.astype(np.int32)
    out["positions"] = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
    out |= {k: batch[k] for k in ("mel_windows", "mel_valid_frames", "window_index")}
    return out


def kv_cache_table() -> list[str]:
    import jax

    from af_next_jax.config import af_next_7b
    from af_next_jax.model.decoder import empty_kv_cache

    config = af_next_7b()
    rows = ["| AF-Next-7B KV cache (bf16, batch 1) | bytes | GiB |", "| --- | ---: | ---: |"]
    for tokens in (32 * 1024, 128 * 1024):
        shapes = jax.eval_shape(lambda: empty_kv_cache(config.decoder, batch_size=1, max_length=tokens,
                                                       dtype=config.compute_dtype))
        nbytes = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
        rows.append(f"| {tokens // 1024}K tokens | {nbytes:,} | {nbytes / 2**30:.2f} |")
    d = config.decoder
    rows.append(f"\n(per token: 2 x {d.num_layers} layers x {d.num_kv_heads} KV heads x {d.head_dim} x 2 bytes "
                f"= {2 * d.num_layers * d.num_kv_heads * d.head_dim * 2:,} bytes, + 4 bytes of segment id)")
    return rows


def main() -> None:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # the XLA:CPU flags and allocator settings the commands use, as measured
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import torch

    from af_next_jax.config import tiny
    from af_next_jax.inference.decoding import Generator
    from af_next_jax.model.synthetic import to_transformers_inputs

    config = tiny()
    hf_model, params = build_models(config)
    params = jax.device_put(params)
    batch = prompts(config, args.batch)
    torch_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in to_transformers_inputs(batch).items()}
    generator = Generator(config)
    n = args.new_tokens

    def ours(tokens):
        return lambda: generator.generate(params, batch, max_new_tokens=tokens)

    def theirs(tokens, threads):
        def run():
            torch.set_num_threads(threads)
            with torch.no_grad():
                hf_model.generate(**torch_inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
        return run

    prompt_length = batch["token_ids"].shape[1]

    def our_prefill():
        logits, _ = generator.prefill(params, batch, max_length=prompt_length + n)
        jax.block_until_ready(logits)

    def their_prefill(threads):
        def run():
            torch.set_num_threads(threads)
            with torch.no_grad():
                hf_model(**torch_inputs)
        return run

    cores = os.cpu_count()
    functions = {"ours_n": ours(n), "ours_1": ours(1), "ours_prefill": our_prefill}
    for threads in sorted({1, cores}):
        functions |= {f"hf{threads}_n": theirs(n, threads), f"hf{threads}_1": theirs(1, threads),
                      f"hf{threads}_prefill": their_prefill(threads)}
    seconds = median_seconds(functions, args.repeats)
    decoded = args.batch * (n - 1)
    rate = {"ours": decoded / (seconds["ours_n"] - seconds["ours_1"])}
    for threads in sorted({1, cores}):
        rate[f"hf{threads}"] = decoded / (seconds[f"hf{threads}_n"] - seconds[f"hf{threads}_1"])
    best_hf = max(v for k, v in rate.items() if k != "ours")
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}; tiny preset, batch {args.batch}, prompt {prompt_length} tokens "
          f"(left-padded), {n} new tokens, median of {args.repeats}\n")
    print("| decoder | decode tokens/s | prefill ms |")
    print("| --- | ---: | ---: |")
    print(f"| ours (jit prefill + while_loop decode) | {rate['ours']:.0f} | {1e3 * seconds['ours_prefill']:.1f} |")
    for threads in sorted({1, cores}):
        print(f"| transformers generate, {threads} thread(s) | {rate[f'hf{threads}']:.0f} | "
              f"{1e3 * seconds[f'hf{threads}_prefill']:.1f} |")
    print(f"\nspeed-up (decode, vs the faster transformers): {rate['ours'] / best_hf:.1f}x\n")
    print("\n".join(kv_cache_table()))


if __name__ == "__main__":
    main()
