"""AF-Next stage 3: mid-training, full fine-tuning; audio up to 10 min (20 windows), 16K tokens.

Starts from stage 2's workdir. ARG: `tpu_v5p` (default) or `h100`.

Target: v5p-256 (128 chips, FSDP 128: one 16K-token row and 21 windows per chip). Remat is `full`,
not the other stages' `dots_with_no_batch_dims`: compiled for its target (`python -m af_next_jax.compile
--config experiments/af_next_stage3_full.py`, libtpu 0.0.50) the step needed 109.6 GiB per chip with
saved matmul outputs and needs 53.1 GiB with full remat (95 GiB HBM). The trade: every layer's
forward runs again in the backward, about a third more FLOPs per step; batch and mesh are unchanged.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    return af_next_7b_stage(stage="full", learning_rate=1.5e-5, seq_len=16384, windows_per_audio=20,
                            batch_size=128, total_steps=60_000, init_from=f"{RUN_ROOT}/stage2_encoder",
                            manifests=("midtrain/qa.jsonl", "midtrain/captions.jsonl", "midtrain/asr.jsonl"),
                            mesh=arg or "tpu_v5p", remat="full")
