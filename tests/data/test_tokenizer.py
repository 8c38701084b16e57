"""One tokenizer interface over HF tokenizer.json and SentencePiece .model, special ids by string."""

import io

import pytest

from af_next_jax import config as config_lib
from af_next_jax.data.tokenizer import SPECIAL_TOKENS, load_tokenizer


@pytest.fixture(scope="module")
def sentencepiece_path(tmp_path_factory):
    import sentencepiece

    model = io.BytesIO()
    text = ["the beep starts at two seconds", "a noise burst follows the tone", "which comes first"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=60, hard_vocab_limit=False,
        user_defined_symbols=list(SPECIAL_TOKENS.values()) + ["<|endoftext|>"])
    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.mark.parametrize("which", ["hf", "sentencepiece"])
def test_special_tokens_encode_to_single_ids(which, demo_dir, sentencepiece_path):
    path = str(demo_dir / "tokenizer.json") if which == "hf" else sentencepiece_path
    tokenizer = load_tokenizer(path)
    assert tokenizer.kind == which
    for name, token in SPECIAL_TOKENS.items():
        assert tokenizer.encode(token) == [getattr(tokenizer.special, name)]
    ids = tokenizer.encode("<think>the beep</think>first")
    assert ids[0] == tokenizer.special.think_start and tokenizer.special.think_end in ids
    assert tokenizer.decode(ids).replace(" ", "") == "<think>thebeep</think>first"
    assert len(set(tokenizer.model_config_ids().values())) == 3


def test_demo_tokenizer_round_trips_timestamps(demo_tokenizer):
    text = "<think>A low-pitched tone plays from 2.4s to 3.1s.</think>The beep starts at 2.4s."
    assert demo_tokenizer.decode(demo_tokenizer.encode(text)) == text


def test_folder_path_finds_tokenizer_json(demo_dir):
    assert load_tokenizer(str(demo_dir)).path.endswith("tokenizer.json")


def test_vocab_larger_than_model_is_a_clear_error(demo_tokenizer):
    small = config_lib.tiny(decoder=config_lib.DecoderConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                                             num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16),
                            audio_token_id=1, audio_bos_token_id=2, audio_eos_token_id=3)
    with pytest.raises(ValueError, match="vocab_size"):
        demo_tokenizer.check_compatible(small)


def test_mismatched_audio_ids_are_a_clear_error(demo_tokenizer):
    with pytest.raises(ValueError, match=r"model_config.replace\(\*\*tokenizer.model_config_ids\(\)\)"):
        demo_tokenizer.check_compatible(config_lib.tiny())
    demo_tokenizer.check_compatible(config_lib.tiny().replace(**demo_tokenizer.model_config_ids()))


def test_missing_special_tokens_are_named(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    bare = tokenizers.Tokenizer(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    bare.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="<sound>"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
