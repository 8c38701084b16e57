"""The spec: our Flax model gives transformers' logits on the same weights and inputs (float32).

References: MusicFlamingoForConditionalGeneration (RoTE), AudioFlamingo3ForConditionalGeneration
(no RoTE), Qwen2ForCausalLM. Tolerance: max |diff| <= 1e-4 x max |reference logit|.
"""

import dataclasses

import jax
import numpy as np
import pytest

from af_next_jax.config import tiny
from af_next_jax.model.af_next import AFNextModel
from af_next_jax.model.synthetic import synthetic_batch, to_transformers_inputs
from hf_reference import build_audio_model, build_qwen2_model, transformers_logits

RELATIVE_TOLERANCE = 1e-4
FRAMES = tiny().encoder.mel_frames_per_window  # 500 frames = one 5 s window of the tiny config

CASES = {
    "one_window": [[FRAMES]],
    "several_windows_per_audio_padded_last": [[2 * FRAMES + 300]],
    "two_audios_of_different_lengths": [[FRAMES + 200, 260]],
    "two_examples_in_a_batch": [[FRAMES], [FRAMES + 400]],
    "text_only_example_beside_audio": [[FRAMES + 100], []],
}


def assert_logits_match(batch, ours, reference):
    valid = batch["segment_ids"] > 0
    scale = np.abs(reference[valid]).max()
    diff = np.abs(reference[valid] - np.asarray(ours)[valid]).max()
    assert diff <= RELATIVE_TOLERANCE * scale, f"max |diff| {diff:.3g} vs logit scale {scale:.3g}"
    return diff, scale


@pytest.fixture(scope="module", params=["musicflamingo", "audioflamingo3"])
def audio_model(request):
    config = tiny() if request.param == "musicflamingo" else tiny(rote=None)
    hf_model, params = build_audio_model(config, seed=1)
    return config, hf_model, params, jax.jit(AFNextModel(config).apply)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(audio_model, case):
    config, hf_model, params, apply = audio_model
    batch = synthetic_batch(config, audio_frames_per_example=CASES[case], seq_len=448, num_windows=4, seed=7)
    assert_logits_match(batch, apply(params, batch), transformers_logits(hf_model, to_transformers_inputs(batch)))


def test_full_30s_windows_match_musicflamingo():
    """Real window geometry: 3000 mel frames -> 750 tokens per window; RoTE over three windows."""
    config = tiny(encoder=dataclasses.replace(tiny().encoder, max_source_positions=1500))
    hf_model, params = build_audio_model(config, seed=2)
    batch = synthetic_batch(config, audio_frames_per_example=[[2 * 3000 + 1234]], seq_len=2048)
    logits = jax.jit(AFNextModel(config).apply)(params, batch)
    assert_logits_match(batch, logits, transformers_logits(hf_model, to_transformers_inputs(batch)))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 1), (4, 4)])
def test_text_only_decoder_matches_qwen2(num_heads, num_kv_heads):
    config = tiny(decoder=dataclasses.replace(tiny().decoder, num_heads=num_heads, num_kv_heads=num_kv_heads))
    hf_model, params = build_qwen2_model(config, seed=3)
    batch = synthetic_batch(config, audio_frames_per_example=[[], []], seq_len=64, seed=4)
    batch["segment_ids"][1, 40:] = 0  # second row right-padded
    text_batch = {k: batch[k] for k in ("token_ids", "positions", "segment_ids")}
    logits = AFNextModel(config).apply(params, text_batch)
    inputs = {"input_ids": batch["token_ids"].astype(np.int64), "attention_mask": batch["segment_ids"].astype(np.int64)}
    assert_logits_match(batch, logits, transformers_logits(hf_model, inputs))


def test_rote_changes_audio_tokens(audio_model):
    """Guard against a silent no-op: with RoTE removed, the same weights give different logits."""
    config, _, params, apply = audio_model
    if config.rote is None:
        pytest.skip("AF3 has no RoTE")
    batch = synthetic_batch(config, audio_frames_per_example=[[2 * FRAMES]], seq_len=448, num_windows=4)
    without_rote = AFNextModel(config.replace(rote=None)).apply(params, batch)
    assert np.abs(np.asarray(apply(params, batch)) - np.asarray(without_rote)).max() > 1e-3
