"""AF-Next-7B at 128K context on paper: mesh and per-device memory, computed from the config.

    python benchmarks/scaling.py                    # print the tables
    python benchmarks/scaling.py --write docs/SCALING.md

Parameter counts come from `jax.eval_shape(AFNextModel(af_next_7b()).init, ...)` (no memory is
allocated), the sharding factors from the MeshConfig and the rules table (rules.py), and each mesh is
checked with `validate_sequence_parallel`. Memory model (per device, bytes):

  parameters      4 x P / shards          float32 master weights (the model's param_dtype)
  gradients       4 x P / shards          float32, same sharding as the parameters
  optimizer       8 x P / shards          AdamW m and v, float32
  saved acts      layers x B x L x D x 2 / (ring x ulysses)      remat "full": one bf16 layer input
                  per decoder layer; encoder likewise over its windows (windows over data x fsdp x seq)
  layer peak      B x L/(ring x ulysses) x per-token bytes of one layer being recomputed in the
                  backward (x, q, k, v with replicated K/V heads, attention out, gate/up/act, and
                  their gradients: ~2 x (4 D + 2 H_kv' d + 3 F) x 2 bytes)
  logits          B x L/(ring x ulysses) x V / tensor x 4: unchunked float32 logits; a chunked
                  cross-entropy (trainer) removes most of it, so it is listed apart

shards = fsdp x ring x ulysses x tensor for weights sharded by the rules (embed over fsdp and the
sequence axes, heads / MLP / vocab over tensor), i.e. ZeRO-3 over every non-data axis.
"""

from __future__ import annotations

import argparse
import dataclasses

import flax.linen as nn
import jax
import numpy as np

from af_next_jax.config import af_next_7b
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import synthetic_batch
from af_next_jax.parallel.mesh import MeshConfig, kv_replication, validate_sequence_parallel

GIB = 2 ** 30
CONTEXT = 131072


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: int
    hbm_gib: float
    mesh: MeshConfig
    sequences_per_step: int
    note: str


TARGETS = (
    Target("8 x H100 (one node)", 8, 80, MeshConfig(data=1, fsdp=1, ring=2, ulysses=4), 1,
           "Ulysses 4 = the 4 K/V heads (no replication) over NVLink, ring 2 for the rest"),
    Target("64 x H100 (8 nodes)", 64, 80, MeshConfig(data=1, fsdp=1, ring=2, ulysses=4, dcn_fsdp=8), 8,
           "each node holds one 128K sequence (hybrid as above); FSDP across nodes over InfiniBand"),
    Target("TPU v5p-128 (64 chips)", 64, 95, MeshConfig(data=1, fsdp=4, ring=4, ulysses=4), 4,
           "all ICI (3D torus): fsdp 4 x ring 4 x ulysses 4; 4 sequences per step"),
)


def parameter_counts(config) -> dict[str, int]:
    batch = synthetic_batch(config, audio_frames_per_example=[[config.encoder.mel_frames_per_window]], seq_len=1024)
    abstract = nn.unbox(jax.eval_shape(AFNextModel(config).init, jax.random.key(0), batch))
    return {part: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree))) for part, tree in abstract["params"].items()}


