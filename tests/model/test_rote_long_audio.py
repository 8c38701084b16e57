"""RoTE on long audio (up to AF-Next's 60 windows = 30 min) against transformers, bit for bit in the tables.

References: transformers' `MusicFlamingoRotaryEmbedding` + `apply_rotary_time_emb` (RoTE alone) and
`MusicFlamingoModel.get_audio_features` (encoder -> RoTE -> projector). The angles reach ~4e4 rad at
30 min, so a one-ulp difference in a static factor shows up as a ~1e-2 error in the last windows.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.musicflamingo import modeling_musicflamingo as reference

from af_next_jax.config import af_next_7b, tiny
from af_next_jax.convert.hf_config import to_hf_config
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.rote import apply_rotary_time_embedding, inverse_frequencies, rotary_time_tables
from af_next_jax.model.synthetic import synthetic_batch, to_transformers_inputs
from hf_reference import build_audio_model

LONG_AUDIO_WINDOWS = 60  # AF-Next's 30 minutes


def reference_rotary(config):
    return reference.MusicFlamingoRotaryEmbedding(transformers.MusicFlamingoConfig.from_dict(to_hf_config(config)))


def reference_timestamps(windows: int, tokens: int, frame_step: float) -> torch.Tensor:
    """`_build_audio_timestamps` for windows 0..windows-1 of one audio."""
    window_index = torch.arange(windows).unsqueeze(1)
    return window_index * tokens * frame_step + torch.arange(tokens, dtype=torch.float32) * frame_step


def test_static_tables_equal_transformers_bit_for_bit():
    config = af_next_7b()
    tokens, hidden = config.encoder.tokens_per_window, config.encoder.hidden_size
    rotary = reference_rotary(config)
    tables = rotary_time_tables(config.rote, tokens_per_window=tokens, hidden_size=hidden,
                                max_windows=LONG_AUDIO_WINDOWS)
    np.testing.assert_array_equal(inverse_frequencies(config.rote, config.rote.rotary_dim(hidden)),
                                  rotary.inv_freq.numpy())
    np.testing.assert_array_equal(tables.time_angles_TxR, rotary.position_angles[:tokens].numpy())


def test_rote_alone_matches_transformers_at_every_window_of_30_minutes():
    config = af_next_7b()
    tokens, hidden = config.encoder.tokens_per_window, config.encoder.hidden_size
    features_NxTxD = np.random.default_rng(0).normal(size=(LONG_AUDIO_WINDOWS, tokens, hidden)).astype(np.float32)

    rotary = reference_rotary(config)
    cos, sin = rotary(reference_timestamps(LONG_AUDIO_WINDOWS, tokens, 4 * config.rote.audio_frame_step),
                      seq_len=tokens)
    expected = reference.apply_rotary_time_emb(torch.from_numpy(features_NxTxD), cos, sin).numpy()
    rote = jax.jit(lambda x, w: apply_rotary_time_embedding(x, w, config.rote, config.max_windows_per_audio))
    ours = np.asarray(rote(features_NxTxD, np.arange(LONG_AUDIO_WINDOWS, dtype=np.int32)))

    per_window = np.abs(ours - expected).max(axis=(1, 2))
    assert (per_window <= 1e-5).all(), f"windows over 1e-5: {np.flatnonzero(per_window > 1e-5)}, max {per_window.max():.3g}"


@pytest.fixture(scope="module")
def long_audio_case():
    """A small encoder on real 30 s windows: one audio of 42 windows (21 min) and one of 2, in one row."""
    base = tiny()
    config = base.replace(encoder=dataclasses.replace(base.encoder, max_source_positions=1500, num_layers=1),
                          max_windows_per_audio=LONG_AUDIO_WINDOWS)
    frames = config.encoder.mel_frames_per_window
    batch = synthetic_batch(config, audio_frames_per_example=[[41 * frames + 1700, frames + 900]],
                            seq_len=44 * config.encoder.tokens_per_window, seed=3)
    return config, batch


def test_long_audio_features_match_transformers_get_audio_features(long_audio_case):
    config, batch = long_audio_case
    hf_model, params = build_audio_model(config, seed=5)
    inputs = {k: torch.from_numpy(v) for k, v in to_transformers_inputs(batch).items()}
    with torch.no_grad():
        expected = hf_model.model.get_audio_features(
            inputs["input_features"], inputs["input_features_mask"], inputs["input_ids"]).pooler_output.numpy()

    encode = jax.jit(lambda p, *args: AFNextModel(config).apply(p, *args, method="encode_audio_windows"))
    audio_NxTxD, valid_NxT = encode(params, batch["mel_windows"], batch["mel_valid_frames"], batch["window_index"])
    ours = np.asarray(audio_NxTxD)[np.asarray(valid_NxT)]
    assert ours.shape == expected.shape
    scale = np.abs(expected).max()
    diff = np.abs(ours - expected).max()
    assert diff <= 1e-4 * scale, f"max |diff| {diff:.3g} vs scale {scale:.3g}"


def test_rotation_runs_in_float32_under_bfloat16_compute(long_audio_case):
    config, batch = long_audio_case
    config = config.replace(compute_dtype="bfloat16")
    model = AFNextModel(config)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
    encode = jax.jit(lambda p, *args: model.apply(p, *args, method="encode_audio_windows"))
    jaxpr = jax.make_jaxpr(encode)(params, batch["mel_windows"], batch["mel_valid_frames"], batch["window_index"])
    trig_inputs = [eqn.invars[0].aval.dtype for eqn in _all_equations(jaxpr.jaxpr)
                   if eqn.primitive.name in ("cos", "sin")]
    assert trig_inputs and all(dtype == jnp.float32 for dtype in trig_inputs), trig_inputs

    # And the result: rotating bf16 features equals rotating their float32 values, then rounding once.
    features = jnp.asarray(np.random.default_rng(1).normal(size=(4, 750, 64)), jnp.bfloat16)
    window_index = jnp.array([0, 1, 40, 59], jnp.int32)
    rote = jax.jit(lambda x: apply_rotary_time_embedding(x, window_index, config.rote, LONG_AUDIO_WINDOWS))
    assert rote(features).dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(rote(features), np.float32),
                                  np.asarray(rote(features.astype(jnp.float32)).astype(jnp.bfloat16), np.float32))


def _all_equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in _subjaxprs(eqn):
            yield from _all_equations(sub)


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(item, "jaxpr"):
                yield item.jaxpr if hasattr(item.jaxpr, "eqns") else item.jaxpr.jaxpr
            elif hasattr(item, "eqns"):
                yield item
