"""`from-hf --qwen2-dir --whisper-dir --preset`: the public base models become the preset's model.

A tiny Qwen2 whose vocabulary (1100 rows) is larger than the `tiny` preset's (1024), with a real
byte-level BPE tokenizer.json that lacks the AF-Next tokens, and a tiny Whisper with its feature
extractor config. Checked: the tokenizer gains the tokens at the config's ids and encodes a
conversation as the data pipeline expects, the rows are resized as vocabulary.py documents, the
config is exactly the preset's, a stage-1 (projector) run takes the checkpoint with `init_from`,
and the export loads in transformers.
"""

import json
import os
import shutil

import numpy as np
import pytest
import transformers

from af_next_jax.config import tiny
from af_next_jax.convert import orbax_io
from conftest import run_cli, write_bpe_tokenizer
from hf_reference import build_qwen2_model, randomize_

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET = tiny()
SOURCE_ROWS = 1100                # Qwen2's rows: more than the preset's 1024
def write_qwen2(folder, rows: int, seed: int):
    """A tiny Qwen2 (`rows` vocabulary rows, Qwen2.5's own theta 1e6 / 32K positions) + tokenizer."""
    decoder = PRESET.decoder
    source = PRESET.replace(decoder=type(decoder)(**{**vars(decoder), "vocab_size": rows, "rope_theta": 1e6,
                                                     "max_position_embeddings": 32768}),
                            audio_token_id=0, audio_bos_token_id=1, audio_eos_token_id=2)
    model, _ = build_qwen2_model(source, seed=seed)
    model.save_pretrained(folder)
    used = write_bpe_tokenizer(folder)
    return model, used


def write_whisper(folder, num_mel_bins: int = PRESET.encoder.num_mel_bins):
    encoder = PRESET.encoder
    config = transformers.WhisperConfig(
        d_model=encoder.hidden_size, encoder_layers=encoder.num_layers, encoder_attention_heads=encoder.num_heads,
        encoder_ffn_dim=encoder.intermediate_size, num_mel_bins=num_mel_bins,
        max_source_positions=encoder.max_source_positions, decoder_layers=1, decoder_attention_heads=4,
        decoder_ffn_dim=32, vocab_size=96, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1)
    whisper = transformers.WhisperForConditionalGeneration(config).eval()
    randomize_(whisper, seed=12)
    whisper.save_pretrained(folder)
    transformers.WhisperFeatureExtractor(feature_size=num_mel_bins,
                                         chunk_length=int(encoder.window_seconds)).save_pretrained(folder)
    return whisper


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("base_models")
    qwen2, used = write_qwen2(root / "qwen2", SOURCE_ROWS, seed=21)
    write_whisper(root / "whisper")
    return dict(root=root, qwen2=qwen2, qwen2_dir=root / "qwen2", whisper_dir=root / "whisper", used=used)


@pytest.fixture(scope="module")
def converted(sources):
    out = sources["root"] / "ckpt"
    assert run_cli("from-hf", "--qwen2-dir", sources["qwen2_dir"], "--whisper-dir", sources["whisper_dir"],
                   "--out", out, "--preset", "tiny", "--quiet") == 0
    return out


def test_checkpoint_config_is_the_preset_with_its_rope(converted):
    """vocab_size, RoPE theta 1e6 -> the preset's, 32K -> the preset's positions, audio ids: all the preset's."""
    assert orbax_io.load_config(converted) == PRESET


