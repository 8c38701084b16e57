"""AF-Next stage 2: train the encoder (+ projector) with the LLM frozen; clips up to 30 s, 8K tokens.

Starts from stage 1's workdir. ARG: `tpu_v5p` (default) or `h100`.

Target: v5p-256 (128 chips, FSDP 128: two 8K rows and 20 windows per chip). Remat is
`save_attention_out` (the decoder keeps each layer's input and attention output; the encoder, which
names no attention output, its layer inputs). Compiled for its target (`python -m af_next_jax.compile
--config experiments/af_next_stage2_encoder.py`, libtpu 0.0.50, commit da69e28): 23.9 GiB allocated
per chip of 95 (`full`, compiled before da69e28: 19.3; before the sharded merge `full` needed 47.7).
`dots_with_no_batch_dims` needs 108.6 GiB and does not fit. The trade: the projections run again in
the backward (compiled matmul FLOPs 1.34x the useful ones, against 1.03x with saved dots), the
attention cores do not (they would with `full`); batch and mesh are unchanged. docs/SCALING.md lists
every candidate compiled.
"""

from common import RUN_ROOT, af_next_7b_stage


def get_config(arg=None):
    return af_next_7b_stage(stage="encoder_projector", learning_rate=1.5e-5, seq_len=8192, windows_per_audio=1,
                            batch_size=256, total_steps=40_000, init_from=f"{RUN_ROOT}/stage1_projector",
                            manifests=("encoder/asr.jsonl", "encoder/sound.jsonl", "encoder/music.jsonl"),
                            mesh=arg or "tpu_v5p", remat="save_attention_out")
