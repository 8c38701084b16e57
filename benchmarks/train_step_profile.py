"""Where the training step's time goes: our compiled step and the PyTorch step, part by part.

    python benchmarks/train_step_profile.py [--steps 5] [--batch 4] [--seq-len 512] [--windows 8]

The same model, batch and optimizer as benchmarks/train_step.py. Ours: a `jax.profiler` trace of the
jitted `train_step`; every executed XLA:CPU kernel (a fusion, a dot, a copy: one thunk) is one event
named after its HLO instruction, mapped to the model part that emitted it through the compiled HLO's
`op_name` metadata (flax module paths, plus the named scopes "attention" in
attention/dispatch.py and "cross_entropy" in train/loss.py). PyTorch: `torch.profiler` on the
transformers step, with a `record_function` range per module (forward hooks); each backward autograd
node is charged to the part whose forward op created it (matched by sequence number). Prints two
markdown tables (recorded in docs/PERFORMANCE.md): milliseconds per step by part and phase, and our
largest kernels ("fusion boundaries": how many separate kernels each part runs per step).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_step import add_batch_arguments, benchmark_batch, build_jax_train_step, build_torch_training  # noqa: E402

# (part, patterns on the HLO op_name / torch module path), first match wins. One list for both
# frameworks so the rows mean the same thing on both sides.
PARTS = (
    ("loss: lm_head + cross-entropy", ("cross_entropy", "lm_head", "loss")),
    ("encoder attention: scores, softmax, weighted sum",
     ("encoder.*/attention/", r"audio_tower\.layers\.\d+\.self_attn$")),
    ("encoder attention projections q/k/v/out",
     ("encoder.*(q_proj|k_proj|v_proj|out_proj)", r"audio_tower.*self_attn\.")),
    ("encoder MLP fc1/GELU/fc2", ("encoder.*(fc1|fc2)", r"audio_tower.*(fc1|fc2|activation_fn)")),
    ("encoder LayerNorms", ("encoder.*layer_norm", r"audio_tower.*layer_norm")),
    ("encoder convolutions", ("encoder.*conv", r"audio_tower\.conv")),
    ("encoder other: positions, residuals, pool", ("encoder", "audio_tower")),
    ("RoTE, projector, audio merge, embedding", ("projector", "encode_audio_windows", "embed_audio_and_text",
                                                 "multi_modal_projector", "embed_tokens", "rotary_time", "pos_emb")),
    ("decoder attention: scores, mask, softmax, weighted sum",
     ("decoder.*/attention/", r"language_model\.layers\.\d+\.self_attn$")),
    ("decoder attention projections q/k/v/o",
     ("decoder.*(q_proj|k_proj|v_proj|o_proj)", r"language_model.*self_attn\.")),
    ("decoder MLP gate/up/SiLU/down", ("decoder.*(gate_proj|up_proj|down_proj)", r"language_model.*mlp")),
    ("decoder RMSNorms", ("decoder.*(layernorm|/norm)", r"language_model.*(layernorm|norm$)")),
    ("decoder other: RoPE, residuals", ("decoder", "language_model")),
)
OPTIMIZER = "optimizer: clipping, AdamW, non-finite guard"
UNATTRIBUTED = "other (scan bookkeeping, batch plumbing)"
ROW_ORDER = [name for name, _ in PARTS] + [OPTIMIZER, UNATTRIBUTED]
CONTAINER_OPCODES = ("while", "conditional", "call")


def part_of(name: str) -> str | None:
    for part, patterns in PARTS:
        if any(re.search(pattern, name) for pattern in patterns):
            return part
    return None


# ---------------------------------------------------------------------------------------------- ours

def hlo_instructions(hlo_text: str) -> dict:
    """HLO instruction name -> (opcode, op_name metadata, result shape) of a compiled module's text."""
    pattern = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\S+|\(.*?\)) ([a-z][\w\-]*)\((.*)$")
    instructions = {}
    for line in hlo_text.splitlines():
        match = pattern.match(line)
        if match:
            name, shape, opcode, rest = match.groups()
            op_name = re.search(r'op_name="([^"]*)"', rest)
            instructions[name] = (opcode, op_name.group(1) if op_name else "", shape)
    return instructions


def jax_part(op_name: str) -> tuple[str, str]:
    """(part, phase) of one XLA kernel from its op_name: phase from JAX's jvp/transpose name stack."""
    if "transpose(" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    else:
        return (OPTIMIZER if op_name else UNATTRIBUTED), "update"
    return part_of(op_name) or UNATTRIBUTED, phase


def profile_jax(config, batch, steps: int):
    """({(part, phase): ms per step}, {(part, phase): kernels per step}, top kernels, step ms)."""
    import time

    import jax
    from jax.profiler import ProfileData

    train_step, state, step_batch = build_jax_train_step(config, batch)
    instructions = hlo_instructions(train_step.lower(state, step_batch).compile().as_text())
    for _ in range(3):
        state, metrics = train_step(state, step_batch)
        jax.block_until_ready(metrics)
    trace_dir = tempfile.mkdtemp(prefix="train_step_profile_")
    jax.profiler.start_trace(trace_dir)
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, step_batch)
        jax.block_until_ready(metrics)
    step_ms = 1e3 * (time.perf_counter() - started) / steps
    jax.profiler.stop_trace()
    (trace_file,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    milliseconds, kernels = collections.Counter(), collections.Counter()
    per_kernel = collections.Counter()
    for plane in ProfileData.from_file(trace_file).planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "train_step" not in str(stats.get("hlo_module", "")) or "hlo_op" not in stats:
                    continue
                opcode, op_name, shape = instructions.get(stats["hlo_op"], ("?", "", ""))
                if opcode in CONTAINER_OPCODES:  # its body's kernels are events of their own
                    continue
                key = jax_part(op_name)
                milliseconds[key] += event.duration_ns / 1e6 / steps
                kernels[key] += 1 / steps
                per_kernel[(stats["hlo_op"], opcode, shape, key)] += event.duration_ns / 1e6 / steps
    return milliseconds, kernels, per_kernel, step_ms


# ------------------------------------------------------------------------------------------- PyTorch

def profile_torch(config, batch, steps: int, threads: int):
    """({(part, phase): ms per step}, step ms): forward ops by their module's range, backward nodes
    by the forward op that recorded them, optimizer by its own range."""
    import time

    import torch
    from torch.autograd import profiler as autograd_profiler

    torch.set_num_threads(threads)
    model, inputs, optimizer = build_torch_training(config, batch)
    ranges = {}

    def enter(name):
        def hook(module, args):
            ranges[name] = autograd_profiler.record_function(f"part::{name}")
            ranges[name].__enter__()
        return hook

    def leave(name):
        def hook(module, args, output):
            ranges.pop(name).__exit__(None, None, None)
        return hook

    for name, module in model.named_modules():
        if name:
            module.register_forward_pre_hook(enter(name))
            module.register_forward_hook(leave(name))
    loss_function = model.loss_function

    def loss_with_range(*args, **kwargs):
        with autograd_profiler.record_function("part::loss"):
            return loss_function(*args, **kwargs)

    model.loss_function = loss_with_range

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        with autograd_profiler.record_function("part::optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()

    for _ in range(2):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        step_ms = 1e3 * (time.perf_counter() - started) / steps
    events = prof.events()

    def enclosing_part(event) -> str | None:
        while event is not None:
            if event.name.startswith("part::"):
                return event.name[len("part::"):]
            event = event.cpu_parent
        return None

    def is_top_op(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if not parent.name.startswith("part::"):
                return False
            parent = parent.cpu_parent
        return True

    milliseconds = collections.Counter()
    part_by_sequence = {}
    for event in events:
        if event.name.startswith("part::") or event.name.startswith("autograd::engine"):
            continue
        if not is_top_op(event):
            continue
        module_path = enclosing_part(event)
        if module_path == "optimizer":
            key = (OPTIMIZER, "update")
        elif module_path is None:
            key = (UNATTRIBUTED, "forward")
        else:
            key = (part_of(module_path) or UNATTRIBUTED, "forward")
        milliseconds[key] += event.cpu_time_total / 1e3 / steps
    for event in events:  # the op that records an autograd node may sit inside a composite (linear -> addmm)
        module_path = enclosing_part(event)
        if event.sequence_nr >= 0 and module_path not in (None, "optimizer"):
            part_by_sequence[event.sequence_nr] = part_of(module_path) or UNATTRIBUTED
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function") and event.cpu_parent is None:
            backward_node = next((child for child in event.cpu_children if child.sequence_nr >= 0), None)
            part = part_by_sequence.get(backward_node.sequence_nr if backward_node else -1, UNATTRIBUTED)
            milliseconds[(part, "backward")] += event.cpu_time_total / 1e3 / steps
    return milliseconds, step_ms


# ---------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # the XLA:CPU flags and allocator settings the commands use, as measured
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    add_batch_arguments(parser)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--top", type=int, default=15, help="how many of our largest kernels to list")
    args = parser.parse_args(argv)

    config, batch = benchmark_batch(args.batch, args.seq_len, args.windows)
    jax_ms, jax_kernels, per_kernel, jax_step_ms = profile_jax(config, batch, args.steps)
    top_kernels = per_kernel.most_common(args.top)
    torch_ms, torch_step_ms = ({}, float("nan")) if args.skip_torch else profile_torch(
        config, batch, args.steps, args.torch_threads)
    print(f"batch {args.batch} x {args.seq_len} tokens, {args.windows} windows; mean of {args.steps} profiled steps; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; PyTorch {args.torch_threads} thread(s)\n")
    print("| part | ours fwd ms | ours bwd ms | ours kernels / step | PyTorch fwd ms | PyTorch bwd ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    totals = collections.Counter()
    for part in ROW_ORDER:
        # The optimizer (and any kernel outside the model) runs once per step: shown in the forward column.
        ours = [jax_ms.get((part, "forward"), 0.0) + jax_ms.get((part, "update"), 0.0),
                jax_ms.get((part, "backward"), 0.0)]
        theirs = [torch_ms.get((part, "forward"), 0.0) + torch_ms.get((part, "update"), 0.0),
                  torch_ms.get((part, "backward"), 0.0)]
        count = sum(jax_kernels.get((part, phase), 0.0) for phase in ("forward", "backward", "update"))
        for name, value in zip(("of", "ob", "tf", "tb"), ours + theirs):
            totals[name] += value
        totals["kernels"] += count
        print(f"| {part} | {ours[0]:.1f} | {ours[1]:.1f} | {count:.0f} | {theirs[0]:.1f} | {theirs[1]:.1f} |")
    print(f"| **sum of kernels / ops** | {totals['of']:.1f} | {totals['ob']:.1f} | {totals['kernels']:.0f} | "
          f"{totals['tf']:.1f} | {totals['tb']:.1f} |")
    print(f"| **wall time per step (profiler on)** | {jax_step_ms:.1f} | | | {torch_step_ms:.1f} | |")
    print("\nOur largest kernels (ms per step):\n")
    print("| kernel | opcode | result shape | part, phase | ms |")
    print("| --- | --- | --- | --- | ---: |")
    for (name, opcode, shape, (part, phase)), ms in top_kernels:
        print(f"| {name} | {opcode} | `{shape}` | {part}, {phase} | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
