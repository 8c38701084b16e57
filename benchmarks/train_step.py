"""Train-step speed: our jitted tiny-config step vs a PyTorch step of transformers' MusicFlamingo.

    python benchmarks/train_step.py [--steps 10] [--batch 4] [--seq-len 512] [--windows 8]

Same model config (the `tiny` preset, float32), same batch (synthetic, per af_next_jax/batch.py:
every row one 5 s clip + text), same optimizer (AdamW, global-norm clipping 1.0), same machine,
one process, side by side: the steps alternate, so a busy machine slows both alike. PyTorch runs
`MusicFlamingoForConditionalGeneration` (sdpa attention) forward with labels + backward +
`torch.optim.AdamW`, with 1 thread and with every core (OpenMP threads that spin-wait suffer most
on a shared machine); ours is `af_next_jax.train.train_step` (chunked cross-entropy, the debug
experiment's optimizer). The speed-up is against the faster PyTorch. Prints the markdown table
recorded in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time

import numpy as np


def _interleaved_median_seconds(steps_by_name: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Median wall time, process CPU time and page faults of each step function, alternating them so
    both see the same machine load. CPU time counts every thread of this process (PyTorch's spinning
    OpenMP threads too); on a shared machine it is the steadier of the two. Minor page faults are
    memory the step touched fresh from the kernel (af_next_jax/xla_cpu_options.py explains why
    they matter)."""
    for step in steps_by_name.values():  # compile / warm up
        step()
        step()
    wall, cpu, faults = ({name: [] for name in steps_by_name} for _ in range(3))
    for _ in range(repeats):
        for name, step in steps_by_name.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            started_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            step()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - started_faults)
    median = lambda times: {name: float(np.median(values)) for name, values in times.items()}  # noqa: E731
    return median(wall), median(cpu), median(faults)


def build_jax_train_step(config, batch):
    """(jitted train_step, initial state, batch with the micro-batch axis): what `make_jax_step` times. The
    step is the debug experiment's, shaped like `batch`, built by the trainer's own builder on one CPU
    device (af_next_jax/experiment/program.py)."""
    import jax

    from af_next_jax.experiment import build_program, experiment_from, load_config

    rows, seq_len = batch["token_ids"].shape
    experiment = experiment_from(load_config(os.path.join(os.path.dirname(__file__), "..", "experiments", "debug.py"), [
        f"--config.data.batch_size={rows}", f"--config.data.seq_len={seq_len}", "--config.total_steps=1000",
        f"--config.data.max_windows_per_batch={batch['mel_windows'].shape[0]}", "--config.mesh.fsdp=1"]))
    if experiment.model != config:
        raise ValueError(f"the debug experiment's model differs from the benchmark's: {experiment.model} vs {config}")
    program = build_program(experiment, jax.devices()[:1])
    step_batch = jax.device_put({name: value[None] for name, value in batch.items()},
                                {name: value.sharding for name, value in program.step_batch.items()})
    return program.train_step, program.init_state(seed=0), step_batch


def make_jax_step(config, batch):
    import jax

    train_step, state, step_batch = build_jax_train_step(config, batch)
    holder = {"state": state}

    def step():
        holder["state"], metrics = train_step(holder["state"], step_batch)
        jax.block_until_ready(metrics["loss"])

    return step


def build_torch_training(config, batch):
    """(transformers model in train mode, its inputs with labels, AdamW): what `make_torch_step` runs."""
    import torch
    import transformers

    from af_next_jax.convert.hf_config import to_hf_config
    from af_next_jax.model.synthetic import to_transformers_inputs

    torch.manual_seed(0)
    hf_config = transformers.MusicFlamingoConfig.from_dict(to_hf_config(config))
    model = transformers.MusicFlamingoForConditionalGeneration._from_config(hf_config, attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in to_transformers_inputs(batch).items()}
    # transformers shifts labels itself: label[t + 1] = our target[t] where the loss mask is on.
    labels = np.full(batch["token_ids"].shape, -100, np.int64)
    labels[:, 1:] = np.where(batch["loss_mask"][:, :-1] > 0, batch["target_ids"][:, :-1], -100)
    inputs["labels"] = torch.from_numpy(labels)
    return model, inputs, optimizer


def make_torch_step(config, batch, threads: int):
    import torch

    model, inputs, optimizer = build_torch_training(config, batch)

    def step():
        torch.set_num_threads(threads)
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def benchmark_batch(batch_size: int, seq_len: int, windows: int):
    """(tiny config, the synthetic batch both frameworks train on)."""
    from af_next_jax.config import tiny
    from af_next_jax.model.synthetic import synthetic_batch

    config = tiny()
    per_row = max(1, windows // batch_size)
    batch = synthetic_batch(config, audio_frames_per_example=[[config.encoder.mel_frames_per_window] * per_row]
                            * batch_size, seq_len=seq_len, num_windows=windows)
    return config, batch


def add_batch_arguments(parser) -> None:
    """--batch, --seq-len, --windows: the `benchmark_batch` both train-step benchmarks time."""
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)


def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # the XLA:CPU flags and allocator settings the commands use, as measured
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    add_batch_arguments(parser)
    args = parser.parse_args(argv)

    config, batch = benchmark_batch(args.batch, args.seq_len, args.windows)
    tokens = args.batch * args.seq_len
    steps = {"jax": make_jax_step(config, batch)}
    thread_counts = sorted({1, os.cpu_count()})
    steps.update({f"torch{threads}": make_torch_step(config, batch, threads) for threads in thread_counts})
    seconds, cpu_seconds, page_faults = _interleaved_median_seconds(steps, args.steps)
    ours = seconds["jax"]
    reference = min(seconds[f"torch{threads}"] for threads in thread_counts)
    print(f"tiny preset, batch {args.batch} x {args.seq_len} tokens, {args.windows} windows of "
          f"{config.encoder.window_seconds:.0f} s; median of {args.steps} alternating steps; "
          f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
          f"Python {sys.version.split()[0]}\n")
    print("| train step | ms / step | tokens / s | speed-up | CPU ms / step | page faults / step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for threads in thread_counts:
        torch_seconds = seconds[f"torch{threads}"]
        print(f"| PyTorch transformers MusicFlamingo (sdpa, AdamW), {threads} thread(s) | "
              f"{1e3 * torch_seconds:.0f} | {tokens / torch_seconds:,.0f} | {reference / torch_seconds:.2f}x | "
              f"{1e3 * cpu_seconds[f'torch{threads}']:.0f} | {page_faults[f'torch{threads}']:,.0f} |")
    print(f"| af-next-jax `train_step` (jit, chunked CE, AdamW), XLA threads | {1e3 * ours:.0f} | "
          f"{tokens / ours:,.0f} | {reference / ours:.2f}x | {1e3 * cpu_seconds['jax']:.0f} | "
          f"{page_faults['jax']:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
