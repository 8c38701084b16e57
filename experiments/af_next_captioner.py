"""AF-Next-Captioner: dense, timestamped captions of long audio (up to 30 min, 64K tokens).

Full fine-tuning from stage 4; the same architecture as Instruct and Think, only data and stage
differ. ARG: `tpu_v5p` (default) or `h100` (long-context meshes: the sequence is sharded).

Remat is `save_attention_out`, as stage 4 (the long attention cores are not run again): compiled for
its v5p-64 target (libtpu 0.0.50, commit 83e2a69), 56.2 GiB allocated per chip of 95 (`full`, compiled
before da69e28: 44.7). Window slots: 96 a row, 3 for each of the 32 sequence slices of 2,048 tokens
(experiments/common.py `window_slots`; 87 a row before), so that the audio merge takes every window
from one hop away: 10% more windows through the encoder, and the step's collective-permutes move
116.7 -> 103.7 GiB per chip.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    mesh = {"tpu_v5p": "tpu_v5p_long", "h100": "h100_long"}.get(arg or "tpu_v5p", arg)
    return af_next_7b_stage(stage="full", learning_rate=5e-6, seq_len=65536, windows_per_audio=60,
                            batch_size=16, total_steps=4_000, init_from=f"{RUN_ROOT}/stage4_long_context",
                            manifests=("captioner/long_captions.jsonl",), mesh=mesh, sequence_parallelism="hybrid",
                            remat="save_attention_out")
