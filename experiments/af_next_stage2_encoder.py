"""AF-Next stage 2: train the encoder (+ projector) with the LLM frozen; clips up to 30 s, 8K tokens.

Starts from stage 1's workdir. ARG: `tpu_v5p` (default) or `h100`.

Target: v5p-256 (128 chips, FSDP 128: two 8K rows and 20 windows per chip). Remat is `full`: compiled
for its target (`python -m af_next_jax.compile --config experiments/af_next_stage2_encoder.py`, libtpu
0.0.50) the step needed 108.6 GiB per chip with `dots_with_no_batch_dims` (the trained encoder's saved
activations) and needs 47.7 GiB with full remat (95 GiB HBM). The trade: the forward runs again in
the backward, about a third more FLOPs per step; batch and mesh are unchanged.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    return af_next_7b_stage(stage="encoder_projector", learning_rate=1.5e-5, seq_len=8192, windows_per_audio=1,
                            batch_size=256, total_steps=40_000, init_from=f"{RUN_ROOT}/stage1_projector",
                            manifests=("encoder/asr.jsonl", "encoder/sound.jsonl", "encoder/music.jsonl"),
                            mesh=arg or "tpu_v5p", remat="full")
