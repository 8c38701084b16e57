"""Under hybrid sequence parallelism the encoder runs the configured attention kernel.

Before the kernel and the strategy were separate config fields, any sequence-parallel setting made
the encoder fall back to XLA attention, which materialises [windows, heads, T, T] scores. Checked on
the compiled program of `encode_audio_windows` of the whole model, built from a config with
sequence_parallelism="hybrid", on an 8-device CPU mesh (fsdp 2 x ring 2 x ulysses 2): with the
Pallas kernel the program contains the kernel (interpreted on the CPU) and no T x T score tensor;
with the XLA kernel (the control that proves the check can fail) it has the score tensors.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import synthetic_batch
from af_next_jax.parallel import MeshConfig, logical_axis_rules, make_mesh

HYBRID = MeshConfig(data=1, fsdp=2, ring=2, ulysses=2)


def compiled_encoder_hlo(kernel: str) -> str:
    config = tiny(attention_kernel=kernel, sequence_parallelism="hybrid")
    batch = synthetic_batch(config, audio_frames_per_example=[[400], [300, 200]], seq_len=256, num_windows=4)
    model = AFNextModel(config)
    audio = (batch["mel_windows"], batch["mel_valid_frames"], batch["window_index"])
    mesh = make_mesh(HYBRID)
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_axis_rules(HYBRID)):
        params = jax.eval_shape(model.init, jax.random.key(0), batch)
        encode = jax.jit(lambda p, *a: model.apply(p, *a, method=AFNextModel.encode_audio_windows))
        return encode.lower(params, *audio).compile().as_text()


def score_tensors(hlo: str, positions: int):
    """Float tensors whose last two dimensions are [positions, positions]: attention scores."""
    return sorted(set(re.findall(rf"f32\[[0-9,]*{positions},{positions}\]", hlo)))


@pytest.fixture(scope="module")
def positions():
    return tiny().encoder.max_source_positions


def test_encoder_runs_the_pallas_kernel_under_hybrid_sequence_parallelism(positions):
    hlo = compiled_encoder_hlo("pallas")
    assert "flash_attention_forward" in hlo, "the encoder did not run the configured Pallas kernel"
    assert not score_tensors(hlo, positions), f"the encoder holds scores {score_tensors(hlo, positions)}"


def test_encoder_with_the_xla_kernel_materialises_scores_control(positions):
    hlo = compiled_encoder_hlo("xla")
    assert "flash_attention_forward" not in hlo
    assert score_tensors(hlo, positions), "the score-tensor check found nothing: it cannot detect scores"
