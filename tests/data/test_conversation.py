"""ChatML + <sound> expansion + assistant-only loss mask (transformers' AF3 processor layout)."""

import numpy as np

from af_next_jax.data.conversation import encode_conversation
from af_next_jax.data.manifest import Turn

TURNS = (Turn("system", "You are a helpful assistant that listens to audio."),
         Turn("user", "<sound>\nWhich comes first?"),
         Turn("assistant", "<think>A tone plays from 2.4s to 3.1s.</think>The beep comes first."))


def test_chatml_rendering_with_sound_expansion(demo_tokenizer):
    ids, _ = encode_conversation(TURNS, demo_tokenizer, [7])
    expected = ("<|im_start|>system\nYou are a helpful assistant that listens to audio.<|im_end|>\n"
                "<|im_start|>user\n<|sound_bos|>" + "<sound>" * 7 + "<|sound_eos|>\n"
                "Which comes first?<|im_end|>\n"
                "<|im_start|>assistant\n"
                "<think>A tone plays from 2.4s to 3.1s.</think>The beep comes first.<|im_end|>\n")
    assert demo_tokenizer.decode(ids) == expected
    assert ids.dtype == np.int32
    assert int((ids == demo_tokenizer.special.audio).sum()) == 7


def test_loss_mask_covers_assistant_content_and_im_end_only(demo_tokenizer):
    ids, trainable = encode_conversation(TURNS, demo_tokenizer, [7])
    trained_text = demo_tokenizer.decode(ids[trainable])
    assert trained_text == "<think>A tone plays from 2.4s to 3.1s.</think>The beep comes first.<|im_end|>"
    # The trained span is one contiguous run at the end, before the final newline.
    trained_positions = np.flatnonzero(trainable)
    assert np.all(np.diff(trained_positions) == 1) and trained_positions[-1] == len(ids) - 2


def test_each_placeholder_gets_its_own_audio_count(demo_tokenizer):
    turns = (Turn("user", "<sound> then <sound>"), Turn("assistant", "ok"))
    ids, _ = encode_conversation(turns, demo_tokenizer, [3, 5])
    special = demo_tokenizer.special
    bos = np.flatnonzero(ids == special.audio_bos)
    eos = np.flatnonzero(ids == special.audio_eos)
    assert (eos - bos - 1).tolist() == [3, 5]


def test_multi_turn_masks_every_assistant_turn(demo_tokenizer):
    turns = (Turn("user", "<sound>one"), Turn("assistant", "A"), Turn("user", "two"), Turn("assistant", "B"))
    ids, trainable = encode_conversation(turns, demo_tokenizer, [2])
    assert demo_tokenizer.decode(ids[trainable]) == "A<|im_end|>B<|im_end|>"
