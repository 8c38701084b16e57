"""Launching the long-context debug experiment with rows split across processes (row groups), and the
single-process reference with the same total mesh (imported by tests/train/test_split_rows*.py)."""

from __future__ import annotations

import os

from trainer_helpers import cpu_environment, free_port, slurm_environment, start_processes, train_command, wait_all

EXPERIMENT = "experiments/long_context_debug.py"
TIMEOUT = 900
# Every layout: the tiny model, hybrid sequence parallelism (the zigzag layout over the whole ring), 2 rows
# of 1024 tokens, 2 data shards (so 1 process and any grouping read the same global batches).
COMMON = ("--config.eval_every=0", "--config.log_every=1", "--config.data.shards=2", "--config.checkpoint_every=2")

# name: (mesh flags of the multi-process run, mesh flags of 1 process x 8 devices with the same sizes)
LAYOUTS = {
    # (a) the paper's layout: ring across processes (DCN), Ulysses and FSDP inside each.
    "ring_across_processes": (("--config.mesh.fsdp=2", "--config.mesh.ring=1", "--config.mesh.ulysses=2",
                               "--config.mesh.dcn_ring=2"),
                              ("--config.mesh.fsdp=2", "--config.mesh.ring=2", "--config.mesh.ulysses=2")),
    # (b) a row over both processes with no DCN axis (as a v5p row spans 8 hosts of 4 chips).
    "row_spans_both": (("--config.mesh.fsdp=1", "--config.mesh.ring=4", "--config.mesh.ulysses=2"),
                       ("--config.mesh.fsdp=1", "--config.mesh.ring=4", "--config.mesh.ulysses=2")),
    # (c) FSDP across processes, ring and Ulysses inside each: whole rows per process (groups of one).
    "whole_rows": (("--config.mesh.fsdp=1", "--config.mesh.ring=2", "--config.mesh.ulysses=2",
                    "--config.mesh.dcn_fsdp=2"),
                   ("--config.mesh.fsdp=2", "--config.mesh.ring=2", "--config.mesh.ulysses=2")),
}


def flags(demo_data: str, steps: int, *extra: str) -> list[str]:
    return [f"--config.data.dir={demo_data}", f"--config.total_steps={steps}", *COMMON, *extra]


def launch(workdir: str, root: str, name: str, processes: int, devices_per_process: int, extra: list[str],
           per_process: dict | None = None, cache: str | None = None):
    """Start `processes` trainer processes the way `srun` does (SLURM variables only); `per_process`
    {rank: [more flags]} gives one process different flags (fault injection)."""
    port = free_port(61440, 65535)
    return start_processes(
        [(train_command(workdir, extra + (per_process or {}).get(rank, []), experiment=EXPERIMENT),
          cpu_environment(devices_per_process, cache, **slurm_environment(rank, processes, port)))
         for rank in range(processes)], root, name)


def run_one_process(workdir: str, root: str, name: str, extra: list[str], cache: str | None = None) -> list[int]:
    return wait_all(start_processes([(train_command(workdir, extra, experiment=EXPERIMENT),
                                      cpu_environment(8, cache))], root, name), TIMEOUT)


def logs(root: str, name: str, count: int) -> str:
    from trainer_helpers import read_log

    return "\n\n".join(read_log(root, name, rank)[-3000:] for rank in range(count))


def workdir(root: str, name: str) -> str:
    return os.path.join(root, name)
