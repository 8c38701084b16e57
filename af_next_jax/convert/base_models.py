"""`from-hf --qwen2-dir Q --whisper-dir W --preset NAME`: the public base models as a preset's model.

The first step of the curriculum (docs/TRAINING.md): Qwen2.5-7B + Whisper-large-v3 become a
checkpoint that the preset's stage-1 experiment takes with `init_from`, and a tokenizer next to it.

  - dimensions: the Whisper encoder and its feature settings (mel bins, 30 s windows, 16 kHz, hop,
    n_fft) and every Qwen2 dimension must equal the preset's; a mismatch (an 80-bin Whisper, a
    Qwen2.5-3B) is refused by name before any tensor is read;
  - taken from the preset: vocab_size (rows resized, vocabulary.py), RoPE theta and max positions
    (AF-Next's long context: 1e6 / 32K -> 1.53e7 / 128K), RoTE or not, audio ids, windows per audio;
  - tokenizer: Qwen2's tokenizer.json + <think>, </think>, <sound>, <|sound_bos|>, <|sound_eos|> at
    the config's ids (special_tokens.py), written as CKPT/tokenizer.json (and tokenizer_config.json
    when Qwen2's directory has one); the experiments' `data.tokenizer` can point at it.

What changed is printed and stored in CKPT/conversion.json ("changes").
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from af_next_jax.config import MEL_HOP_LENGTH, PRESETS, SAMPLE_RATE, DecoderConfig, EncoderConfig, ModelConfig
from af_next_jax.convert.errors import BadInputError, config_from_fields
from af_next_jax.convert.hf_config import decoder_from_qwen2_config, encoder_from_audio_config
from af_next_jax.convert.orbax_io import read_json_file
from af_next_jax.convert.special_tokens import ExtendedTokenizer, extend_tokenizer, tokenizer_size
from af_next_jax.convert.vocabulary import check_resizable, resize_vocabulary

PREPROCESSOR_FILE = "preprocessor_config.json"
# Decoder fields the preset sets whatever Qwen2's config.json says; every other field must match.
FROM_PRESET = ("vocab_size", "rope_theta", "max_position_embeddings")


def _mismatches(found, wanted, skip=()) -> list[str]:
    return [f"{field.name} {getattr(found, field.name)} (the preset needs {getattr(wanted, field.name)})"
            for field in dataclasses.fields(wanted)
            if field.name not in skip and getattr(found, field.name) != getattr(wanted, field.name)]


def check_decoder(found: DecoderConfig, preset: ModelConfig, preset_name: str, where: str) -> None:
    wrong = _mismatches(found, preset.decoder, skip=FROM_PRESET)
    if wrong:
        raise BadInputError(f"{where}: this Qwen2 is not the LLM of preset {preset_name!r}: " + ", ".join(wrong))


def check_encoder(found: EncoderConfig, preset: ModelConfig, preset_name: str, where: str) -> None:
    wrong = _mismatches(found, preset.encoder)
    if wrong:
        raise BadInputError(f"{where}: this Whisper is not the encoder of preset {preset_name!r}: " + ", ".join(wrong)
                            + " (Whisper-large-v3 has 128 mel bins; large-v2 and smaller have 80)")


def check_feature_extractor(whisper_dir: Path, preset: ModelConfig, preset_name: str) -> str:
    """The log-mel settings of Whisper's preprocessor_config.json against the preset's encoder.

    Returns a note for the report (the file is optional: without it only config.json was checked)."""
    from af_next_jax.data.features import N_FFT
    path = whisper_dir / PREPROCESSOR_FILE
    if not path.is_file():
        return f"{path} absent: feature settings checked from config.json only"
    found = read_json_file(path, "Whisper preprocessor config")
    encoder = preset.encoder
    wanted = {"feature_size": encoder.num_mel_bins, "chunk_length": encoder.window_seconds,
              "sampling_rate": SAMPLE_RATE, "hop_length": MEL_HOP_LENGTH, "n_fft": N_FFT}
    wrong = [f"{key} {found.get(key)} (the preset needs {value:g})" for key, value in wanted.items()
             if key in found and float(found[key]) != float(value)]
    if wrong:
        raise BadInputError(f"{path}: Whisper's feature settings do not fit preset {preset_name!r}: "
                            + ", ".join(wrong))
    return f"{path.name}: {', '.join(f'{k} {v:g}' for k, v in wanted.items())}"


@dataclasses.dataclass
class BaseModelConversion:
    """What `from-hf --preset` checked before reading any tensor, and what it will change."""
    preset_name: str
    source_decoder: DecoderConfig          # as Qwen2's config.json describes it
    config: ModelConfig                    # the preset's: what the checkpoint will hold
    tokenizer: ExtendedTokenizer
    feature_note: str

    def source_vocab_shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
        """Shapes of the vocabulary parameters as Qwen2's files hold them (read before resizing)."""
        rows, hidden = self.source_decoder.vocab_size, self.source_decoder.hidden_size
        shapes = {("decoder", "embed_tokens"): (rows, hidden)}
        if not self.source_decoder.tie_word_embeddings:
            shapes[("decoder", "lm_head")] = (hidden, rows)
        return shapes

    def resize(self, params: dict) -> tuple[dict, list[str]]:
        """{"params": ...} read with the source vocabulary -> the preset's, and the report lines."""
        decoder, vocab = resize_vocabulary(params["params"]["decoder"], self.tokenizer.source_size,
                                           self.config.decoder.vocab_size)
        return {"params": {**params["params"], "decoder": decoder}}, self.changes(vocab)

    def changes(self, vocab: dict) -> list[str]:
        src, dst = self.source_decoder, self.config.decoder
        lines = [f"vocab_size {src.vocab_size} -> {dst.vocab_size}: rows 0..{vocab['tokenizer_ids'] - 1} "
                 f"(the tokenizer's ids) kept"]
        if vocab["mean_initialised_rows"]:
            first, last = vocab["mean_initialised_rows"]
            lines.append(f"rows {first}..{last} of embed_tokens and lm_head set to the mean of the kept rows")
        if vocab["dropped_unused_rows"]:
            first, last = vocab["dropped_unused_rows"]
            lines.append(f"rows {first}..{last} dropped (padding: no token uses them)")
        for name in FROM_PRESET[1:]:
            before, after = getattr(src, name), getattr(dst, name)
            lines.append(f"{name} {before:g} -> {after:g}" if before != after else f"{name} {after:g} (unchanged)")
        tokens = self.tokenizer
        reserved = [token_id for token, token_id in tokens.added.items() if token.startswith("<|reserved_")]
        named = [f"{token} {token_id}" for token, token_id in tokens.added.items() if token_id not in reserved]
        if reserved:  # ids between the source's last token and the first new one (special_tokens.py)
            named.insert(0, f"placeholders <|reserved_N|> at {reserved[0]}..{reserved[-1]}")
        lines.append(f"tokenizer: added {', '.join(named) or 'nothing'}"
                     + (f"; already present: {', '.join(tokens.present)}" if tokens.present else ""))
        lines.append(f"model: {'musicflamingo (RoTE)' if self.config.rote else 'audioflamingo3 (no RoTE)'}, "
                     f"{self.config.max_windows_per_audio} windows per audio; features: {self.feature_note}")
        return lines


