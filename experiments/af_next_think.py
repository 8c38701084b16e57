"""AF-Next-Think: SFT on AF-Think-Time (`<think>` reasoning anchored to timestamps, then the answer).

Full fine-tuning from stage 4 (the Instruct base); audio up to 10 min at 32K tokens. ARG: `tpu_v5p`
(default) or `h100` (the long-context meshes: the sequence is sharded). GRPO post-training is not
part of this trainer.

Target: v5p-256 (128 chips) on the long-context mesh (ring 8 x ulysses 4 x fsdp 4), full remat, 64
rows per micro-batch x 2 accumulated micro-batches (the same 128-row global batch). Compiled for its
target (`python -m af_next_jax.compile --config experiments/af_next_think.py`, libtpu 0.0.50), the
earlier plan (FSDP 128, one 32K row per chip, 128 rows in one micro-batch) needed 108 GiB per chip even
with full remat; this one needs 41 GiB of the 95. The trade: sequence-parallel collectives (Ulysses
all-to-all, ring ppermutes), the recomputed forward, and two sequential micro-batches per step.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    mesh = {"tpu_v5p": "tpu_v5p_long", "h100": "h100_long"}.get(arg or "tpu_v5p", arg)
    config = af_next_7b_stage(stage="full", learning_rate=5e-6, seq_len=32768, windows_per_audio=20,
                              batch_size=64, total_steps=3_000, init_from=f"{RUN_ROOT}/stage4_long_context",
                              manifests=("think/af_think_time.jsonl", "think/replay_instruct.jsonl"),
                              mesh=mesh, sequence_parallelism="hybrid", remat="full", target="v5p-256")
    config.grad_accum_steps = 2
    return config
