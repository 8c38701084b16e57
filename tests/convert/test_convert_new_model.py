"""A new model from a bare Qwen2 LLM + a Whisper encoder (projector random, RoTE default):
the weights land where the rules say, and the export is a loadable MusicFlamingo that verify passes."""

import numpy as np
import pytest
import transformers

from af_next_jax.config import RoteConfig, tiny
from af_next_jax.convert import orbax_io
from conftest import run_cli
from hf_reference import build_qwen2_model, randomize_

CONFIG = tiny()
ENCODER = CONFIG.encoder
AUDIO_IDS = ["--audio-token-id", CONFIG.audio_token_id, "--audio-bos-token-id", CONFIG.audio_bos_token_id,
             "--audio-eos-token-id", CONFIG.audio_eos_token_id]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(qwen2 model, its dir, whisper model, its dir): tiny random transformers models, save_pretrained."""
    root = tmp_path_factory.mktemp("pair")
    qwen2, _ = build_qwen2_model(CONFIG, seed=11)
    qwen2.save_pretrained(root / "qwen2")
    whisper_config = transformers.WhisperConfig(
        d_model=ENCODER.hidden_size, encoder_layers=ENCODER.num_layers, encoder_attention_heads=ENCODER.num_heads,
        encoder_ffn_dim=ENCODER.intermediate_size, num_mel_bins=ENCODER.num_mel_bins,
        max_source_positions=ENCODER.max_source_positions, decoder_layers=1, decoder_attention_heads=4,
        decoder_ffn_dim=32, vocab_size=96, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)
    whisper = transformers.WhisperForConditionalGeneration(whisper_config).eval()
    randomize_(whisper, seed=12)
    whisper.save_pretrained(root / "whisper")
    return qwen2, root / "qwen2", whisper, root / "whisper"


@pytest.fixture(scope="module")
def new_checkpoint(pair, tmp_path_factory):
    _, qwen2_dir, _, whisper_dir = pair
    out = tmp_path_factory.mktemp("new") / "ckpt"
    assert run_cli("from-hf", "--qwen2-dir", qwen2_dir, "--whisper-dir", whisper_dir, "--out", out, *AUDIO_IDS,
                   "--quiet") == 0
    return out


def test_config_takes_dimensions_from_both_sources_and_default_rote(new_checkpoint):
    config = orbax_io.load_config(new_checkpoint)
    assert config.encoder == ENCODER
    assert config.decoder == CONFIG.decoder
    assert config.rote == RoteConfig()


def test_weights_come_from_qwen2_and_whisper_encoder(pair, new_checkpoint):
    qwen2, _, whisper, _ = pair
    params = orbax_io.load_params(new_checkpoint)["params"]
    qwen2_weights, whisper_weights = qwen2.state_dict(), whisper.state_dict()
    np.testing.assert_array_equal(params["decoder"]["embed_tokens"], qwen2_weights["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["decoder"]["lm_head"], qwen2_weights["lm_head.weight"].numpy().T)
    np.testing.assert_array_equal(params["encoder"]["layers"]["fc1"]["kernel"][1],
                                  whisper_weights["model.encoder.layers.1.fc1.weight"].numpy().T)
    np.testing.assert_array_equal(params["encoder"]["layer_norm"]["scale"],
                                  whisper_weights["model.encoder.layer_norm.weight"])


def test_projector_is_randomly_initialised_with_the_right_shapes(new_checkpoint):
    projector = orbax_io.load_params(new_checkpoint)["params"]["projector"]
    kernel = projector["linear_1"]["kernel"]
    assert kernel.shape == (ENCODER.hidden_size, CONFIG.decoder.hidden_size)
    assert projector["linear_2"]["kernel"].shape == (CONFIG.decoder.hidden_size,) * 2
    assert np.isfinite(kernel).all() and kernel.std() > 0


def test_export_is_a_musicflamingo_that_verify_passes(new_checkpoint, tmp_path, capsys, transformers_warnings):
    assert run_cli("to-hf", "--checkpoint", new_checkpoint, "--out", tmp_path / "hf", "--quiet") == 0
    _, info = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                                output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert run_cli("verify", "--hf-dir", tmp_path / "hf", "--checkpoint", new_checkpoint) == 0, capsys.readouterr()


def test_wrong_directory_for_qwen2_is_named(pair, tmp_path, capsys):
    _, _, _, whisper_dir = pair
    assert run_cli("from-hf", "--qwen2-dir", whisper_dir, "--whisper-dir", whisper_dir, "--out", tmp_path / "x",
                   "--quiet") == 2
    assert "'whisper'" in capsys.readouterr().err and not (tmp_path / "x").exists()
