"""AF-Next stage 2: train the encoder (+ projector) with the LLM frozen; clips up to 30 s, 8K tokens.

Starts from stage 1's workdir. ARG: `tpu_v5p` (default) or `h100`.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    return af_next_7b_stage(stage="encoder_projector", learning_rate=1.5e-5, seq_len=8192, windows_per_audio=1,
                            batch_size=256, total_steps=40_000, init_from=f"{RUN_ROOT}/stage1_projector",
                            manifests=("encoder/asr.jsonl", "encoder/sound.jsonl", "encoder/music.jsonl"),
                            mesh=arg or "tpu_v5p")
