"""`from-hf --preset af_next_7b|af3_7b` against the real public configs and Qwen2.5's real vocabulary.

No 7B weights: the plan step reads only config.json, preprocessor_config.json and tokenizer.json, so
the checks that decide whether the 7B curriculum can start are tested at full size. Qwen2.5's
tokenizer.json is built offline from `qwen.tiktoken` (the fixture test_qwen_vocab.py uses).
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
from external_fixtures import fixture_path  # noqa: E402
from test_qwen_vocab import QWEN_PATTERN, QWEN_SPECIALS  # noqa: E402

# Qwen2.5's own 22 special tokens (151643..151664); the rest of QWEN_SPECIALS are later additions.
QWEN25_SPECIALS = QWEN_SPECIALS[:QWEN_SPECIALS.index("<|file_sep|>") + 1]
# Public config.json of Qwen2.5-7B (the base model) and Whisper-large-v3, the fields we read.
QWEN25_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
             "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
             "tie_word_embeddings": False}
WHISPER_LARGE_V3 = {"model_type": "whisper", "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
                    "encoder_ffn_dim": 5120, "num_mel_bins": 128, "max_source_positions": 1500}
WHISPER_LARGE_V3_FEATURES = {"feature_size": 128, "chunk_length": 30, "sampling_rate": 16000, "hop_length": 160,
                             "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000}
# AF-Next's tokenizer layout (special_tokens.py), as tests/data/test_qwen_vocab.py expects it.
EXPECTED_IDS = {"<think>": 151667, "</think>": 151668, "<sound>": 151669, "<|sound_bos|>": 151670,
                "<|sound_eos|>": 151671}


@pytest.fixture(scope="module")
def public_dirs(tmp_path_factory):
    from transformers.convert_slow_tokenizer import TikTokenConverter
    root = tmp_path_factory.mktemp("public")
    tokenizer = TikTokenConverter(vocab_file=fixture_path("qwen.tiktoken"), pattern=QWEN_PATTERN).converted()
    tokenizer.add_special_tokens(QWEN25_SPECIALS)
    (root / "qwen2").mkdir()
    tokenizer.save(str(root / "qwen2" / "tokenizer.json"))
    (root / "qwen2" / "config.json").write_text(json.dumps(QWEN25_7B))
    (root / "whisper").mkdir()
    (root / "whisper" / "config.json").write_text(json.dumps(WHISPER_LARGE_V3))
    (root / "whisper" / "preprocessor_config.json").write_text(json.dumps(WHISPER_LARGE_V3_FEATURES))
    return root


@pytest.fixture(scope="module", params=["af_next_7b", "af3_7b"])
def plan(public_dirs, request):
    """What `from-hf --preset` decides before reading a tensor (loading a 151k tokenizer takes seconds)."""
    from af_next_jax.convert.base_models import plan_base_models
    return plan_base_models(public_dirs / "qwen2", QWEN25_7B, public_dirs / "whisper", WHISPER_LARGE_V3,
                            request.param)


def test_qwen25_vocabulary_gets_the_af_next_tokens_at_the_preset_ids(plan, tmp_path):
    from af_next_jax.data.tokenizer import load_tokenizer
    assert plan.tokenizer.source_size == 151665
    assert {token: plan.tokenizer.added[token] for token in EXPECTED_IDS} == EXPECTED_IDS
    # The two ids between Qwen2.5's last token and <think> hold placeholders, so nothing is renumbered.
    assert sorted(plan.tokenizer.added.values()) == list(range(151665, 151672))
    plan.tokenizer.write(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    tokenizer.check_compatible(plan.config)
    assert tokenizer.vocab_size == plan.config.decoder.vocab_size == 151672
    assert tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>") == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645]


def test_7b_report_names_rope_and_vocabulary_changes(plan):
    text = "\n".join(plan.changes({"tokenizer_ids": 151665, "mean_initialised_rows": [151665, 151671],
                                   "dropped_unused_rows": [151672, 152063]}))
    assert "vocab_size 152064 -> 151672" in text
    if plan.config.rote:   # AF-Next: long-context RoPE, 128K positions as Qwen2.5-7B base already has
        assert "rope_theta 1e+06 -> 1.53e+07" in text and "max_position_embeddings 131072 (unchanged)" in text
    else:                  # AF3: Qwen2.5's theta, 32K positions
        assert "rope_theta 1e+06 (unchanged)" in text and "max_position_embeddings 131072 -> 32768" in text
