"""AF-Next stage 1: align the adaptor. Projector only (encoder and LLM frozen), 30 s clips, 8K tokens.

Starts from `convert from-hf` of Qwen2.5-7B + Whisper-large-v3 (projector freshly initialised).
ARG picks the mesh: `tpu_v5p` (default) or `h100`. AF3 used lr 1e-3 here (AF-Next's are not public).
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    return af_next_7b_stage(stage="projector", learning_rate=1e-3, seq_len=8192, windows_per_audio=1,
                            batch_size=256, total_steps=20_000, init_from=f"{RUN_ROOT}/from_hf",
                            manifests=("alignment/train.jsonl",), mesh=arg or "tpu_v5p")