def test_tokenizer_gains_the_af_next_tokens_at_the_config_ids(converted, sources):
    from tokenizers import Tokenizer as HFTokenizer

    from af_next_jax.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(str(converted))
    special = tokenizer.special
    assert (special.audio, special.audio_bos, special.audio_eos) == (
        PRESET.audio_token_id, PRESET.audio_bos_token_id, PRESET.audio_eos_token_id)
    assert (special.think_start, special.think_end) == (PRESET.audio_token_id - 2, PRESET.audio_token_id - 1)
    assert tokenizer.vocab_size == PRESET.decoder.vocab_size
    tokenizer.check_compatible(PRESET)
    # The BPE itself is untouched: ordinary text encodes as Qwen2's own tokenizer encodes it.
    source = HFTokenizer.from_file(str(sources["qwen2_dir"] / "tokenizer.json"))
    text = "the speaker says hello at 10.7s"
    assert tokenizer.encode(text) == source.encode(text, add_special_tokens=False).ids
    # transformers reads the added tokens too (tokenizer_config.json lists them).
    decoder = json.loads((converted / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert decoder[str(PRESET.audio_token_id)]["content"] == "<sound>"


def test_tokenizer_encodes_an_af_next_conversation_with_the_config_ids(converted):
    from af_next_jax.data.conversation import encode_conversation, uses_audio_markers
    from af_next_jax.data.manifest import AUDIO_PLACEHOLDER, Turn
    from af_next_jax.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(str(converted))
    turns = [Turn("user", f"{AUDIO_PLACEHOLDER}What do you hear?"),
             Turn("assistant", "<think>a dog at 1.0s</think>A dog barks.")]
    ids, trainable = encode_conversation(turns, tokenizer, [3], audio_markers=uses_audio_markers(PRESET))
    ids = ids.tolist()
    start = ids.index(PRESET.audio_bos_token_id)
    assert ids[start:start + 5] == [PRESET.audio_bos_token_id] + [PRESET.audio_token_id] * 3 + [
        PRESET.audio_eos_token_id]
    think = ids.index(PRESET.audio_token_id - 2)
    assert trainable[think] and PRESET.audio_token_id - 1 in ids[think:]
    assert tokenizer.decode(ids).count("<think>") == 1


def test_kept_rows_are_qwen2s_and_new_rows_are_the_mean_of_the_kept_rows(converted, sources):
    """vocabulary.py: rows the tokenizer uses kept bit for bit; rows used..1023 = their mean; 1024.. dropped."""
    weights = sources["qwen2"].state_dict()
    used = sources["used"]
    embed = weights["model.embed_tokens.weight"].numpy()
    lm_head = weights["lm_head.weight"].numpy()          # [V, D] in transformers
    decoder = orbax_io.load_params(converted)["params"]["decoder"]
    rows = PRESET.decoder.vocab_size
    assert decoder["embed_tokens"].shape == (rows, PRESET.decoder.hidden_size)
    assert decoder["lm_head"].shape == (PRESET.decoder.hidden_size, rows)
    np.testing.assert_array_equal(decoder["embed_tokens"][:used], embed[:used])
    np.testing.assert_array_equal(decoder["lm_head"][:, :used], lm_head[:used].T)
    for ours, theirs in ((decoder["embed_tokens"], embed), (decoder["lm_head"].T, lm_head)):
        mean = theirs[:used].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(ours[used:], np.broadcast_to(mean, ours[used:].shape), rtol=1e-6, atol=1e-7)


def test_report_names_what_changed(converted, sources):
    changes = json.loads((converted / orbax_io.CONVERSION_FILE).read_text())["changes"]
    text = "\n".join(changes)
    used = sources["used"]
    assert f"vocab_size {SOURCE_ROWS} -> {PRESET.decoder.vocab_size}" in text
    assert f"rows {used}..{PRESET.decoder.vocab_size - 1} of embed_tokens and lm_head set to the mean" in text
    assert f"rows {PRESET.decoder.vocab_size}..{SOURCE_ROWS - 1} dropped" in text
    assert f"rope_theta 1e+06 -> {PRESET.decoder.rope_theta:g}" in text
    assert f"max_position_embeddings 32768 -> {PRESET.decoder.max_position_embeddings}" in text
    assert f"<sound> {PRESET.audio_token_id}" in text and "<think>" in text


def test_smaller_vocabulary_grows_with_mean_rows(sources, tmp_path):
    qwen2, used = write_qwen2(tmp_path / "qwen2", rows=600, seed=22)
    assert run_cli("from-hf", "--qwen2-dir", tmp_path / "qwen2", "--whisper-dir", sources["whisper_dir"],
                   "--out", tmp_path / "ckpt", "--preset", "tiny", "--quiet") == 0
    embed = orbax_io.load_params(tmp_path / "ckpt")["params"]["decoder"]["embed_tokens"]
    source = qwen2.state_dict()["model.embed_tokens.weight"].numpy()
    assert embed.shape[0] == PRESET.decoder.vocab_size > 600
    np.testing.assert_array_equal(embed[:used], source[:used])
    np.testing.assert_allclose(embed[used:], np.broadcast_to(source[:used].mean(0), embed[used:].shape), rtol=1e-5)


def test_a_tokenizer_using_more_ids_than_the_preset_holds_is_refused(sources, tmp_path, capsys):
    """Dropping rows that tokens use would break those tokens: refused, nothing written."""
    qwen2_dir = tmp_path / "qwen2"
    shutil.copytree(sources["qwen2_dir"], qwen2_dir)
    extra = PRESET.decoder.vocab_size + 40 - sources["used"]  # uses ids up to 1063 < the 1100 rows
    used = write_bpe_tokenizer(qwen2_dir, extra_tokens=[f"<extra_{i}>" for i in range(extra)])
    assert run_cli("from-hf", "--qwen2-dir", qwen2_dir, "--whisper-dir", sources["whisper_dir"],
                   "--out", tmp_path / "ckpt", "--preset", "tiny", "--quiet") == 2
    error = capsys.readouterr().err
    assert f"would drop rows {PRESET.decoder.vocab_size}..{used - 1}" in error and not (tmp_path / "ckpt").exists()


def test_required_id_taken_by_another_token_is_refused(sources, tmp_path):
    from af_next_jax.convert.errors import BadInputError
    from af_next_jax.convert.special_tokens import extend_tokenizer
    config = PRESET.replace(audio_token_id=100, audio_bos_token_id=101, audio_eos_token_id=102)
    with pytest.raises(BadInputError, match="id 98, which the model config gives to <think>, is already taken"):
        extend_tokenizer(sources["qwen2_dir"], config)


def test_required_token_at_another_id_is_refused(tmp_path):
    from af_next_jax.convert.errors import BadInputError
    from af_next_jax.convert.special_tokens import extend_tokenizer
    used = write_bpe_tokenizer(tmp_path, extra_tokens=["<sound>"])
    with pytest.raises(BadInputError, match=f"<sound> already has id {used - 1}.*at {PRESET.audio_token_id}"):
        extend_tokenizer(tmp_path, PRESET)


@pytest.mark.parametrize("where, patch, message", [
    ("whisper_dir", ("config.json", "num_mel_bins", 80), "num_mel_bins 80 (the preset needs 128)"),
    ("whisper_dir", ("preprocessor_config.json", "feature_size", 80), "feature_size 80 (the preset needs 128)"),
    ("whisper_dir", ("preprocessor_config.json", "chunk_length", 30), "chunk_length 30 (the preset needs 5)"),
    ("qwen2_dir", ("config.json", "num_hidden_layers", 3), "num_layers 3 (the preset needs 2)"),
])
def test_a_base_model_that_does_not_fit_the_preset_is_refused_by_name(sources, tmp_path, capsys, where, patch,
                                                                      message):
    folder = tmp_path / where
    shutil.copytree(sources[where], folder)
    name, key, value = patch
    fields = json.loads((folder / name).read_text())
    (folder / name).write_text(json.dumps({**fields, key: value}))
    dirs = {"qwen2_dir": sources["qwen2_dir"], "whisper_dir": sources["whisper_dir"], where: folder}
    assert run_cli("from-hf", "--qwen2-dir", dirs["qwen2_dir"], "--whisper-dir", dirs["whisper_dir"],
                   "--out", tmp_path / "ckpt", "--preset", "tiny", "--quiet") == 2
    assert message in capsys.readouterr().err and not (tmp_path / "ckpt").exists()


def test_preset_refuses_audio_id_flags(sources, tmp_path, capsys):
    assert run_cli("from-hf", "--qwen2-dir", sources["qwen2_dir"], "--whisper-dir", sources["whisper_dir"],
                   "--out", tmp_path / "ckpt", "--preset", "tiny", "--audio-token-id", "5", "--quiet") == 2
    assert "--audio-token-id" in capsys.readouterr().err


def test_export_loads_in_transformers_and_verify_passes(converted, tmp_path, capsys):
    assert run_cli("to-hf", "--checkpoint", converted, "--out", tmp_path / "hf", "--quiet") == 0
    _, info = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(tmp_path / "hf",
                                                                                output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert run_cli("verify", "--hf-dir", tmp_path / "hf", "--checkpoint", converted) == 0, capsys.readouterr()
    # The checkpoint's own tokenizer makes the export a complete repository (issue 18).
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.audio_token_id == PRESET.audio_token_id
    assert processor.tokenizer.convert_tokens_to_ids("<think>") == PRESET.audio_token_id - 2


def test_stage1_projector_run_starts_from_the_checkpoint_and_its_tokenizer(converted, tmp_path):
    """The debug experiment as stage 1 (projector only) with init_from = the checkpoint and data tokenized by
    the checkpoint's tokenizer: it trains, the projector moves, the frozen LLM and encoder stay as converted."""
    from af_next_jax.data.demo import make_demo
    from af_next_jax.experiment import load_config
    from af_next_jax.train.loop import train

    make_demo(str(tmp_path / "demo"), num_train_clips=4, num_heldout_clips=1, seed=0)
    config = load_config(os.path.join(REPO, "experiments", "debug.py"), [
        "--config.stage=projector", f"--config.init_from={converted}", f"--config.data.dir={tmp_path / 'demo'}",
        f"--config.data.tokenizer={converted / 'tokenizer.json'}", "--config.data.batch_size=8",
        "--config.data.seq_len=256", "--config.data.max_windows_per_batch=8", "--config.total_steps=3",
        "--config.eval_every=0", "--config.checkpoint_every=100", "--config.async_checkpointing=False",
        "--config.loss_chunk_length=64", "--config.log_every=1", "--config.peak_flops_per_device=1e11"])
    assert train(config, str(tmp_path / "run")).status == "finished"
    before = orbax_io.load_params(converted)["params"]
    after = orbax_io.load_params(tmp_path / "run" / "export")["params"]
    np.testing.assert_array_equal(after["decoder"]["embed_tokens"], before["decoder"]["embed_tokens"])
    np.testing.assert_array_equal(after["encoder"]["layer_norm"]["scale"], before["encoder"]["layer_norm"]["scale"])
    assert not np.array_equal(after["projector"]["linear_1"]["kernel"], before["projector"]["linear_1"]["kernel"])


def test_preset_with_an_hf_dir_is_refused(sources, tmp_path, capsys):
    assert run_cli("from-hf", "--hf-dir", sources["qwen2_dir"], "--out", tmp_path / "ckpt", "--preset", "tiny",
                   "--quiet") == 2
    assert "--preset applies to a new model" in capsys.readouterr().err and not (tmp_path / "ckpt").exists()
