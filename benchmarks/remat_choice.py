"""The remat policy and micro-batch of each 7B stage, chosen from what libtpu compiled.

    python benchmarks/scaling.py --recompile NAME --set model.remat_policy=POLICY [grad_accum_steps=N]

compiles a candidate for the stage's target and keeps it in benchmarks/compiled_memory.json
("candidates"); the page (docs/SCALING.md) lists every candidate beside the stage's figures before
the sharded audio merge (the replicated one). The rule: the cheapest policy in compute (`none` <
`dots` < `dots_with_no_batch_dims` < `save_attention_out` < `full`) and the fewest accumulated
micro-batches whose allocated memory leaves at least SPARE of HBM free. "HLO / analytic" is the
compiled step's matmul FLOPs (loops counted by their trip counts, `af_next_jax.compile.hlo_counts`)
over the analytic count of the useful ones (`af_next_jax.train.flops`), both without the attention
cores (they run inside Pallas kernels, which the HLO cannot see): the recompute factor of the matmuls.
What `full` also recomputes and `save_attention_out` does not, the attention core's forward, is not in it.
"Code" is the commit each row was compiled at: rows of older code are kept for the choice they made,
not as today's figures.
"""

from __future__ import annotations

SPARE = 0.10
OLDER = "before da69e28"   # records compiled before commits were kept (the unrolled ring, per-chunk lm_head)
COST_ORDER = ("none", "dots", "dots_with_no_batch_dims", "save_attention_out", "full")


def _gib(value: float) -> str:
    return f"{value / 2**30:.1f}"


def fits_with_spare(record: dict, allocated) -> bool:
    return allocated(record["train"]) <= (1 - SPARE) * record["hbm_bytes"]


def flops_ratio(record: dict) -> str:
    flops = record.get("flops") or {}
    return f"{flops['hlo_matmul'] / flops['analytic_matmul']:.2f}" if flops.get("analytic_matmul") else "-"


def section(cache: dict, experiments: list[str], allocated) -> str:
    """Per stage: the replicated merge's figures, then every candidate compiled with the sharded merge
    (the chosen one, the experiment's own settings, in bold)."""
    lines = ["## Remat and micro-batch, chosen from the compiler", "",
             "Each candidate is compiled with `python benchmarks/scaling.py --recompile NAME --set KEY=VALUE ...`, "
             "which " + __doc__.split("\n\n", 2)[2].replace("\n", " ").strip(), "",
        "| experiment | audio merge | remat | micro-batches x rows | XLA live peak | allocated | "
        f"fits with {SPARE:.0%} spare | HLO / analytic FLOPs | code |", "|---|---|---|---:|---:|---:|---|---:|---|"]
    for name in experiments:
        before = cache.get("before_merge", {}).get(name)
        if before:
            lines.append(f"| {name} | replicated (before) | {before['remat_policy']} | "
                         f"{before['grad_accum_steps']} x {before['batch_size']} | "
                         f"{_gib(before['train']['peak_memory_in_bytes'])} | {_gib(allocated(before['train']))} | "
                         f"{'yes' if fits_with_spare(before, allocated) else 'no'} | - | "
                         f"{before.get('commit', OLDER)} |")
        records = [(key, record) for key, record in cache.get("candidates", {}).items() if key.split()[0] == name]
        chosen = cache["tpu"].get(name)
        if chosen:
            records.append((name, chosen))
        records.sort(key=lambda item: (COST_ORDER.index(item[1]["remat_policy"]), item[1]["grad_accum_steps"]))
        for key, record in records:
            mark = "**" if key == name else ""
            lines.append(f"| {name} | sharded | {mark}{record['remat_policy']}{mark} | "
                         f"{record['grad_accum_steps']} x {record['batch_size']} | "
                         f"{_gib(record['train']['peak_memory_in_bytes'])} | {_gib(allocated(record['train']))} | "
                         f"{'yes' if fits_with_spare(record, allocated) else '**no**'} | {flops_ratio(record)} | "
                         f"{record.get('commit', OLDER)} |")
    return "\n".join(lines)
