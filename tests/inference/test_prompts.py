"""Generation prompts: the data pipeline's ChatML (same headers, same audio layout per model family)
ending in the opened assistant turn of the variant; left-padded batches with per-row positions."""

import numpy as np
import pytest

from af_next_jax.config import tiny
from af_next_jax.data.tokenizer import load_tokenizer
from af_next_jax.data.audio_features import AudioFeatures
from af_next_jax.inference.prompts import encode_prompt, prompt_batch, prompt_turns


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return load_tokenizer(str(checkpoint / "tokenizer.json"))


def config_for(tokenizer, family):
    config = tiny(**tokenizer.model_config_ids())
    return config if family == "musicflamingo" else config.replace(rote=None)


@pytest.mark.parametrize("family,variant,run,prefix", [
    ("musicflamingo", "instruct", "<|sound_bos|><sound><sound><sound><|sound_eos|>", ""),
    ("musicflamingo", "think", "<|sound_bos|><sound><sound><sound><|sound_eos|>", "<think>"),
    ("audioflamingo3", "instruct", "<sound><sound><sound>", ""),  # AF3's processor adds no markers
])
def test_prompt_is_chatml_ending_in_the_opened_assistant_turn(tokenizer, family, variant, run, prefix):
    config = config_for(tokenizer, family)
    turns = prompt_turns("When does the beep start?", 1, variant=variant, system="Listen.")
    ids = encode_prompt(turns, tokenizer, [3], config, variant=variant)
    expected = (f"<|im_start|>system\nListen.<|im_end|>\n<|im_start|>user\n{run}\nWhen does the beep start?"
                f"<|im_end|>\n<|im_start|>assistant\n{prefix}")
    assert tokenizer.decode(ids) == expected


def test_captioner_asks_for_a_caption_without_a_question():
    (user,) = prompt_turns("", 2, variant="captioner")
    assert user.content == "<sound><sound>\nDescribe the audio with timestamps."


def test_a_finished_conversation_is_refused(tokenizer):
    turns = prompt_turns("Q?", 0) + [prompt_turns("A", 0)[0].__class__("assistant", "A.")]
    with pytest.raises(ValueError, match="ends with a user turn"):
        encode_prompt(turns, tokenizer, [], config_for(tokenizer, "musicflamingo"))


def test_prompt_batch_left_pads_and_counts_positions_per_row():
    config = tiny()
    encoder = config.encoder
    one_window = AudioFeatures(np.ones((1, encoder.num_mel_bins, encoder.mel_frames_per_window), np.float32),
                            np.array([encoder.mel_frames_per_window], np.int32), 0.0)
    sound = [config.audio_token_id] * one_window.token_count
    rows = [np.array([5, 6] + sound + [7], np.int32), np.array([8] + sound, np.int32)]
    batch = prompt_batch(rows, [[one_window], [one_window]], config, pad_id=0, length=len(rows[0]) + 2)
    length = len(rows[0]) + 2
    assert batch["token_ids"].shape == (2, length)
    np.testing.assert_array_equal(batch["token_ids"][1, -len(rows[1]):], rows[1])
    np.testing.assert_array_equal(batch["segment_ids"].sum(axis=1), [len(rows[0]), len(rows[1])])
    assert batch["positions"][0, -1] == len(rows[0]) - 1 and batch["positions"][1, -1] == len(rows[1]) - 1
    assert (batch["positions"][batch["segment_ids"] == 0] == 0).all()
    np.testing.assert_array_equal(batch["window_index"], [0, 0])
    with pytest.raises(ValueError, match="slots"):
        prompt_batch(rows, [[one_window], []], config, pad_id=0)