def per_device_memory(config, target: Target) -> dict[str, float]:
    sizes = target.mesh.axis_sizes(target.devices)
    decoder, encoder = config.decoder, config.encoder
    sequence_shards = sizes["ring"] * sizes["ulysses"]
    weight_shards = sizes["fsdp"] * sequence_shards * sizes["tensor"]
    batch_shards = sizes["data"] * sizes["fsdp"]
    sequences_per_device_group = target.sequences_per_step // batch_shards
    local_tokens = sequences_per_device_group * CONTEXT // sequence_shards
    params = sum(parameter_counts(config).values())
    kv_heads = decoder.num_kv_heads * kv_replication(decoder.num_kv_heads // sizes["tensor"], sizes["ulysses"])
    windows_per_device = sequences_per_device_group * config.max_windows_per_audio / sequence_shards
    encoder_saved = encoder.num_layers * windows_per_device * encoder.max_source_positions * encoder.hidden_size * 2
    per_token = 2 * (4 * decoder.hidden_size + 2 * kv_heads * decoder.head_dim / sizes["tensor"]
                     + 3 * decoder.intermediate_size / sizes["tensor"]) * 2
    return {
        "parameters (f32)": 4 * params / weight_shards / GIB,
        "gradients (f32)": 4 * params / weight_shards / GIB,
        "AdamW state (f32 m, v)": 8 * params / weight_shards / GIB,
        "saved decoder inputs (remat full, bf16)": decoder.num_layers * local_tokens * decoder.hidden_size * 2 / GIB,
        "saved encoder inputs (remat full, bf16)": encoder_saved / GIB,
        "one layer recomputed in backward": local_tokens * per_token / GIB,
        "logits, unchunked f32 (chunk the loss!)": local_tokens * decoder.vocab_size / sizes["tensor"] * 4 / GIB,
    }


def report() -> str:
    config = af_next_7b(remat_policy="full")
    counts = parameter_counts(config)
    lines = [f"Parameters (from `jax.eval_shape` of the model): "
             + ", ".join(f"{part} {count / 1e9:.3f} B" for part, count in counts.items())
             + f"; total {sum(counts.values()) / 1e9:.3f} B.", ""]
    lines += ["| target | devices | mesh ICI (per slice / node) | mesh DCN (across) | sequences of 128K per step | "
              "tokens per device |", "|---|---:|---|---|---:|---:|"]
    memories = []
    for target in TARGETS:
        validate_sequence_parallel(target.mesh, num_heads=config.decoder.num_heads,
                                   num_kv_heads=config.decoder.num_kv_heads, sequence_length=CONTEXT,
                                   batch_size=target.sequences_per_step, implementation="hybrid",
                                   num_devices=target.devices)
        resolved = target.mesh.resolved(target.devices)
        sizes = target.mesh.axis_sizes(target.devices)
        ici = " x ".join(f"{axis} {size}" for axis, size in resolved.ici_sizes.items() if size > 1)
        dcn = " x ".join(f"{axis} {size}" for axis, size in resolved.dcn_sizes.items() if size > 1) or "-"
        tokens = target.sequences_per_step * CONTEXT // target.devices
        lines.append(f"| {target.name} | {target.devices} | {ici} | {dcn} | {target.sequences_per_step} | {tokens} |")
        memories.append(per_device_memory(config, target))
        del sizes
    lines += ["", "Per-device memory, GiB:", "",
              "| | " + " | ".join(target.name for target in TARGETS) + " |",
              "|---|" + "---:|" * len(TARGETS)]
    for name in memories[0]:
        lines.append(f"| {name} | " + " | ".join(f"{memory[name]:.2f}" for memory in memories) + " |")
    totals = [sum(v for k, v in memory.items() if not k.startswith("logits")) for memory in memories]
    lines.append("| **total, loss chunked** | " + " | ".join(f"**{total:.1f}**" for total in totals) + " |")
    lines.append("| HBM per device | " + " | ".join(f"{target.hbm_gib:.0f}" for target in TARGETS) + " |")
    lines.append("")
    lines += [f"- **{target.name}**: {target.note}." for target in TARGETS]
    return "\n".join(lines)


PAGE = """# Scaling AF-Next-7B to 128K tokens

Generated by `python benchmarks/scaling.py --write docs/SCALING.md` from `af_next_7b()` (do not edit
by hand). Attention: `hybrid` (Ulysses over the `ulysses` axis, ring over `ring`), remat policy
`full`, compute bfloat16 with float32 master weights and AdamW; batch = whole 128K-token sequences.
Memory model: see the docstring of `benchmarks/scaling.py`. Not included: XLA temporaries beyond one
layer's working set, collective buffers, and the attention kernel's own O(L) scratch.

{tables}

Reading the table: weights, gradients and AdamW take 16 bytes per parameter, so the model needs
{state_gib:.0f} GiB before any activation; only by sharding them over every non-data axis (FSDP over
fsdp x ring x ulysses, the rules table's `shard_params_over_sequence=True`) does one 8-GPU node fit.
The saved decoder inputs are {layers} x {context} x {hidden} x 2 bytes = {saved_gib:.1f} GiB per
sequence, divided by the sequence-parallel degree. Unchunked float32 logits ({context} x {vocab} x 4 bytes
= {logits_gib:.0f} GiB per sequence) must never exist: compute the loss in sequence chunks against
`output_projection` (the model exposes it for that).

## Multi-host launch

Every process (one per TPU host, one per 8-GPU node) runs the same training command. The trainer
joins the job before any other JAX call (`af_next_jax/train/launch.py`): it
detects SLURM, Cloud TPU / GKE and Open MPI by itself, takes `--coordinator HOST:PORT
--num-processes N --process-id I` anywhere else, and stays a single process when it finds neither.
`af_next_jax.parallel.make_mesh(mesh_config)` then lays the `dcn_*` axes across hosts (slices) and
the ICI axes inside a host: `create_hybrid_device_mesh`, grouping devices by TPU slice or, on GPUs,
by process (one process per node). Each process reads its own rows of every batch, so keep `ring`
and `ulysses` inside a host and put `dcn_fsdp` / `dcn_data` across hosts (a mesh that splits rows
across processes is refused at start-up). The workdir must be a filesystem that every host mounts.

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

### GKE / XPK (TPU)

Stage 3 on one v5p-256 slice (`:tpu_v5p`: FSDP over the whole slice):

```bash
xpk workload create --cluster CLUSTER --workload af-next-stage3 --tpu-type v5p-256 --num-slices 1 \\
    --command "python -m af_next_jax.train --config experiments/af_next_stage3_full.py:tpu_v5p --workdir /gcs/af_next/stage3_full"
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

- The trainer calls `validate_sequence_parallel` at start-up with the real head counts, length and
  batch (it names the numbers and valid alternatives), and refuses a mesh that splits rows across
  processes.
- `python -m pytest tests/parallel tests/train/test_multihost.py` on CPU: the two-process
  `jax.distributed` tests (sequence-parallel attention, and the trainer against one process).
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", help="write the page (docs/SCALING.md) instead of printing the tables")
    args = parser.parse_args()
    tables = report()
    if args.write:
        config = af_next_7b()
        decoder = config.decoder
        numbers = dict(state_gib=16 * sum(parameter_counts(config).values()) / GIB, layers=decoder.num_layers,
                       context=CONTEXT, hidden=decoder.hidden_size, vocab=decoder.vocab_size,
                       saved_gib=decoder.num_layers * CONTEXT * decoder.hidden_size * 2 / GIB,
                       logits_gib=CONTEXT * decoder.vocab_size * 4 / GIB)
        with open(args.write, "w") as page:
            page.write(PAGE.format(tables=tables, **numbers))
    else:
        print(tables)


if __name__ == "__main__":
    main()
