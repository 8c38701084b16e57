"""AF-Next-Think: SFT on AF-Think-Time (`<think>` reasoning anchored to timestamps, then the answer).

Full fine-tuning from stage 4 (the Instruct base); audio up to 10 min at 32K tokens. ARG: `tpu_v5p`
(default) or `h100` (the long-context meshes: the sequence is sharded). GRPO post-training is not
part of this trainer.

Target: v5p-256 (128 chips) on the long-context mesh (ring 8 x ulysses 4 x fsdp 4), 128 rows in one
micro-batch (no accumulation), remat `save_attention_out`. Compiled for its target (`python -m
af_next_jax.compile --config experiments/af_next_think.py`, libtpu 0.0.50, commit da69e28): 49.3 GiB
allocated per chip of 95. Before the sharded merge it needed full remat and 2 accumulated micro-batches
of 64 rows (41.1 GiB; with the sharded merge, before da69e28, that setting took 24.9). The trade: the
projections run again in the backward (compiled matmul FLOPs 1.24x the useful ones), the 32K attention
cores do not, and the step is one pass instead of two sequential micro-batches. The plan before that
(FSDP 128, one 32K row per chip) needed 108 GiB even with full remat.

Window slots are not sized for one block per sequence slice (`slot_blocks=False`, experiments/common.py
`window_slots`): a slice is 1,024 tokens, so each of a row's 32 blocks would need 2 slots, 64 a row
instead of 43: 49% more windows through the encoder, padding included. The merge then passes the window
blocks as far around the sequence group as the data needs (model/audio_merge.py), not one hop.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    mesh = {"tpu_v5p": "tpu_v5p_long", "h100": "h100_long"}.get(arg or "tpu_v5p", arg)
    config = af_next_7b_stage(stage="full", learning_rate=5e-6, seq_len=32768, windows_per_audio=20,
                              batch_size=128, total_steps=3_000, init_from=f"{RUN_ROOT}/stage4_long_context",
                              manifests=("think/af_think_time.jsonl", "think/replay_instruct.jsonl"),
                              mesh=mesh, sequence_parallelism="hybrid", remat="save_attention_out", target="v5p-256",
                              slot_blocks=False)
    return config
