"""Encoder memory under hybrid sequence parallelism, from the compiled program's memory_analysis().

The AF-Next encoder shape (1500 positions, 20 heads, width 1280; 2 layers, 8 windows, bf16) on an
8-device CPU mesh (fsdp 2 x ring 2 x ulysses 2: one window per device), forward + backward.
Before the kernel/strategy split the encoder fell back to XLA attention whenever the decoder was
sequence-parallel: that program (attention_kernel="xla", which then materialised the scores; now
`reference.xla_attention`, patched in for the "before" program, since the "xla" kernel recomputes
them in its backward) holds [heads, 1500, 1500] scores per window and layer. With attention_kernel="pallas" (what "auto" picks on GPU/TPU; the interpreter on
this CPU) it must hold at least one float32 score tensor per layer less. Numbers: docs/PERFORMANCE.md.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from af_next_jax.attention import dispatch, reference
from af_next_jax.config import EncoderConfig, af_next_7b
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.parallel import MeshConfig, logical_axis_rules, make_mesh

MESH = MeshConfig(data=1, fsdp=2, ring=2, ulysses=2)
WINDOWS, LAYERS = 8, 2


def encoder_train_temp_bytes(kernel: str) -> int:
    config = af_next_7b(attention_kernel=kernel, sequence_parallelism="hybrid",
                        encoder=EncoderConfig(num_layers=LAYERS))
    model = AFNextModel(config)
    mel = jax.ShapeDtypeStruct((WINDOWS, config.encoder.num_mel_bins, config.encoder.mel_frames_per_window),
                               jnp.float32)
    counts = jax.ShapeDtypeStruct((WINDOWS,), jnp.int32)

    def loss(params, mel, valid_frames, window_index):
        audio, _ = model.apply(params, mel, valid_frames, window_index, method=AFNextModel.encode_audio_windows)
        return audio.astype(jnp.float32).sum()

    with jax.set_mesh(make_mesh(MESH)), nn.logical_axis_rules(logical_axis_rules(MESH)), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # XLA's constant-folding notes on the interpreted kernel
        params = jax.eval_shape(lambda m, c: model.init(jax.random.key(0), m, c, c,
                                                        method=AFNextModel.encode_audio_windows), mel, counts)
        compiled = jax.jit(jax.grad(loss)).lower(params, mel, counts, counts).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # two ~25 s compiles of the 1500-position encoder
def test_encoder_under_hybrid_sequence_parallelism_no_longer_holds_the_scores(monkeypatch):
    with monkeypatch.context() as patch:  # the materialising XLA attention the old fallback ran
        patch.setattr(dispatch, "recompute_attention",  # it takes no CPU-layout switch
                      lambda *arrays, cpu_layouts, **masks: reference.xla_attention(*arrays, **masks))
        before = encoder_train_temp_bytes("xla")
    after = encoder_train_temp_bytes("pallas")
    config = af_next_7b().encoder
    windows_per_device = WINDOWS // 8
    scores_per_layer = windows_per_device * config.num_heads * config.max_source_positions ** 2 * 4
    print(f"encoder temp per device: xla {before / 2**20:.1f} MiB, pallas {after / 2**20:.1f} MiB; "
          f"one layer's float32 scores {scores_per_layer / 2**20:.1f} MiB")
    assert before - after >= LAYERS * scores_per_layer
