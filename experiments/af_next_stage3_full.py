"""AF-Next stage 3: mid-training, full fine-tuning; audio up to 10 min (20 windows), 16K tokens.

Starts from stage 2's workdir. ARG: `tpu_v5p` (default) or `h100`.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    return af_next_7b_stage(stage="full", learning_rate=1.5e-5, seq_len=16384, windows_per_audio=20,
                            batch_size=128, total_steps=60_000, init_from=f"{RUN_ROOT}/stage2_encoder",
                            manifests=("midtrain/qa.jsonl", "midtrain/captions.jsonl", "midtrain/asr.jsonl"),
                            mesh=arg or "tpu_v5p")
