"""The command line of `python -m af_next_jax.compile` (see __main__.py)."""

from __future__ import annotations

import argparse
import sys

from af_next_jax.compile import hlo_counts, report
from af_next_jax.compile.topology import parse_topology, topology_devices
from af_next_jax.experiment.program import step_flops
from af_next_jax.process_setup import compile_only_libtpu


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m af_next_jax.compile", description=__doc__)
    parser.add_argument("--config", required=True, help="experiments/NAME.py or experiments/NAME.py:ARG")
    parser.add_argument("--topology", default="", help="v5p-8 ... v5p-12288, v5e-N, v6e-N, v4-N "
                        "(default: the experiment's config.target_topology)")
    parser.add_argument("--slices", type=int, default=0, help="multislice: slices of the topology "
                        "(default: the experiment's config.target_slices, else 1)")
    parser.add_argument("--no-eval", action="store_true", help="compile the train step only")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unknown arguments {unknown}; overrides look like --config.data.batch_size=8")
    args.overrides = [a[len("--config."):] for a in rest]
    return args


def run(args, out=sys.stdout) -> int:
    from af_next_jax.compile.steps import compile_experiment
    from af_next_jax.experiment import experiment_from, load_config

    config = load_config(args.config, args.overrides)
    target = experiment_from(config).target
    name = args.topology or target.topology
    if not name:
        raise ValueError(f"{args.config} declares no target_topology; pass --topology (e.g. --topology v5p-8)")
    topology = parse_topology(name, args.slices or target.slices)
    mesh_slices = experiment_from(config).mesh.num_slices
    if mesh_slices != topology.slices:
        raise ValueError(f"the mesh's DCN axes make {mesh_slices} slices but the topology has {topology.slices}; "
                         f"set --slices {mesh_slices}, or multiply the dcn_* sizes to {topology.slices} "
                         f"(e.g. --config.mesh.dcn_fsdp={topology.slices})")
    compile_only_libtpu(topology.name)  # no libtpu start-up errors on a host without a TPU
    devices = topology_devices(topology)
    print(f"compiling {args.config} for {topology.describe()}", file=out)
    result = compile_experiment(config, devices, with_eval=not args.no_eval)
    return print_report(config, topology, result, out)


def print_report(config, topology, result, out=sys.stdout) -> int:
    """The memory table, FLOPs, collectives and compile times; 1 when a step does not fit, else 0."""
    steps = [s for s in (result.train, result.eval) if s is not None]
    print(f"mesh: {', '.join(f'{k}={v}' for k, v in result.mesh_sizes.items() if v > 1) or 'one device'}", file=out)
    if result.program.feeding is not None:
        processes = len({p for group in result.program.feeding.groups for p in group.processes})
        print(f"{processes} processes (hosts); {result.program.feeding.describe()}", file=out)
    tables = {step.name: report.memory_table(step, topology.hbm_bytes) for step in steps}
    print(report.format_memory(tables), file=out)
    train_hlo = result.train.compiled.as_text()
    counted = hlo_counts.count(train_hlo)
    analytic = step_flops(result.program.experiment, attention=False) / topology.devices_total
    print(f"train step matmul FLOPs per device: HLO {counted.matmul_flops:.3e} (loops x trip counts), analytic "
          f"{analytic:.3e} without the attention cores (on TPU and GPU they run in Pallas kernels, which the HLO "
          f"cannot see); "
          f"HLO / analytic = {counted.matmul_flops / analytic:.2f} (remat's recompute)", file=out)
    for step in steps:
        hlo = train_hlo if step is result.train else step.compiled.as_text()
        per_step = counted.collective_bytes if step is result.train else hlo_counts.count(hlo).collective_bytes
        print(f"{step.name} step collectives (ops in the HLO; MiB moved per step, loops x trip counts):", file=out)
        summary = report.collective_summary(hlo)
        for kind, (count, _) in summary.items():
            print(f"  {kind:<20}{count:6d} ops {per_step.get(kind, 0) / 2**20:12.1f} MiB", file=out)
        if not summary:
            print("  none", file=out)
        print(f"{step.name} step compile time: {step.seconds:.1f} s", file=out)
    over = [name for name, table in tables.items() if not table.fits]
    if over:
        print(f"DOES NOT FIT: the {' and '.join(over)} step needs more than the {topology.hbm_bytes / 2**30:.0f} "
              f"GiB of HBM per chip. Knobs:", file=out)
        for hint in report.knobs(config, result.mesh_sizes):
            print(f"  - {hint}", file=out)
        return 1
    print(f"fits: {max(t.total for t in tables.values()) / 2**30:.2f} of {topology.hbm_bytes / 2**30:.0f} GiB "
          f"per chip", file=out)
    return 0


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as error:  # bad input: one line, no traceback
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
