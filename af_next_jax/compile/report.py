"""What a compiled step costs on one device: memory by kind, FLOPs, collectives (from the HLO text)."""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import jax
import numpy as np

from af_next_jax.compile.topology import GIB

# Collective kinds as XLA spells them; the async "-start" halves are counted, their "-done" are not.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_OP = re.compile(r"=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                 r"(?P<kind>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


@dataclasses.dataclass
class MemoryTable:
    parameters: int
    optimizer_state: int
    batch: int
    temporaries: int
    total: int                 # the compiled program's peak per device
    hbm: int

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    def rows(self) -> list[tuple[str, int]]:
        return [("parameters", self.parameters), ("optimizer state", self.optimizer_state), ("batch", self.batch),
                ("temporaries", self.temporaries), ("total", self.total), ("HBM", self.hbm)]


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def memory_table(step, hbm_bytes: int) -> MemoryTable:
    analysis = step.compiled.memory_analysis()
    peak = getattr(analysis, "peak_memory_in_bytes", 0) or 0
    # Donated inputs alias their outputs: argument + output - alias is what lives outside temporaries.
    live = analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    total = max(peak, live + analysis.temp_size_in_bytes + analysis.generated_code_size_in_bytes)
    return MemoryTable(parameters=bytes_per_device(step.inputs["parameters"]),
                       optimizer_state=bytes_per_device(step.inputs["optimizer state"]),
                       batch=bytes_per_device(step.inputs["batch"]), temporaries=analysis.temp_size_in_bytes,
                       total=total, hbm=hbm_bytes)


def collective_ops(hlo_text: str) -> list[tuple[str, int, str]]:
    """(kind, bytes of its result, the result's shape text) of every collective in the HLO text."""
    ops = []
    for match in _OP.finditer(hlo_text):
        size = sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
                   for dtype, dims in _ARRAY.findall(match.group("shape")))
        ops.append((match.group("kind"), size, match.group("shape")))
    return ops


def collective_summary(hlo_text: str) -> dict[str, tuple[int, int]]:
    """{kind: (ops, bytes of their results)} over the HLO text. Static: an op inside a loop (the scanned
    layers, the ring steps) counts once, so this is per loop body, not per step."""
    summary = collections.defaultdict(lambda: [0, 0])
    for kind, size, _ in collective_ops(hlo_text):
        summary[kind][0] += 1
        summary[kind][1] += size
    return {kind: tuple(summary[kind]) for kind in COLLECTIVES if kind in summary}


def xla_flops(step) -> float | None:
    """XLA's FLOP count of the compiled program, per device (None when the backend gives none)."""
    costs = step.compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, (list, tuple)) else costs
    return float(costs["flops"]) if costs and "flops" in costs else None


def gib(value: int) -> str:
    """GiB, or MiB below one GiB (the debug models are megabytes)."""
    return f"{value / GIB:8.2f} GiB" if value >= GIB else f"{value / 2**20:8.1f} MiB"


def format_memory(tables: dict[str, MemoryTable]) -> str:
    names = list(tables)
    lines = ["per device        " + "".join(f"{name:>14}" for name in names)]
    for index, (label, _) in enumerate(next(iter(tables.values())).rows()):
        lines.append(f"{label:<18}" + "".join(f"{gib(tables[name].rows()[index][1]):>14}" for name in names))
    return "\n".join(lines)


def knobs(config, mesh_sizes: dict) -> list[str]:
    """What would make a step fit, as the flags that change it."""
    data = config.data
    shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
    rows = data.batch_size // max(shards, 1)
    hints = []
    if config.model.remat_policy != "full":
        hints.append(f"remat policy: --config.model.remat_policy=full (now {config.model.remat_policy!r})")
    if rows > 1:
        hints.append(f"batch per device: {rows} rows of {data.seq_len} tokens; halve it with "
                     f"--config.data.batch_size={data.batch_size // 2} "
                     f"--config.grad_accum_steps={config.grad_accum_steps * 2} (same global batch)")
    else:
        hints.append(f"batch per device: already {rows} row of {data.seq_len} tokens (--config.data.batch_size); "
                     f"shorten --config.data.seq_len or shard the sequence (ring / ulysses)")
    hints.append(f"fsdp / sequence-parallel degree: fsdp={mesh_sizes['fsdp']}, ring={mesh_sizes['ring']}, "
                 f"ulysses={mesh_sizes['ulysses']}; a larger topology (--topology) or --config.mesh.ring=N shards "
                 f"parameters and activations further")
    hints.append(f"windows per batch: --config.data.max_windows_per_batch (now {data.max_windows_per_batch})")
    return hints
