"""The spec of the KV cache: decoding step by step gives, at every step, the logits of a full forward
over the same tokens (the training computation), within 1e-4 of the logit scale."""

import jax
import numpy as np
import pytest

from af_next_jax.config import tiny
from af_next_jax.inference.decoding import Generator
from af_next_jax.model.af_next import AFNextModel
from decoding_helpers import append_tokens, left_padded_prompts

RELATIVE_TOLERANCE = 1e-4
FRAMES = tiny().encoder.mel_frames_per_window
STEPS = 6


@pytest.fixture(scope="module", params=["musicflamingo", "audioflamingo3"])
def model_and_prompts(request):
    config = tiny() if request.param == "musicflamingo" else tiny(rote=None)
    # Two prompts of different lengths, each with its own audios; one audio over three windows.
    prompts = left_padded_prompts(config, [[2 * FRAMES + 300, 200], [FRAMES]], seq_len=1024, seed=3,
                                  extra_text=(0, 9))
    params = AFNextModel(config).init(jax.random.key(0), prompts)
    return config, params, prompts


def test_cached_decoding_matches_full_forward_at_every_step(model_and_prompts):
    config, params, prompts = model_and_prompts
    rng = np.random.default_rng(0)
    continuation_BxT = rng.integers(1, 500, (2, STEPS)).astype(np.int32)
    full = append_tokens(prompts, continuation_BxT)
    reference_BxLxV = np.asarray(jax.jit(AFNextModel(config).apply)(params, full))
    prompt_length = prompts["token_ids"].shape[1]
    expected_BxTxV = reference_BxLxV[:, prompt_length - 1:]

    generator = Generator(config)
    logits_BxV, cache = generator.prefill(params, prompts, max_length=prompt_length + STEPS)
    got = [np.asarray(logits_BxV)]
    positions_B = prompts["positions"][:, -1] + 1
    for step in range(STEPS):
        logits_BxV, cache = generator.decode_step(params, continuation_BxT[:, step], positions_B + step, cache)
        got.append(np.asarray(logits_BxV))
    got_BxTxV = np.stack(got, axis=1)
    scale = np.abs(expected_BxTxV).max()
    diff_T = np.abs(got_BxTxV - expected_BxTxV).max(axis=(0, 2))
    assert diff_T.max() <= RELATIVE_TOLERANCE * scale, f"per-step max |diff| {diff_T} vs logit scale {scale:.3g}"


def test_left_padding_does_not_change_a_row(model_and_prompts):
    """Row 1 decoded alone (no padding) and beside a longer row (left-padded) gives the same logits:
    padding slots are invisible to the prefill and to every decode step."""
    config, params, prompts = model_and_prompts
    generator = Generator(config)
    prompt_length = prompts["token_ids"].shape[1]
    real = prompts["segment_ids"][1] > 0
    windows_of_row_0 = 4  # row 0: 2 * FRAMES + 300 frames (3 windows) and 200 frames (1 window)
    alone = {name: prompts[name][1:, real] for name in ("token_ids", "positions", "segment_ids")}
    alone |= {name: prompts[name][windows_of_row_0:] for name in ("mel_windows", "mel_valid_frames", "window_index")}
    token_B = np.array([7, 7], np.int32)
    both_logits, both_cache = generator.prefill(params, prompts, max_length=prompt_length + 1)
    alone_logits, alone_cache = generator.prefill(params, alone, max_length=int(real.sum()) + 1)
    both_next, _ = generator.decode_step(params, token_B, prompts["positions"][:, -1] + 1, both_cache)
    alone_next, _ = generator.decode_step(params, token_B[:1], alone["positions"][:, -1] + 1, alone_cache)
    scale = np.abs(np.asarray(alone_logits)).max()
    for both, single in ((both_logits, alone_logits), (both_next, alone_next)):
        assert np.abs(np.asarray(both)[1] - np.asarray(single)[0]).max() <= RELATIVE_TOLERANCE * scale


def test_unrolled_layers_decode_like_scanned_layers():
    """scan_layers=False slices the cache per layer in Python (layers.py): same logits as a full forward."""
    config = tiny(scan_layers=False)
    prompts = left_padded_prompts(config, [[], []], seq_len=64, seed=5, text_tokens_between=6, extra_text=(0, 3))
    params = AFNextModel(config).init(jax.random.key(2), prompts)
    full = append_tokens(prompts, np.array([[11, 12], [13, 14]], np.int32))
    expected_BxLxV = np.asarray(AFNextModel(config).apply(params, full))
    generator = Generator(config)
    prompt_length = prompts["token_ids"].shape[1]
    first_BxV, cache = generator.prefill(params, prompts, max_length=prompt_length + 2)
    second_BxV, _ = generator.decode_step(params, full["token_ids"][:, prompt_length],
                                          full["positions"][:, prompt_length], cache)
    scale = np.abs(expected_BxLxV).max()
    for got, column in ((first_BxV, prompt_length - 1), (second_BxV, prompt_length)):
        assert np.abs(np.asarray(got) - expected_BxLxV[:, column]).max() <= RELATIVE_TOLERANCE * scale


def test_decoding_runs_without_a_sequence_parallel_strategy():
    """One token per step has nothing to split: a ring/hybrid training config decodes without one."""
    from af_next_jax.inference.decoding import inference_config

    for strategy in ("ring", "ulysses", "hybrid"):
        config = inference_config(tiny(sequence_parallelism=strategy))
        assert config.sequence_parallelism == "none" and config.decoder == tiny().decoder
