"""AF-Next-Think: SFT on AF-Think-Time (`<think>` reasoning anchored to timestamps, then the answer).

Full fine-tuning from stage 4 (the Instruct base); audio up to 10 min at 32K tokens. ARG: `tpu_v5p`
(default) or `h100`. GRPO post-training is not part of this trainer.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    return af_next_7b_stage(stage="full", learning_rate=5e-6, seq_len=32768, windows_per_audio=20,
                            batch_size=128, total_steps=3_000, init_from=f"{RUN_ROOT}/stage4_long_context",
                            manifests=("think/af_think_time.jsonl", "think/replay_instruct.jsonl"),
                            mesh=arg or "tpu_v5p")
