"""AF-Next-7B's experiments on their targets: the memory planner beside the compiler, per chip.

    python benchmarks/scaling.py                            # print the tables
    python benchmarks/scaling.py --write docs/SCALING.md    # the page (seconds: reads the cache)
    python benchmarks/scaling.py --recompile [NAME ...]     # compile again with libtpu, update the cache
    python benchmarks/scaling.py --recompile-gpu-node       # the :h100 node on fake CPU devices

Every 7B experiment (experiments/af_next_*.py) is planned for the TPU slice it declares
(`target_topology`) by benchmarks/memory_plan.py, from its own config, and shown beside what libtpu
compiled for that slice. Compiling takes minutes per experiment on a small host, so the compiled
figures are cached in benchmarks/compiled_memory.json (with the libtpu and jax versions and the
date); `--recompile` refreshes them (`python -m af_next_jax.compile` compiles the same steps).

Two compiled figures per step, both from XLA's `memory_analysis()`:
  live peak   `peak_memory_in_bytes`: the most bytes live at one point of the program (arguments
              included), from XLA's own liveness analysis; what the planner models
  allocated   arguments + outputs - aliased + the temporary region + code: what the chip must hold
              (`python -m af_next_jax.compile` checks it against HBM). The temporary region is 1.1-1.7x
              the live temporaries on these targets (how the heap packs buffers of
              different lifetimes); the planner does not model that packing.

GPU meshes (`:h100`) cannot be compiled for GPUs here. `--recompile-gpu-node` compiles one 8-GPU
node of stage 3's `:h100` mesh (fsdp 8, the node's share of the batch) on 8 fake CPU devices
(`--xla_force_host_platform_device_count=8`, in a subprocess) and the page compares the planner
with it; see `GPU_NOTE` for what differs from a real GPU compile.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's backend is irrelevant: devices are libtpu's or fake

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_plan  # noqa: E402
import remat_choice  # noqa: E402
import sequence_scaling  # noqa: E402

from af_next_jax.compile.topology import GIB, parse_topology  # noqa: E402
from af_next_jax import experiment  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "benchmarks", "compiled_memory.json")
TOLERANCE = 0.10            # the planner must be within 10% of XLA's live peak on every TPU target
GPU_NODE_SPEC = "experiments/af_next_stage3_full.py:h100"
GPU_NODE_DEVICES = 8        # one H100 node: the mesh's ICI part
LONG_CONTEXT_SPEC = "af_next_stage4_long_context"


def seven_b_experiments() -> list[str]:
    return sorted(os.path.basename(path)[:-3] for path in glob.glob(os.path.join(ROOT, "experiments", "af_next_*.py")))


def load_config(name_or_spec: str, overrides=()):
    spec = name_or_spec if name_or_spec.endswith((".py",)) or ":" in name_or_spec else f"experiments/{name_or_spec}.py"
    return experiment.load_config(os.path.join(ROOT, spec), list(overrides))


def gpu_node_overrides(config) -> list[str]:
    """One node of a GPU mesh: drop the DCN (across-node) axes and keep each device's rows and windows."""
    nodes = experiment.experiment_from(config).mesh.num_slices
    return [f"mesh.dcn_{axis}=1" for axis in ("data", "fsdp", "ring", "ulysses", "tensor")] + [
        f"data.batch_size={config.data.batch_size // nodes}",
        f"data.max_windows_per_batch={config.data.max_windows_per_batch // nodes}"]


def fingerprint(config) -> str:
    """The config fields that shape the compiled step: a cached figure is stale when they change."""
    fields = {"model": config.model.to_dict(), "mesh": config.mesh.to_dict(), "stage": config.stage,
              "data": {key: config.data[key] for key in ("seq_len", "batch_size", "max_windows_per_batch")},
              "grad_accum_steps": config.grad_accum_steps, "loss_chunk_length": config.loss_chunk_length,
              "target": [config.target_topology, config.target_slices]}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def compiled_figures(step) -> dict:
    analysis = step.compiled.memory_analysis()
    figures = {name: int(getattr(analysis, name, 0) or 0) for name in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
        "generated_code_size_in_bytes", "peak_memory_in_bytes")}
    figures["compile_seconds"] = round(step.seconds, 1)
    return figures


