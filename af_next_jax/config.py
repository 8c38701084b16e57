"""Model configuration: one frozen dataclass per model part, validated at construction.

Every dimension of the model lives here and nowhere else. Presets: `tiny` (seconds on a CPU),
`af3_7b` (Audio Flamingo 3: no RoTE, 20 windows), `af_next_7b` (AF-Next: RoTE, 60 windows, 128K).
Numbers for the 7B presets come from ../shared/REFERENCE.md (Whisper-large-v3 encoder, Qwen2.5-7B).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_attention_out")
# Attention is two independent choices (af_next_jax/attention/platform.py explains both):
ATTENTION_KERNELS = ("auto", "xla", "pallas")                 # how one device computes its block
SEQUENCE_PARALLELISM = ("none", "ring", "ulysses", "hybrid")  # how the decoder sequence is split
SEQUENCE_PARALLEL_STRATEGIES = tuple(s for s in SEQUENCE_PARALLELISM if s != "none")
# The strategies whose ring runs over a causal mask: they need the zigzag layout (parallel/layout.py)
# so every ring step has the same work; Ulysses attends over whole sequences and needs no reordering.
LOAD_BALANCED_STRATEGIES = ("ring", "hybrid")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")

# Whisper front end: 16 kHz audio, 10 ms mel hop. conv2 (stride 2) and the average pool (2) make one
# encoder output token per 4 mel frames = 40 ms.
SAMPLE_RATE = 16_000
MEL_HOP_LENGTH = 160
MEL_FRAMES_PER_AUDIO_TOKEN = 4


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# The one-knob `attention_implementation` (xla | pallas | ring | ulysses | hybrid) that picked both
# choices was removed; a config that still sets it is refused with what to set instead.
REMOVED_ATTENTION_FIELD = "attention_implementation"


def _removed_attention_message(value) -> str:
    if value in SEQUENCE_PARALLEL_STRATEGIES:
        meaning = f"{value!r} meant attention_kernel='auto', sequence_parallelism={value!r}"
    elif value in ATTENTION_KERNELS:
        meaning = f"{value!r} meant attention_kernel={value!r}, sequence_parallelism='none'"
    else:
        meaning = f"{value!r} was never a valid value"
    return (f"{REMOVED_ATTENTION_FIELD} was removed: set attention_kernel (one of {ATTENTION_KERNELS}) and "
            f"sequence_parallelism (one of {SEQUENCE_PARALLELISM}) instead; {REMOVED_ATTENTION_FIELD}={meaning}")


def drop_stored_legacy_attention(fields: dict) -> dict:
    """`fields` (a ModelConfig as `dataclasses.asdict` stored it) without the removed
    `attention_implementation`, for reading configs written by earlier versions.

    Versions that had both new fields stored the old name derived from them (the strategy, or the kernel
    without sequence parallelism): it is dropped when it says the same, refused when it does not.
    Versions before the split stored the old name alone: it is read as the pair it meant."""
    fields = dict(fields)
    if REMOVED_ATTENTION_FIELD not in fields:
        return fields
    stored = fields.pop(REMOVED_ATTENTION_FIELD)
    if "attention_kernel" not in fields and "sequence_parallelism" not in fields:
        if stored in SEQUENCE_PARALLEL_STRATEGIES:
            return {**fields, "attention_kernel": "auto", "sequence_parallelism": stored}
        if stored in ATTENTION_KERNELS:
            return {**fields, "attention_kernel": stored, "sequence_parallelism": "none"}
        raise ValueError(_removed_attention_message(stored))
    kernel = fields.get("attention_kernel", ModelConfig.attention_kernel)
    strategy = fields.get("sequence_parallelism", ModelConfig.sequence_parallelism)
    derived = strategy if strategy != "none" else kernel
    _require(stored == derived,
             f"stored {REMOVED_ATTENTION_FIELD}={stored!r} contradicts attention_kernel={kernel!r}, "
             f"sequence_parallelism={strategy!r} stored beside it (earlier versions wrote {derived!r} for "
             f"those): delete {REMOVED_ATTENTION_FIELD} and check the two fields")
    return fields


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """AF-Whisper encoder: Whisper encoder + AvgPool1d(2) + final LayerNorm."""

    num_mel_bins: int = 128
    hidden_size: int = 1280
    num_layers: int = 32
    num_heads: int = 20
    intermediate_size: int = 5120
    # Length of the fixed position table = conv2 output length of one full window (1500 for 30 s).
    max_source_positions: int = 1500
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _require(self.hidden_size % self.num_heads == 0,
                 f"encoder hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        _require(self.max_source_positions % 2 == 0 and self.max_source_positions >= 2,
                 f"encoder max_source_positions must be even and >= 2 (the average pool halves it), "
                 f"got {self.max_source_positions}")
        for name in ("num_mel_bins", "num_layers", "intermediate_size"):
            _require(getattr(self, name) > 0, f"encoder {name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mel_frames_per_window(self) -> int:
        """Mel frames in one window (3000 for 30 s): conv2 has stride 2."""
        return 2 * self.max_source_positions

    @property
    def tokens_per_window(self) -> int:
        """Encoder output tokens per full window (750 for 30 s)."""
        return self.max_source_positions // 2

    @property
    def window_seconds(self) -> float:
        return self.mel_frames_per_window * MEL_HOP_LENGTH / SAMPLE_RATE

    @property
    def window_samples(self) -> int:
        return self.mel_frames_per_window * MEL_HOP_LENGTH


def encoder_tokens_for_frames(valid_mel_frames):
    """Encoder output tokens for L valid mel frames: conv2 (stride 2) then AvgPool1d(2, 2).

    Works on Python ints and on integer arrays (numpy or jax): `((L - 1) // 2 + 1 - 2) // 2 + 1`.
    Zero frames give zero tokens.
    """
    after_conv = (valid_mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


@dataclasses.dataclass(frozen=True)
class RoteConfig:
    """Rotary time embedding on encoder outputs (transformers `MusicFlamingoRotaryEmbedding`)."""

    theta: float = 1200.0
    partial_rotary_factor: float = 0.2
    # Seconds per mel frame; one encoder token spans MEL_FRAMES_PER_AUDIO_TOKEN frames.
    audio_frame_step: float = 0.01

    def __post_init__(self):
        _require(self.theta > 0, f"rote theta must be positive, got {self.theta}")
        _require(0 < self.partial_rotary_factor <= 0.5,
                 f"rote partial_rotary_factor must be in (0, 0.5] (two axes each rotate that fraction), "
                 f"got {self.partial_rotary_factor}")

    def rotary_dim(self, encoder_hidden_size: int) -> int:
        """Per-axis rotary width (256 for d=1280); the rotation covers 2x this many channels."""
        return int(encoder_hidden_size * self.partial_rotary_factor)

    @property
    def token_seconds(self) -> float:
        return self.audio_frame_step * MEL_FRAMES_PER_AUDIO_TOKEN


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Linear(encoder -> decoder) -> GELU -> Linear(decoder -> decoder)."""

    use_bias: bool = True
    activation: Literal["gelu"] = "gelu"

    def __post_init__(self):
        _require(self.activation == "gelu", f"projector activation must be 'gelu', got {self.activation!r}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Qwen2 decoder (GQA, split-halves RoPE, float32 RMSNorm, untied lm_head)."""

    vocab_size: int = 151672
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    head_dim: int = 128
    rope_theta: float = 1.53e7
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def __post_init__(self):
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"decoder num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        _require(self.head_dim % 2 == 0, f"decoder head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_kv_heads"):
            _require(getattr(self, name) > 0, f"decoder {name} must be positive, got {getattr(self, name)}")

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole AF-Next model plus its numerics (dtype, remat, scan, attention kernel and strategy)."""

    encoder: EncoderConfig = EncoderConfig()
    rote: RoteConfig | None = RoteConfig()  # None = Audio Flamingo 3 (no RoTE)
    projector: ProjectorConfig = ProjectorConfig()
    decoder: DecoderConfig = DecoderConfig()
    audio_token_id: int = 151669
    audio_bos_token_id: int = 151670
    audio_eos_token_id: int = 151671
    max_windows_per_audio: int = 60
    compute_dtype: str = "bfloat16"
    remat_policy: str = "none"
    scan_layers: bool = True
    attention_kernel: str = "xla"
    sequence_parallelism: str = "none"

    def __new__(cls, *args, **fields):
        # Before the dataclass __init__, which would refuse the removed field with a bare TypeError:
        # ModelConfig(...), preset(...), .replace(...) and experiment files all construct through here.
        _require(REMOVED_ATTENTION_FIELD not in fields, _removed_attention_message(fields.get(REMOVED_ATTENTION_FIELD)))
        return super().__new__(cls)

    def __post_init__(self):
        _require(self.attention_kernel in ATTENTION_KERNELS,
                 f"attention_kernel must be one of {ATTENTION_KERNELS}, got {self.attention_kernel!r}")
        _require(self.sequence_parallelism in SEQUENCE_PARALLELISM,
                 f"sequence_parallelism must be one of {SEQUENCE_PARALLELISM}, got {self.sequence_parallelism!r}")
        _require(self.compute_dtype in COMPUTE_DTYPES,
                 f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        _require(self.remat_policy in REMAT_POLICIES,
                 f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        _require(self.max_windows_per_audio > 0,
                 f"max_windows_per_audio must be positive, got {self.max_windows_per_audio}")
        for name in ("audio_token_id", "audio_bos_token_id", "audio_eos_token_id"):
            token_id = getattr(self, name)
            _require(0 <= token_id < self.decoder.vocab_size,
                     f"{name}={token_id} is outside the decoder vocabulary [0, {self.decoder.vocab_size})")
        if self.rote is not None:
            rotated = 2 * self.rote.rotary_dim(self.encoder.hidden_size)
            _require(rotated <= self.encoder.hidden_size and rotated % 2 == 0,
                     f"RoTE rotates {rotated} channels but the encoder has {self.encoder.hidden_size}")
            _require(self.encoder.tokens_per_window <= self.rote.theta,
                     f"RoTE's time table has theta={self.rote.theta} rows but a window has "
                     f"{self.encoder.tokens_per_window} tokens")

    @property
    def max_audio_tokens(self) -> int:
        return self.max_windows_per_audio * self.encoder.tokens_per_window

    def replace(self, **changes) -> "ModelConfig":
        """`dataclasses.replace(self, **changes)`."""
        return dataclasses.replace(self, **changes)


def tiny(**overrides) -> ModelConfig:
    """A few hundred thousand parameters; 5 s windows (125 audio tokens); runs in seconds on a CPU."""
    vocab_size = 1024
    config = ModelConfig(
        encoder=EncoderConfig(num_mel_bins=128, hidden_size=64, num_layers=2, num_heads=4,
                              intermediate_size=128, max_source_positions=250),
        rote=RoteConfig(),
        decoder=DecoderConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                              max_position_embeddings=4096),
        audio_token_id=vocab_size - 3,
        audio_bos_token_id=vocab_size - 2,
        audio_eos_token_id=vocab_size - 1,
        max_windows_per_audio=4,
        compute_dtype="float32",
    )
    return config.replace(**overrides)


def af3_7b(**overrides) -> ModelConfig:
    """Audio Flamingo 3: Whisper-large-v3 encoder, no RoTE, Qwen2.5-7B (vocab resized to 151672)."""
    config = ModelConfig(
        rote=None,
        decoder=DecoderConfig(rope_theta=1e6, max_position_embeddings=32768),
        max_windows_per_audio=20,
    )
    return config.replace(**overrides)


def af_next_7b(**overrides) -> ModelConfig:
    """AF-Next: RoTE, 60 windows (30 min = 45,000 audio tokens), theta 1.53e7, 128K positions."""
    return ModelConfig().replace(**overrides)


PRESETS = {"tiny": tiny, "af3_7b": af3_7b, "af_next_7b": af_next_7b}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
