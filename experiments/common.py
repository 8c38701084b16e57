"""Pieces shared by the experiment configs: every key documented once (`base_config`), the meshes
for a TPU v5p slice and for H100 nodes, and the AF-Next 7B curriculum stages.

An experiment file (`experiments/NAME.py`) defines `get_config(arg=None)`; the 7B ones take the
mesh as ARG: `--config experiments/af_next_stage4_long_context.py:h100`.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Model: a preset of af_next_jax/config.py plus field overrides (sub-dicts override a part).
    config.model = ml_collections.ConfigDict(dict(
        preset="tiny", compute_dtype="float32", remat_policy="none", attention_kernel="xla",
        sequence_parallelism="none"))
    # Which groups train: projector | encoder_projector | full | long_context (train/optimizer.py).
    config.stage = "full"
    # A converted checkpoint (`convert from-hf`) or the workdir of the previous stage; "" = random init.
    config.init_from = ""

    config.data = ml_collections.ConfigDict(dict(
        dir="demo_data",                  # manifests and tokenizer are relative to this folder
        train_manifests=("train.jsonl",),
        weights=(),                       # mixture weights, one per manifest; () = equal
        heldout_manifest="heldout.jsonl",
        tokenizer="tokenizer.json",
        seq_len=384,
        batch_size=4,                     # rows per micro-batch, all hosts together (global)
        max_windows_per_batch=8,          # static window axis of a micro-batch, all hosts together
        max_windows_per_audio=None,       # truncate longer audio; None = the model's max_windows_per_audio
        num_workers=0,
        num_threads=2,
        seed=0,
        # Independent data shards the stream is split into (train/host_data.py); each process reads
        # shards / processes of them. 0 = one per process, fixed when the run first starts: a resumed
        # run keeps it, so it continues on any process count that divides it with the same batches.
        shards=0,
    ))
    # Mesh axis sizes (af_next_jax/parallel/mesh.py); -1 fills the remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(
        data=1, fsdp=-1, ring=1, ulysses=1, tensor=1,
        dcn_data=1, dcn_fsdp=1, dcn_ring=1, dcn_ulysses=1, dcn_tensor=1,
        shard_params_over_sequence=True, shard_windows_over_sequence=True))

    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=10, final_lr_fraction=0.1,
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, grad_clip_norm=1.0,
        lr_multipliers=ml_collections.ConfigDict({}),  # e.g. {"encoder": 0.1}
    ))
    config.total_steps = 80
    config.grad_accum_steps = 1
    config.seed = 0
    # Tokens per row in one chunk of the chunked cross-entropy (bounds [B, chunk, vocab] float32 logits).
    config.loss_chunk_length = 4096

    config.log_every = 10
    config.eval_every = 40
    config.eval_batches = 4
    config.checkpoint_every = 20
    config.keep_checkpoints = 3
    config.async_checkpointing = True
    config.export_at_end = True              # write WORKDIR/export (converter layout) when the run finishes
    config.max_nonfinite_streak = 5          # stop after this many skipped (non-finite) steps in a row
    # Peak FLOP/s of one device for MFU; 0 = look it up from the device kind (train/flops.py).
    config.peak_flops_per_device = 0.0
    # The hardware this experiment is meant for: what `python -m af_next_jax.compile` compiles for
    # without --topology (a Cloud TPU name: v5p-256, v5e-16, ...; "" = none declared), and its slices.
    config.target_topology = ""
    config.target_slices = 1
    return config


# Where the 7B curriculum reads its data and writes its stages (override on the command line).
DATA_ROOT = "/data/af_next"
RUN_ROOT = "/checkpoints/af_next"

# Meshes by name. Sizes are per slice (ICI: a TPU slice / an 8-GPU NVLink node) and across slices
# (DCN: TPU multislice / InfiniBand). -1 fills the devices a slice has.
MESHES = {
    # One TPU v5p slice (e.g. v5p-256 = 128 chips): FSDP over the whole slice (7B at <= 16K tokens).
    "tpu_v5p": dict(data=1, fsdp=-1),
    # H100 nodes: FSDP inside a node over NVLink, data parallel across nodes (dcn_data = nodes).
    "h100": dict(data=1, fsdp=-1, dcn_data=16),
    # Long context on a v5p slice: Ulysses 4 (the 4 K/V heads allow at most 4), ring 8, FSDP the rest.
    "tpu_v5p_long": dict(data=1, fsdp=-1, ring=8, ulysses=4),
    # Long context on H100 nodes (the paper's recipe): Ulysses inside a node, ring across nodes.
    "h100_long": dict(data=1, fsdp=-1, ulysses=4, dcn_ring=8, dcn_fsdp=2),
}


def set_mesh(config: ml_collections.ConfigDict, name: str) -> None:
    if name not in MESHES:
        raise ValueError(f"unknown mesh {name!r}; valid meshes: {sorted(MESHES)}")
    config.mesh.update(MESHES[name])


# The GPU meshes are meant for 16 nodes x 8 H100 (their dcn_* sizes), 128 GPUs.
GPU_CLUSTER_DEVICES = 128

# The TPU slice each TPU mesh is meant for (`python -m af_next_jax.compile` compiles for it by default).
# GPU meshes name none: their plans cannot be compiled on a CPU host (docs/SCALING.md).
TARGETS = {"tpu_v5p": "v5p-256", "tpu_v5p_long": "v5p-64"}


def _chips(target: str) -> int:
    """Chips of a Cloud TPU name (v5p counts two TensorCores per chip)."""
    generation, _, size = target.partition("-")
    return int(size) // (2 if generation in ("v4", "v5p") else 1)


def window_slots(batch_size: int, seq_len: int, devices: int, slot_blocks: int = 1) -> int:
    """The static window axis of a micro-batch (data.max_windows_per_batch).

    A row of seq_len tokens holds at most seq_len / 750 full 30 s windows. With `slot_blocks` = S > 1
    (the sequence slices of a sequence-parallel mesh) a row's slots form S blocks and each window sits
    in the block of the slice holding its first token (data/packing.py), so that the audio merge fetches
    a window from its own device or its left neighbour (model/audio_merge.py): a slice of seq_len / S
    tokens is where at most ceil(seq_len / S / 750) full windows start, so each block gets that many.
    The window axis is split over every chip (data x fsdp x sequence axes): each row's count grows (by
    whole blocks) until the total is a multiple of the chips, since a count that does not divide would
    be replicated (every chip encoding every window)."""
    per_row = max(1, seq_len // 750) if slot_blocks == 1 else slot_blocks * -(-seq_len // slot_blocks // 750)
    while batch_size * per_row % devices:
        per_row += slot_blocks
    return batch_size * per_row


def af_next_7b_stage(*, stage: str, learning_rate: float, seq_len: int, windows_per_audio: int,
                     batch_size: int, total_steps: int, init_from: str, manifests: tuple, mesh: str,
                     sequence_parallelism: str = "none", remat: str = "dots_with_no_batch_dims",
                     target: str | None = None, slot_blocks: bool | None = None) -> ml_collections.ConfigDict:
    """One stage of the AF-Next 7B curriculum (af_next_7b preset, bf16 compute, float32 master weights).

    `target`: the TPU slice it is meant for (default: the mesh's, TARGETS); "" for GPU meshes.
    `slot_blocks`: size the window slots for one block per sequence slice (`window_slots`; default: with
    sequence parallelism), which the trainer then has the data place windows in."""
    target = TARGETS.get(mesh, "") if target is None or mesh not in TARGETS else target
    devices = _chips(target) if target else GPU_CLUSTER_DEVICES
    sizes = MESHES[mesh]
    sequence_slices = sizes.get("ring", 1) * sizes.get("ulysses", 1) * sizes.get("dcn_ring", 1) * sizes.get(
        "dcn_ulysses", 1)
    if slot_blocks is None:
        slot_blocks = sequence_parallelism != "none"
    windows = window_slots(batch_size, seq_len, devices, sequence_slices if slot_blocks else 1)
    config = base_config()
    config.model = ml_collections.ConfigDict(dict(
        # "auto": the Pallas kernel on the GPUs/TPUs the mesh is compiled for (XLA on a CPU).
        preset="af_next_7b", compute_dtype="bfloat16", remat_policy=remat, attention_kernel="auto",
        sequence_parallelism=sequence_parallelism,
        max_windows_per_audio=60))
    config.stage = stage
    config.init_from = init_from
    config.data.update(dict(
        dir=DATA_ROOT, train_manifests=manifests, heldout_manifest="heldout.jsonl",
        # The tokenizer `convert from-hf --preset af_next_7b` writes (Qwen2.5 + the audio and think tokens).
        tokenizer=f"{RUN_ROOT}/from_hf/tokenizer.json",
        seq_len=seq_len, batch_size=batch_size, max_windows_per_audio=windows_per_audio,
        max_windows_per_batch=windows, num_workers=8, num_threads=8))
    config.optimizer.update(dict(learning_rate=learning_rate, warmup_steps=min(2000, total_steps // 20),
                                 final_lr_fraction=0.1, weight_decay=0.0, b2=0.95))
    config.total_steps = total_steps
    config.loss_chunk_length = 2048
    config.log_every = 50
    config.eval_every = 2000
    config.eval_batches = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    set_mesh(config, mesh)
    config.target_topology = target
    return config
