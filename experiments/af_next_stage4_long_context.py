"""AF-Next stage 4: long audio, everything trained; up to 30 min (60 windows = 45,000 audio tokens), 128K.

Hybrid sequence parallelism (Ulysses inside a node / slice axis, ring across). Remat is
`save_attention_out`: the 128K-token attention cores, most of the step's work, are not run again in
the backward. Compiled for its v5p-64 target (libtpu 0.0.50, commit 83e2a69): 56.4 GiB allocated per
chip of 95 (`full`, compiled before da69e28: 43.4); the dots policies keep every projection output of 28 layers x 32K tokens a chip and
do not fit (planned at ~146 GiB live). Window slots: 192 a row, 6 for each of the 32 sequence slices of
4,096 tokens (experiments/common.py `window_slots`; 176 a row before), so that the audio merge takes
every window from one hop away: 9% more windows through the encoder, and the step's collective-permutes
move 116.7 -> 103.7 GiB per chip (docs/SCALING.md, sequence parallelism).
Starts from stage 3's workdir. ARG: `tpu_v5p` (default) or `h100` (long-context meshes).
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    mesh = {"tpu_v5p": "tpu_v5p_long", "h100": "h100_long"}.get(arg or "tpu_v5p", arg)
    return af_next_7b_stage(stage="long_context", learning_rate=5e-6, seq_len=131072, windows_per_audio=60,
                            batch_size=8, total_steps=5_000, init_from=f"{RUN_ROOT}/stage3_full",
                            manifests=("long/long_audio_qa.jsonl", "long/long_captions.jsonl"),
                            mesh=mesh, sequence_parallelism="hybrid", remat="save_attention_out")
