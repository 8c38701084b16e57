"""Config validation: bad values stop at construction with a message naming the value."""

import dataclasses

import numpy as np
import pytest

from af_next_jax.batch import validate_batch
from af_next_jax.config import DecoderConfig, EncoderConfig, af_next_7b, af3_7b, encoder_tokens_for_frames, preset, tiny
from af_next_jax.model.synthetic import synthetic_batch


def test_presets_carry_reference_dimensions():
    config = af_next_7b()
    assert (config.decoder.rope_theta, config.decoder.max_position_embeddings) == (1.53e7, 131072)
    assert (config.decoder.vocab_size, config.max_windows_per_audio) == (151672, 60)
    assert config.encoder.tokens_per_window == 750 and config.max_audio_tokens == 45_000
    assert config.rote.rotary_dim(config.encoder.hidden_size) == 256
    assert af3_7b().rote is None and af3_7b().max_windows_per_audio == 20


@pytest.mark.parametrize("frames,tokens", [(3000, 750), (2999, 750), (2997, 749), (1, 0), (0, 0), (5, 1)])
def test_encoder_token_arithmetic_matches_reference_formula(frames, tokens):
    # ((L - 1) // 2 + 1 - 2) // 2 + 1 from transformers' _get_feat_extract_output_lengths
    assert encoder_tokens_for_frames(frames) == tokens
    assert encoder_tokens_for_frames(np.array([frames]))[0] == tokens


@pytest.mark.parametrize("make,message", [
    (lambda: DecoderConfig(num_heads=28, num_kv_heads=5), "multiple of num_kv_heads 5"),
    (lambda: EncoderConfig(hidden_size=100, num_heads=3), "divisible by num_heads 3"),
    (lambda: tiny(compute_dtype="int8"), "compute_dtype must be one of"),
    (lambda: tiny(remat_policy="sometimes"), "remat_policy must be one of"),
    (lambda: tiny(attention_kernel="flash"), "attention_kernel must be one of"),
    (lambda: tiny(sequence_parallelism="xla"), "sequence_parallelism must be one of"),
    (lambda: tiny(audio_token_id=5000), "audio_token_id=5000 is outside the decoder vocabulary"),
    (lambda: preset("huge"), "unknown model preset 'huge'"),
])
def test_invalid_config_names_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_validate_batch_rejects_slot_count_mismatch():
    config = tiny()
    batch = synthetic_batch(config, audio_frames_per_example=[[700]], seq_len=256)
    validate_batch(batch, config)
    batch["mel_valid_frames"][0] -= 8
    with pytest.raises(ValueError, match="<sound> slots"):
        validate_batch(batch, config)


def test_validate_batch_rejects_wrong_window_geometry():
    config = tiny()
    batch = synthetic_batch(config, audio_frames_per_example=[[700]], seq_len=256)
    batch["mel_windows"] = batch["mel_windows"][:, :, :100]
    with pytest.raises(ValueError, match=r"mel_windows must be \[windows, 128, 500\]"):
        validate_batch(batch, dataclasses.replace(config))
