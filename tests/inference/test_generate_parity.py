"""The spec of greedy decoding: token-identical to transformers' `generate` on the same weights.

References: MusicFlamingoForConditionalGeneration (RoTE) and AudioFlamingo3ForConditionalGeneration,
tiny random models (tests/hf_reference.py, weights x4: decoding_helpers.build_varied_audio_model), a batch
of 2 left-padded prompts of different lengths with 3 audios (one over three windows), 40 greedy
tokens each. Float rounding may split a near-tie: a row may then diverge, but only at a step where
the reference's top-2 logit gap is below 1e-4 of its logit scale (the test reports such a step
rather than hiding it). Measured: both rows of both models are token-identical over all 40 steps.
"""

import numpy as np
import pytest
import torch

from af_next_jax.config import tiny
from af_next_jax.inference.decoding import Generator
from af_next_jax.model.synthetic import PAD_ID, to_transformers_inputs
from decoding_helpers import build_varied_audio_model, left_padded_prompts

NEW_TOKENS = 40
NEAR_TIE = 1e-4
# The reference must not fall into a one-token loop, or most steps would test nothing.
MIN_DISTINCT_TOKENS = 10
FRAMES = tiny().encoder.mel_frames_per_window


def transformers_greedy(hf_model, batch):
    inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in to_transformers_inputs(batch).items()}
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                pad_token_id=PAD_ID, output_logits=True, return_dict_in_generate=True)
    prompt_length = batch["token_ids"].shape[1]
    tokens_BxN = out.sequences[:, prompt_length:].numpy()
    logits_BxNxV = torch.stack(out.logits, dim=1).float().numpy()
    return tokens_BxN, logits_BxNxV


@pytest.mark.parametrize("family", ["musicflamingo", "audioflamingo3"])
def test_greedy_generation_matches_transformers(family):
    config = tiny() if family == "musicflamingo" else tiny(rote=None)
    hf_model, params = build_varied_audio_model(config, seed=5)
    batch = left_padded_prompts(config, [[2 * FRAMES + 300, 200], [FRAMES + 100]], seq_len=1024, seed=11,
                                extra_text=(0, 17))
    lengths = (batch["segment_ids"] > 0).sum(axis=1)
    assert lengths[0] != lengths[1]

    expected_BxN, reference_logits_BxNxV = transformers_greedy(hf_model, batch)
    assert expected_BxN.shape == (2, NEW_TOKENS)
    assert min(len(set(row)) for row in expected_BxN) >= MIN_DISTINCT_TOKENS, expected_BxN
    result = Generator(config).generate(params, batch, max_new_tokens=NEW_TOKENS, pad_id=PAD_ID)
    got_BxN = result.tokens_BxN

    for row in range(2):
        differ = np.flatnonzero(got_BxN[row] != expected_BxN[row])
        if differ.size == 0:
            continue
        step = int(differ[0])
        top2 = np.sort(reference_logits_BxNxV[row, step])[-2:]
        scale = np.abs(reference_logits_BxNxV[row, step]).max()
        assert top2[1] - top2[0] < NEAR_TIE * scale, (
            f"row {row} diverges at step {step} ({got_BxN[row, step]} vs transformers' {expected_BxN[row, step]}) "
            f"where the reference's top-2 gap {top2[1] - top2[0]:.3g} is no near-tie (logit scale {scale:.3g})")