def allocated(figures: dict) -> int:
    """What the chip holds: the report's total (af_next_jax/compile/report.py `memory_table`)."""
    live = figures["argument_size_in_bytes"] + figures["output_size_in_bytes"] - figures["alias_size_in_bytes"]
    return max(figures["peak_memory_in_bytes"],
               live + figures["temp_size_in_bytes"] + figures["generated_code_size_in_bytes"])


def load_cache(path: str = CACHE) -> dict:
    if not os.path.exists(path):
        return {"tpu": {}, "gpu_node_on_cpu": {}, "candidates": {}}
    with open(path) as file:
        cache = json.load(file)
    cache.setdefault("candidates", {})
    return cache


def save_cache(cache: dict, path: str = CACHE) -> None:
    with open(path, "w") as file:
        json.dump(cache, file, indent=1, sort_keys=True)
        file.write("\n")


def versions() -> dict:
    found = {}
    for package in ("jax", "jaxlib", "libtpu"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def source_commit() -> str:
    """The commit the compiled code comes from ("+" when the tree has changes), kept with each record so
    the page can tell figures of older code apart."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD")
    return commit + ("+" if git("status", "--porcelain", "--untracked-files=no") else "") if commit else "unknown"


def candidate_key(name: str, overrides=()) -> str:
    """The cache key of an experiment compiled with config overrides (a remat / micro-batch candidate)."""
    return " ".join([name, *overrides])


def hlo_path(hlo_dir: str, key: str) -> str:
    return os.path.join(hlo_dir, key.replace(" ", "__").replace("/", "_") + ".hlo.gz")


def analytic_matmul_flops(config, devices: int) -> float:
    """The analytic FLOPs of one train step per chip without the attention cores (they run in kernels the
    HLO cannot see): what the HLO's matmul FLOPs are compared with."""
    from af_next_jax.experiment.program import step_flops

    return step_flops(experiment.experiment_from(config), attention=False) / devices


def recount(cache: dict, hlo_dir: str) -> None:
    """Count FLOPs and collectives again from the HLO texts kept by `--recompile --keep-hlo` (no compile)."""
    from af_next_jax.compile import hlo_counts

    for section in ("tpu", "candidates"):
        for key, record in cache[section].items():
            if "flops" in record and os.path.exists(hlo_path(hlo_dir, key)):
                with gzip.open(hlo_path(hlo_dir, key), "rt") as text:
                    counts = hlo_counts.count(text.read())
                name, *overrides = key.split()
                config = load_config(name, overrides)
                devices = parse_topology(config.target_topology, config.target_slices).devices_total
                record["flops"].update(hlo_matmul=counts.matmul_flops,
                                       analytic_matmul=analytic_matmul_flops(config, devices))
                record["collective_bytes"] = counts.collective_bytes
    save_cache(cache)


def recompile_tpu(names: list[str], cache: dict, overrides=(), hlo_dir: str | None = None) -> None:
    """Compile each experiment's train step for its target; with `overrides` the figures go to
    cache["candidates"] (the experiment's own settings stay in cache["tpu"]). With `hlo_dir`, the
    compiled HLO text is kept there (gzip) for counting FLOPs and collectives again later."""
    from af_next_jax.compile import hlo_counts, report
    from af_next_jax.compile.steps import compile_experiment
    from af_next_jax.compile.topology import topology_devices

    for name in names:
        config = load_config(name, overrides)
        topology = parse_topology(config.target_topology, config.target_slices)
        key = candidate_key(name, overrides)
        print(f"compiling {key} for {topology.describe()} ...", flush=True)
        result = compile_experiment(config, topology_devices(topology), with_eval=False)
        hlo = result.train.compiled.as_text()
        counts = hlo_counts.count(hlo)
        record = {"topology": topology.name, "slices": topology.slices, "hbm_bytes": topology.hbm_bytes,
                  "train": compiled_figures(result.train), "versions": versions(), "commit": source_commit(),
                  "config_fingerprint": fingerprint(config), "date": datetime.date.today().isoformat(),
                  "remat_policy": config.model.remat_policy, "batch_size": config.data.batch_size,
                  "grad_accum_steps": config.grad_accum_steps,
                  "flops": {"xla_cost_analysis": report.xla_flops(result.train),
                            "hlo_matmul": counts.matmul_flops,
                            "analytic": result.analytic_flops / topology.devices_total,
                            "analytic_matmul": analytic_matmul_flops(config, topology.devices_total)},
                  "collective_bytes": counts.collective_bytes}
        if hlo_dir:
            os.makedirs(hlo_dir, exist_ok=True)
            with gzip.open(hlo_path(hlo_dir, key), "wt") as out:
                out.write(hlo)
        cache["candidates" if overrides else "tpu"][key] = record
        print(f"  live peak {_gib(record['train']['peak_memory_in_bytes'])}, allocated "
              f"{_gib(allocated(record['train']))}, HLO matmul FLOPs / analytic matmul FLOPs "
              f"{counts.matmul_flops / record['flops']['analytic_matmul']:.2f}", flush=True)
        save_cache(cache)


def recompile_gpu_node(cache: dict) -> None:
    """Compile the GPU node on fake CPU devices in a subprocess (the device count is fixed at jax import)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={GPU_NODE_DEVICES}")
    print(f"compiling one node of {GPU_NODE_SPEC} on {GPU_NODE_DEVICES} fake CPU devices ...", flush=True)
    output = subprocess.run([sys.executable, __file__, "--gpu-node-worker"], env=env, check=True,
                            capture_output=True, text=True).stdout
    cache["gpu_node_on_cpu"] = {GPU_NODE_SPEC: json.loads(output.strip().splitlines()[-1])}
    save_cache(cache)


def gpu_node_worker() -> None:
    import jax

    from af_next_jax.compile.steps import compile_experiment

    config = load_config(GPU_NODE_SPEC)
    overrides = gpu_node_overrides(config)
    result = compile_experiment(load_config(GPU_NODE_SPEC, overrides), jax.devices()[:GPU_NODE_DEVICES],
                                with_eval=False)
    print(json.dumps({"devices": GPU_NODE_DEVICES, "overrides": overrides, "train": compiled_figures(result.train),
                      "versions": versions(), "date": datetime.date.today().isoformat()}))


GPU_NOTE = """What differs from a GPU compile: the CPU compiler is not XLA:GPU. A CPU mesh has no Pallas
kernel, so `auto` attention runs as plain XLA: the encoder's [windows, 20, 1500, 1500] float32
scores and the decoder's blockwise attention buffers exist, and they are most of the gap to the
planner (which, like the GPU and TPU kernels, keeps attention at O(L) per layer; XLA's dump of one such
CPU compile attributes about 20 GiB of its peak to attention). Fusion and buffer assignment differ
too (no cuDNN, no latency-hiding scheduler, no NCCL buffers, no SparseCore offload of the merge's
gather), so the CPU figure bounds the GPU from above rather than predicting it. One node is compiled
with the node's share of the batch (DCN axes dropped): the data-parallel copies on other nodes hold
the same shards, but the merged audio, replicated over the whole micro-batch, is 1/nodes of the
real run's, so the planner is shown for both."""


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _mesh(sizes: dict) -> str:
    return " x ".join(f"{axis} {size}" for axis, size in sizes.items() if size > 1) or "1 device"


def plan_rows(cache: dict) -> list[dict]:
    """One row per 7B experiment: its plan for its target and the cached compiled figures."""
    rows = []
    for name in seven_b_experiments():
        config = load_config(name)
        topology = parse_topology(config.target_topology, config.target_slices)
        plan = memory_plan.plan(config, topology.devices_total)
        compiled = cache["tpu"].get(name)
        rows.append(dict(name=name, config=config, topology=topology, plan=plan, compiled=compiled,
                         sizes=experiment.experiment_from(config).mesh.axis_sizes(topology.devices_total)))
    return rows


def report(cache: dict) -> str:
    rows = plan_rows(cache)
    lines = ["| experiment | target | mesh | per chip | remat | planner | XLA live peak | planner / XLA | "
             "allocated (fits?) | compile |", "|---|---|---|---|---|---:|---:|---:|---|---:|"]
    for row in rows:
        config, plan, compiled, sizes = row["config"], row["plan"], row["compiled"], row["sizes"]
        data = config.data
        rows_per_chip = data.batch_size // (sizes["data"] * sizes["fsdp"])
        tokens = data.seq_len // (sizes["ring"] * sizes["ulysses"])
        windows = data.max_windows_per_batch // row["topology"].devices_total
        shape = f"{rows_per_chip} x {tokens} tokens, {windows} windows" + \
            (f", {config.grad_accum_steps} micro-batches" if config.grad_accum_steps > 1 else "")
        if compiled:
            train = compiled["train"]
            total = allocated(train)
            fits = "yes" if total <= row["topology"].hbm_bytes else "**no**"
            figures = (f"{_gib(train['peak_memory_in_bytes'])} | {plan.peak / train['peak_memory_in_bytes']:.2f} | "
                       f"{_gib(total)} of {row['topology'].hbm_bytes / GIB:.0f} ({fits}) | "
                       f"{train['compile_seconds']:.0f} s")
        else:
            figures = "not compiled | - | - | -"
        lines.append(f"| {row['name']} | {row['topology'].name} | {_mesh(sizes)} | {shape} | "
                     f"{config.model.remat_policy} | {_gib(plan.peak)} | {figures} |")
    lines += ["", "The planner's terms, GiB per chip (benchmarks/memory_plan.py explains each); the peak is the "
              "persistent terms plus the largest moment (its total in bold):", "",
              "| term | " + " | ".join(row["name"].removeprefix("af_next_") for row in rows) + " |",
              "|---|" + "---:|" * len(rows)]
    for term in rows[0]["plan"].persistent:
        lines.append(f"| {term} | " + " | ".join(_gib(row["plan"].persistent[term]) for row in rows) + " |")
    for phase in rows[0]["plan"].phases:
        totals = [_gib(row["plan"].phase_bytes(phase)) for row in rows]
        marked = [f"**{total}**" if row["plan"].peak_phase == phase else total for row, total in zip(rows, totals)]
        lines.append(f"| *{phase}* (with persistent) | " + " | ".join(marked) + " |")
        for term in rows[0]["plan"].phases[phase]:
            values = [row["plan"].phases[phase][term] for row in rows]
            lines.append(f"| &nbsp; {term} | " + " | ".join(_gib(v) for v in values) + " |")
    lines += ["", gpu_section(cache)]
    return "\n".join(lines)


def gpu_section(cache: dict) -> str:
    config = load_config(GPU_NODE_SPEC)
    overrides = gpu_node_overrides(config)
    node = memory_plan.plan(load_config(GPU_NODE_SPEC, overrides), GPU_NODE_DEVICES)
    sizes = experiment.experiment_from(config).mesh
    whole = memory_plan.plan(config, sizes.num_slices * GPU_NODE_DEVICES)
    lines = ["### GPU meshes", "",
             f"`{GPU_NODE_SPEC}` ({sizes.num_slices} nodes x {GPU_NODE_DEVICES} H100, 80 GiB): the planner says "
             f"{_gib(whole.peak)} GiB per GPU for the whole run, {_gib(node.peak)} GiB for one node alone "
             f"(`{' '.join('--config.' + o for o in overrides)}`)."]
    compiled = cache.get("gpu_node_on_cpu", {}).get(GPU_NODE_SPEC)
    if compiled:
        train = compiled["train"]
        lines[-1] += (f" That node compiled on {GPU_NODE_DEVICES} fake CPU devices allocates "
                      f"{_gib(allocated(train))} GiB per device (arguments + temporaries; the CPU backend's "
                      f"`peak_memory_in_bytes` counts only the arguments): planner / CPU = "
                      f"{node.peak / allocated(train):.2f} (compiled in {train['compile_seconds']:.0f} s).")
    else:
        lines[-1] += " Not compiled on fake CPU devices yet (`--recompile-gpu-node`)."
    lines += ["", GPU_NOTE]
    return "\n".join(lines)


def page(cache: dict) -> str:
    tpu = [entry for entry in cache["tpu"].values()]
    stamp = ", ".join(sorted({f"libtpu {e['versions'].get('libtpu')}, jax {e['versions'].get('jax')}, {e['date']}"
                              for e in tpu})) or "not compiled"
    return (HEADER.format(stamp=stamp, tolerance=int(TOLERANCE * 100)) + report(cache) + "\n\n"
            + remat_choice.section(cache, seven_b_experiments(), allocated) + "\n\n"
            + sequence_scaling.section(sequence_scaling.load_points()) + "\n\n" + LAUNCH
            + "\n" + feeding_section())


LONG_CONTEXT = "experiments/af_next_stage4_long_context.py"
# Stage 4's GPU mesh on 64 GPUs, as 16 nodes x 4 GPUs (its own dcn_ring 8 x dcn_fsdp 2) and as 8 x 8
# (the ring across the 8 nodes, FSDP 2 inside each).
GPU_LAYOUTS = {"16 nodes x 4 H100": (16, 4, []),
               "8 nodes x 8 H100": (8, 8, ["mesh.dcn_fsdp=1"])}


class StandInGpu:
    """A device with what the mesh and the feeding plan read: no GPU is needed to lay out a cluster.
    (A plain class: numpy would unpack a tuple or a dataclass-free sequence into fields.)"""

    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    def __init__(self, index: int, process_index: int):
        self.id, self.process_index = index, process_index


def feeding_plans() -> dict:
    """{layout: FeedingPlan} of stage 4 on its v5p-64 target (libtpu's device list) and of its :h100
    mesh on 64 stand-in GPUs with process indices, from the trainer's own Program."""
    import numpy as np

    from af_next_jax.compile.steps import compile_tool_program
    from af_next_jax.compile.topology import topology_devices
    from af_next_jax.experiment import build_program
    from af_next_jax.experiment.feeding import feeding_plan
    from af_next_jax.parallel.mesh import MESH_AXES, mesh_device_array

    config = load_config(LONG_CONTEXT)
    plans = {f"{config.target_topology} (libtpu device list)": compile_tool_program(
        config, topology_devices(parse_topology(config.target_topology))).feeding}
    for name, (nodes, per_node, overrides) in GPU_LAYOUTS.items():
        gpu = experiment.experiment_from(load_config(f"{LONG_CONTEXT}:h100", overrides))
        program = build_program(gpu, nodes * per_node, platform="gpu")  # shardings of the abstract mesh
        devices = [StandInGpu(index, index // per_node) for index in range(nodes * per_node)]
        processes = np.vectorize(lambda device: device.process_index)(mesh_device_array(gpu.mesh, devices))
        specs = {name: value.sharding.spec for name, value in program.micro_batch.items()}
        plans[f"{name} (stand-in devices)"] = feeding_plan(
            processes, program.mesh_sizes, MESH_AXES, specs["token_ids"][0], specs["mel_windows"][0],
            gpu.data.batch_size, gpu.data.max_windows_per_batch)
    return plans


def feeding_section() -> str:
    lines = ["## How stage 4 is fed", "",
             "Rows split across hosts form row groups (af_next_jax/experiment/feeding.py; docs/TRAINING.md, "
             "\"Several processes\"). The compile tool prints this for TPU targets; here for "
             f"`{LONG_CONTEXT}` on its target and on two 64-GPU clusters:", ""]
    for name, plan in feeding_plans().items():
        lines += [f"**{name}**", "", "```", plan.describe(), "```", ""]
    return "\n".join(lines)


HEADER = """# AF-Next-7B on its targets: planned and compiled memory per chip

Generated by `python benchmarks/scaling.py --write docs/SCALING.md` (do not edit by hand) from
every 7B experiment's own config, planned by `benchmarks/memory_plan.py` (its docstring explains
each term) for the TPU slice the experiment declares, beside what libtpu compiled for that slice
(`python benchmarks/scaling.py --recompile`, cached in benchmarks/compiled_memory.json; {stamp}).
"XLA live peak" is the compiler's `peak_memory_in_bytes`; the planner is held within {tolerance}% of
it (tests/compile/test_memory_plan.py), except on the three sequence-parallel stages (stage 4, Think,
Captioner), where it misses ~5.5 GiB of the backward at 32K tokens a chip (planner / XLA 0.83-0.84):
a known gap, marked as such in that test until it is attributed. "allocated" is what the chip must hold (arguments + the
temporary region, 1.1-1.7x the live temporaries here: it also pays for how the heap packs buffers of
different lifetimes, which the planner does not model), checked against HBM.
"compile" is the wall time of lowering and compiling the train step on the 2-core host that made
the cache, shared with other jobs at the time (and writing XLA dumps): an upper bound.

"""


LAUNCH = """## Multi-host launch

Every process (one per TPU host, one per 8-GPU node) runs the same training command. The trainer
joins the job before any other JAX call (`af_next_jax/train/launch.py`): it
detects SLURM, Cloud TPU / GKE and Open MPI by itself, takes `--coordinator HOST:PORT
--num-processes N --process-id I` anywhere else, and stays a single process when it finds neither.
`af_next_jax.parallel.make_mesh(mesh_config)` then lays the `dcn_*` axes across hosts (slices) and
the ICI axes inside a host: `create_hybrid_device_mesh`, grouping devices by TPU slice or, on GPUs,
by process (one process per node). Processes that hold slices of the same rows (the sequence axes
across hosts) form a row group: they read the same data and each feeds its own devices (below, "How
stage 4 is fed"). The workdir must be a filesystem that every host mounts; one job holds it at a time.

### SLURM (GPU nodes)

Stage 3 on 16 nodes x 8 H100 (`:h100`: FSDP inside a node, data parallel across the 16 nodes):

```bash
#SBATCH --nodes=16 --ntasks-per-node=1 --gpus-per-node=8 --exclusive
srun python -m af_next_jax.train --config experiments/af_next_stage3_full.py:h100 --workdir /shared/af_next/stage3_full
```

No launch flags: jax's SLURM detection reads `SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS`,
`SLURM_PROCID`, `SLURM_LOCALID`; the coordinator is the first host of the step's node list on port
61440 + job id % 4096 (`JAX_COORDINATOR_PORT` overrides it), `num_processes` = `SLURM_NTASKS`,
`process_id` = `SLURM_PROCID`. With one task per node each process drives all 8 GPUs of its node
(jax's own rule, one GPU per task, applies only with several tasks per node).
`tests/train/test_multihost.py` launches two CPU processes with exactly these variables and no flags.
Enable XLA's latency-hiding scheduler on GPU so collectives overlap compute.

Stage 4 (128K tokens, hybrid sequence parallelism; `:h100` = `h100_long`: Ulysses 4 inside a node,
the ring across 8 nodes, FSDP 2 x 2) on 16 nodes x 8 H100; on 64 GPUs, 16 nodes x 4 (`--gpus-per-node=4`),
or 8 nodes x 8 with the FSDP factor inside the nodes (`--config.mesh.dcn_fsdp=1`):

```bash
#SBATCH --nodes=16 --ntasks-per-node=1 --gpus-per-node=8 --exclusive
srun python -m af_next_jax.train --config experiments/af_next_stage4_long_context.py:h100 --workdir /shared/af_next/stage4_long_context
```

The same launch in miniature, what `tests/train/test_split_rows.py` runs in CI (two CPU processes of 4
devices, the ring across them, launched by the SLURM variables alone; each process with its own
`SLURM_PROCID`/`SLURM_LOCALID`):

```bash
SLURM_JOB_ID=1234 SLURM_STEP_NODELIST=127.0.0.1 SLURM_NTASKS=2 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 \
SLURM_STEP_NUM_NODES=1 SLURM_STEP_TASKS_PER_NODE=2 JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 \
python -m af_next_jax.train --config experiments/long_context_debug.py --workdir workdir/split_rows \
    --config.data.dir=demo_data --config.mesh.fsdp=2 --config.mesh.ring=1 --config.mesh.ulysses=2 --config.mesh.dcn_ring=2 \
    --config.data.shards=2 --config.total_steps=3 --config.eval_every=0 --config.log_every=1
```

### GKE / XPK (TPU)

Stage 3 on one v5p-256 slice (`:tpu_v5p`: FSDP over the whole slice):

```bash
xpk workload create --cluster CLUSTER --workload af-next-stage3 --tpu-type v5p-256 --num-slices 1 \\
    --command "python -m af_next_jax.train --config experiments/af_next_stage3_full.py:tpu_v5p --workdir /gcs/af_next/stage3_full"
```

Stage 4 on one v5p-64 slice (`:tpu_v5p` = `tpu_v5p_long`: ring 8 x Ulysses 4 over the 32 chips, so
every row spans all 8 hosts: one row group, below):

```bash
xpk workload create --cluster CLUSTER --workload af-next-stage4 --tpu-type v5p-64 --num-slices 1 \
    --command "python -m af_next_jax.train --config experiments/af_next_stage4_long_context.py:tpu_v5p --workdir /gcs/af_next/stage4_long_context"
```

On Cloud TPU VMs no launch flags are needed either (jax's TPU cluster detection): the coordinator is
`MEGASCALE_COORDINATOR_ADDRESS` when set (Multislice; XPK and JobSet set it to process 0's host),
else the first worker of the slice's list (`TPU_PROCESS_ADDRESSES` or `TPU_WORKER_HOSTNAMES`, else
the TPU metadata server), and each host's id is `TPU_WORKER_ID` (or metadata). With several slices
(`--num-slices N`) devices carry a `slice_index`; set the `dcn_*` sizes of `MeshConfig` to multiply
to N (e.g. `--config.mesh.dcn_fsdp=N`) so only data-parallel traffic crosses the data-centre network.

### Anywhere else, and two local processes

```bash
python -m af_next_jax.train --config experiments/af_next_stage3_full.py:h100 --workdir /shared/af_next/stage3_full --coordinator node0:12355 --num-processes 16 --process-id 0
```

on every host with its own `--process-id` (or `AF_NEXT_COORDINATOR`, `AF_NEXT_NUM_PROCESSES`,
`AF_NEXT_PROCESS_ID`). docs/TRAINING.md ("Several processes") shows two processes on one CPU machine
(gloo collectives), the commands `tests/train/test_multihost_faults.py` runs.

### Checks before a long run

- `python -m af_next_jax.compile --config EXPERIMENT` compiles exactly what the trainer will run
  (`af_next_jax.experiment.build_program`, every check included: sequence-parallel degrees, windows,
  row groups, replicated dimensions) for the target, and prints the memory table and how the data is fed.
- `python -m pytest tests/parallel tests/train/test_multihost.py tests/train/test_split_rows.py` on CPU:
  the two-process `jax.distributed` tests (sequence-parallel attention, the trainer against one process,
  rows split across processes); `-m slow tests/train/test_split_rows_slow.py` for every layout, four
  processes and the kill/preemption chain.
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", help="write the page (docs/SCALING.md) instead of printing the tables")
    parser.add_argument("--recompile", nargs="*", metavar="NAME",
                        help="compile these 7B experiments (default: all) for their targets with libtpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for --recompile (a candidate kept apart from the experiment's figures) and --recompile-sequence-scaling")
    parser.add_argument("--keep-hlo", metavar="DIR", help="with --recompile: keep each compiled HLO text here")
    parser.add_argument("--recompile-sequence-scaling", action="store_true",
                        help="compile stage 4 at 8-64 chips with the sequence grown with them (benchmarks/sequence_scaling.py)")
    parser.add_argument("--recount", metavar="DIR", help="count FLOPs and collectives again from the HLO kept in DIR")
    parser.add_argument("--recompile-gpu-node", action="store_true",
                        help=f"compile one node of {GPU_NODE_SPEC} on {GPU_NODE_DEVICES} fake CPU devices")
    parser.add_argument("--gpu-node-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gpu_node_worker:
        return gpu_node_worker()
    cache = load_cache()
    if args.recompile is not None:
        recompile_tpu(args.recompile or seven_b_experiments(), cache, args.set, args.keep_hlo)
    if args.recompile_gpu_node:
        recompile_gpu_node(cache)
    if args.recompile_sequence_scaling:
        sequence_scaling.compile_points(load_config, LONG_CONTEXT_SPEC, args.set, compiled_figures, versions,
                                         args.keep_hlo, source_commit())
    if args.recount:
        recount(cache, args.recount)
        sequence_scaling.recount_points(load_config, LONG_CONTEXT_SPEC, args.set, args.recount)
    if args.write:
        with open(args.write, "w") as out:
            out.write(page(cache))
    else:
        print(report(cache))


if __name__ == "__main__":
    main()
