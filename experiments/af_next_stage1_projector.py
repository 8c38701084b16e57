"""AF-Next stage 1: align the adaptor. Projector only (encoder and LLM frozen), 30 s clips, 8K tokens.

Starts from `python -m af_next_jax.convert from-hf --qwen2-dir Qwen2.5-7B --whisper-dir whisper-large-v3
--preset af_next_7b --out /checkpoints/af_next/from_hf` (projector freshly initialised), which also writes
`from_hf/tokenizer.json`, the tokenizer every 7B stage reads.
ARG picks the mesh: `tpu_v5p` (default) or `h100`. AF3 used lr 1e-3 here (AF-Next's are not public).
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    return af_next_7b_stage(stage="projector", learning_rate=1e-3, seq_len=8192, windows_per_audio=1,
                            batch_size=256, total_steps=20_000, init_from=f"{RUN_ROOT}/from_hf",
                            manifests=("alignment/train.jsonl",), mesh=arg or "tpu_v5p")
