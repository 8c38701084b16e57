"""The processor half of an exported HF repository: what `AutoProcessor.from_pretrained` reads.

Written by hand (no transformers at export time), in the layout transformers' own conversion scripts
produce with `processor.save_pretrained` (models/musicflamingo/convert_musicflamingo_to_hf.py):

  preprocessor_config.json   WhisperFeatureExtractor: mel bins, window length, 16 kHz, hop, n_fft,
                             from the model config (a 5 s tiny window as well as a 30 s one)
  processor_config.json      MusicFlamingoProcessor (RoTE) or AudioFlamingo3Processor (no RoTE), the
                             audio tokens, max_audio_len = windows per audio x window seconds
  chat_template.jinja        the ChatML template (data/conversation.py), used by processor.apply_chat_template
  tokenizer.json             the model's tokenizer (with <sound>, <|sound_bos|>, <|sound_eos|>, <think>)
  tokenizer_config.json      eos <|im_end|>, pad, the same chat template, the added tokens
  generation_config.json     stop on <|im_end|> (and the pad/end-of-text token), pad id

The chat template renders exactly what the data pipeline trains on and the inference code prompts
with (af_next_jax/data/conversation.py `encode_conversation`, af_next_jax/inference/prompts.py):
`<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, no default system prompt, and a user turn's
audio items as one `<sound>` each, then `\\n` and the text (the demo manifests' "<sound>\\n{question}").
The processor then expands each `<sound>` as the model family's processor does. Tests render it
against `encode_conversation` and `encode_prompt` token for token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from af_next_jax.config import MEL_HOP_LENGTH, SAMPLE_RATE, ModelConfig
from af_next_jax.convert.errors import BadInputError
from af_next_jax.data.conversation import CHAT_TEMPLATE
from af_next_jax.data.tokenizer import SPECIAL_TOKENS

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# tokenizer.json as it is: transformers' Qwen2Tokenizer would replace the file's pre-tokenizer with
# Qwen's (digits one by one), which changes the ids of any other byte-level BPE (the demo's).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"

def feature_extractor_config(config: ModelConfig, processor_class: str) -> dict:
    from af_next_jax.data.features import N_FFT
    encoder = config.encoder
    return {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": encoder.num_mel_bins,
            "sampling_rate": SAMPLE_RATE, "hop_length": MEL_HOP_LENGTH, "n_fft": N_FFT,
            "chunk_length": int(encoder.window_seconds), "n_samples": encoder.window_samples,
            "nb_max_frames": encoder.mel_frames_per_window, "padding_side": "right", "padding_value": 0.0,
            "return_attention_mask": True, "dither": 0.0, "processor_class": processor_class}


def processor_class(config: ModelConfig) -> str:
    return "MusicFlamingoProcessor" if config.rote is not None else "AudioFlamingo3Processor"


def processor_config(config: ModelConfig) -> dict:
    fields = {"processor_class": processor_class(config), "audio_token": SPECIAL_TOKENS["audio"],
              "max_audio_len": int(config.max_windows_per_audio * config.encoder.window_seconds)}
    if config.rote is not None:
        fields.update(audio_bos_token=SPECIAL_TOKENS["audio_bos"], audio_eos_token=SPECIAL_TOKENS["audio_eos"])
    return fields


def _tokenizer_config(source: dict, config: ModelConfig, tokenizer, added: list[dict]) -> dict:
    """The source's tokenizer_config.json (if any) with our eos, pad, chat template and added tokens."""
    pad_token = tokenizer.decode([tokenizer.special.pad])
    fields = dict(source)
    fields.update(tokenizer_class=TOKENIZER_CLASS, eos_token=SPECIAL_TOKENS["im_end"], pad_token=pad_token,
                  bos_token=None, unk_token=None, chat_template=CHAT_TEMPLATE, processor_class=processor_class(config),
                  model_max_length=config.decoder.max_position_embeddings, padding_side="left",
                  clean_up_tokenization_spaces=False, split_special_tokens=False)
    decoder = dict(fields.get("added_tokens_decoder") or {})
    for entry in added:
        decoder.setdefault(str(entry["id"]), {k: v for k, v in entry.items() if k != "id"})
    fields["added_tokens_decoder"] = decoder
    return fields


def generation_config(tokenizer, source: dict | None) -> dict:
    """Stop on <|im_end|> (the end of an assistant turn, what training teaches) and on the pad /
    end-of-text token; a source generation config keeps its other fields."""
    special = tokenizer.special
    fields = dict(source or {})
    fields.update(eos_token_id=[special.im_end, special.pad], pad_token_id=special.pad, bos_token_id=special.pad)
    fields.pop("_from_model_config", None)
    return fields


def write_processor_files(directory: Path, config: ModelConfig, tokenizer_json: Path,
                          source_generation: dict | None) -> list[str]:
    """Write the processor files next to an export (see the module docstring); returns their names."""
    from af_next_jax.data.tokenizer import load_tokenizer
    try:
        tokenizer = load_tokenizer(str(tokenizer_json))
        tokenizer.check_compatible(config)
    except ValueError as error:
        raise BadInputError(f"tokenizer {tokenizer_json} does not fit this model: {error}") from None
    if tokenizer.kind != "hf":
        raise BadInputError(f"tokenizer {tokenizer_json}: a transformers export needs a HF tokenizer.json")
    source_config_path = tokenizer_json.parent / TOKENIZER_CONFIG_FILE
    source_config = json.loads(source_config_path.read_text()) if source_config_path.is_file() else {}
    added = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
    if tokenizer_json.resolve() != (directory / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer_json, directory / TOKENIZER_FILE)
    files = {
        TOKENIZER_CONFIG_FILE: _tokenizer_config(source_config, config, tokenizer, added),
        PREPROCESSOR_FILE: feature_extractor_config(config, processor_class(config)),
        PROCESSOR_FILE: processor_config(config),
        "generation_config.json": generation_config(tokenizer, source_generation),
    }
    for name, fields in files.items():
        (directory / name).write_text(json.dumps(fields, indent=2, ensure_ascii=False) + "\n")
    (directory / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)
    return sorted([TOKENIZER_FILE, CHAT_TEMPLATE_FILE, *files])
