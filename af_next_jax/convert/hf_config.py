"""Our ModelConfig <-> transformers `config.json` (MusicFlamingo with RoTE, AudioFlamingo3 without).

We write both `rope_theta` and `rope_parameters`, and both `torch_dtype` and `dtype`, so that
transformers 4.x and 5.x read the file.
"""

from __future__ import annotations

from af_next_jax.config import DecoderConfig, EncoderConfig, ModelConfig, ProjectorConfig, RoteConfig
from af_next_jax.convert.errors import BadInputError

MODEL_TYPES = ("musicflamingo", "audioflamingo3", "audioflamingonext")


def to_hf_config(config: ModelConfig, dtype: str = "float32") -> dict:
    enc, dec = config.encoder, config.decoder
    audio_config = {
        "model_type": "audioflamingo3_encoder", "num_mel_bins": enc.num_mel_bins, "hidden_size": enc.hidden_size,
        "num_hidden_layers": enc.num_layers, "num_attention_heads": enc.num_heads,
        "intermediate_size": enc.intermediate_size, "max_source_positions": enc.max_source_positions,
        "activation_function": "gelu", "scale_embedding": False,
    }
    text_config = {
        "model_type": "qwen2", "vocab_size": dec.vocab_size, "hidden_size": dec.hidden_size,
        "intermediate_size": dec.intermediate_size, "num_hidden_layers": dec.num_layers,
        "num_attention_heads": dec.num_heads, "num_key_value_heads": dec.num_kv_heads, "head_dim": dec.head_dim,
        "max_position_embeddings": dec.max_position_embeddings, "rms_norm_eps": dec.rms_norm_eps,
        "rope_theta": dec.rope_theta, "rope_parameters": {"rope_theta": dec.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": dec.tie_word_embeddings, "hidden_act": "silu", "use_sliding_window": False,
        "torch_dtype": dtype, "dtype": dtype,
    }
    hf = {
        "audio_config": audio_config, "text_config": text_config,
        "audio_token_id": config.audio_token_id, "projector_hidden_act": config.projector.activation,
        "projector_bias": config.projector.use_bias, "torch_dtype": dtype, "dtype": dtype,
    }
    if config.rote is None:
        hf.update(model_type="audioflamingo3", architectures=["AudioFlamingo3ForConditionalGeneration"])
    else:
        rope = {"rope_theta": config.rote.theta, "partial_rotary_factor": config.rote.partial_rotary_factor,
                "rope_type": "default"}
        hf.update(model_type="musicflamingo", architectures=["MusicFlamingoForConditionalGeneration"],
                  audio_bos_token_id=config.audio_bos_token_id, audio_eos_token_id=config.audio_eos_token_id,
                  audio_frame_step=config.rote.audio_frame_step, rope_parameters=rope, rope_theta=config.rote.theta)
    return hf


def _rope_theta(section: dict, default: float) -> float:
    rope = section.get("rope_parameters") or {}
    return float(rope.get("rope_theta", section.get("rope_theta", default)))


def from_hf_config(hf: dict, **overrides) -> ModelConfig:
    """Read a MusicFlamingo / AF3 / AF-Next config.json dict; unknown model types raise BadInputError."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise BadInputError(f"unsupported model_type {model_type!r}; supported: {MODEL_TYPES} "
                         f"(or a bare qwen2 + whisper pair, see `convert from-hf --help`)")
    audio, text = hf["audio_config"], hf["text_config"]
    encoder = encoder_from_audio_config(audio)
    decoder = decoder_from_qwen2_config(text)
    rote = None
    if model_type != "audioflamingo3":
        rope = hf.get("rope_parameters") or {}
        rote = RoteConfig(theta=_rope_theta(hf, 1200.0),
                          partial_rotary_factor=float(rope.get("partial_rotary_factor", 0.2)),
                          audio_frame_step=float(hf.get("audio_frame_step", 0.01)))
    audio_token_id = hf.get("audio_token_id", 151669)
    fields = dict(encoder=encoder, decoder=decoder, rote=rote,
                  projector=ProjectorConfig(use_bias=hf.get("projector_bias", True),
                                            activation=hf.get("projector_hidden_act", "gelu")),
                  audio_token_id=audio_token_id,
                  # AF3's config.json has no bos/eos ids; its tokenizer puts them right after <sound>
                  # (151669, 151670, 151671), which also holds for configs with a resized vocabulary.
                  audio_bos_token_id=hf.get("audio_bos_token_id", audio_token_id + 1),
                  audio_eos_token_id=hf.get("audio_eos_token_id", audio_token_id + 2))
    fields.update(overrides)
    return ModelConfig(**fields)


def encoder_from_audio_config(audio: dict) -> EncoderConfig:
    """An `audioflamingo3_encoder` audio_config, or a Whisper config.json (`d_model`, `encoder_layers`, ...)."""
    return EncoderConfig(
        num_mel_bins=audio.get("num_mel_bins", 128), hidden_size=audio.get("hidden_size", audio.get("d_model", 1280)),
        num_layers=audio.get("num_hidden_layers", audio.get("encoder_layers", 32)),
        num_heads=audio.get("num_attention_heads", audio.get("encoder_attention_heads", 20)),
        intermediate_size=audio.get("intermediate_size", audio.get("encoder_ffn_dim", 5120)),
        max_source_positions=audio.get("max_source_positions", 1500))


def decoder_from_qwen2_config(text: dict) -> DecoderConfig:
    heads = text.get("num_attention_heads", 28)
    hidden = text.get("hidden_size", 3584)
    return DecoderConfig(
        vocab_size=text.get("vocab_size", 151672), hidden_size=hidden,
        intermediate_size=text.get("intermediate_size", 18944), num_layers=text.get("num_hidden_layers", 28),
        num_heads=heads, num_kv_heads=text.get("num_key_value_heads", heads),
        head_dim=text.get("head_dim") or hidden // heads, rope_theta=_rope_theta(text, 1e6),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6), tie_word_embeddings=text.get("tie_word_embeddings", False))