def plan_base_models(qwen2_dir: Path, text: dict, whisper_dir: Path, audio: dict,
                     preset_name: str) -> BaseModelConversion:
    """Check Qwen2's and Whisper's configs (dicts of their config.json) and tokenizer against the preset."""
    if preset_name not in PRESETS:
        raise BadInputError(f"--preset {preset_name!r} is not a model preset; valid: {sorted(PRESETS)}")
    preset = PRESETS[preset_name]()
    decoder = config_from_fields(lambda: decoder_from_qwen2_config(text), str(qwen2_dir / "config.json"))
    encoder = config_from_fields(lambda: encoder_from_audio_config(audio), str(whisper_dir / "config.json"))
    check_decoder(decoder, preset, preset_name, str(qwen2_dir / "config.json"))
    check_encoder(encoder, preset, preset_name, str(whisper_dir / "config.json"))
    feature_note = check_feature_extractor(whisper_dir, preset, preset_name)
    # Rows first: a tokenizer that uses ids past the preset's vocabulary is refused for that reason.
    check_resizable(tokenizer_size(qwen2_dir), decoder.vocab_size, preset.decoder.vocab_size,
                    str(qwen2_dir / "tokenizer.json"))
    tokenizer = extend_tokenizer(qwen2_dir, preset)
    _check_chat_tokens(tokenizer, preset, qwen2_dir)
    return BaseModelConversion(preset_name, decoder, preset, tokenizer, feature_note)


def _check_chat_tokens(tokenizer: ExtendedTokenizer, preset: ModelConfig, qwen2_dir: Path) -> None:
    """The data pipeline's own tokenizer must accept the result (ChatML tokens, audio ids, vocab size)."""
    import tempfile
    from af_next_jax.data.tokenizer import load_tokenizer
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.write(Path(folder))
        try:
            ours = load_tokenizer(folder)
            ours.check_compatible(preset)
        except ValueError as error:
            raise BadInputError(f"{qwen2_dir}/tokenizer.json with the AF-Next tokens added: {error}") from None
