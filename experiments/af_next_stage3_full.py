"""AF-Next stage 3: mid-training, full fine-tuning; audio up to 10 min (20 windows), 16K tokens.

Starts from stage 2's workdir. ARG: `tpu_v5p` (default) or `h100`.

Target: v5p-256 (128 chips, FSDP 128: one 16K-token row and 21 windows per chip). Remat is
`save_attention_out`: compiled for its target (`python -m af_next_jax.compile --config
experiments/af_next_stage3_full.py`, libtpu 0.0.50, commit da69e28) 26.2 GiB allocated per chip of
95 (`full`, compiled before da69e28: 17.8; before the sharded merge `full` needed 53.1). `dots_with_no_batch_dims`
needs 109.6 GiB and does not fit. The trade: the projections run again in the backward (compiled
matmul FLOPs 1.24x the useful ones, against 1.02x with saved dots), the 16K attention cores do not
(they would with `full`); batch and mesh are unchanged.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    return af_next_7b_stage(stage="full", learning_rate=1.5e-5, seq_len=16384, windows_per_audio=20,
                            batch_size=128, total_steps=60_000, init_from=f"{RUN_ROOT}/stage2_encoder",
                            manifests=("midtrain/qa.jsonl", "midtrain/captions.jsonl", "midtrain/asr.jsonl"),
                            mesh=arg or "tpu_v5p", remat="save_attention_out")
