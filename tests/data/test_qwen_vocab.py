"""Qwen2.5's real vocabulary, built offline from qwen.tiktoken, through our tokenizer interface.

qwen.tiktoken ships inside the `qwen-agent` wheel; `make test` extracts it into the fixture cache
(external_fixtures.py, never committed). transformers' TikTokenConverter turns it into a byte-level
BPE tokenizer.json. Reference ids are Qwen2.5's.
"""

import pytest

from external_fixtures import fixture_path

# Qwen2's pre-tokenizer: like cl100k but single digits (\p{N}, not \p{N}{1,3}).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2.5 special tokens 151643..151664, then AF-Next's additions up to its 151672-id vocabulary.
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                 "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
                 "<sound>", "<|sound_bos|>", "<|sound_eos|>"]


@pytest.fixture(scope="module")
def qwen_tokenizer_json(tmp_path_factory):
    from transformers.convert_slow_tokenizer import TikTokenConverter  # needs tiktoken (the test extra)

    ranks = fixture_path("qwen.tiktoken")
    folder = tmp_path_factory.mktemp("qwen")
    tokenizer = TikTokenConverter(vocab_file=ranks, pattern=QWEN_PATTERN).converted()
    tokenizer.add_special_tokens(QWEN_SPECIALS)
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return str(path)


def test_qwen_ids_through_our_interface(qwen_tokenizer_json):
    from af_next_jax import config as config_lib
    from af_next_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(qwen_tokenizer_json)
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>") == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645]
    assert tokenizer.encode("123") == [16, 17, 18]  # Qwen splits digits one by one
    assert tokenizer.special.im_start == 151644 and tokenizer.special.im_end == 151645
    assert tokenizer.special.pad == 151643
    # The audio ids land where transformers' AF3/MusicFlamingo configs put them (and our default config).
    default = config_lib.ModelConfig()
    assert tokenizer.model_config_ids() == {"audio_token_id": default.audio_token_id,
                                            "audio_bos_token_id": default.audio_bos_token_id,
                                            "audio_eos_token_id": default.audio_eos_token_id}
    assert tokenizer.vocab_size == 151672 == default.decoder.vocab_size
    tokenizer.check_compatible(default)
