"""The logit checker: run transformers (torch, float32) and our model (float32) on the same random
audio + text and compare the logits. What a user runs after every conversion.

Batch: example 0 holds one audio of 1.5 windows (two windows, the last one padded, so RoTE's window
axis and the encoder's padding mask are both exercised) between text; example 1 is text only and
right-padded. Figures, over the non-padding tokens:
  max |diff|     max abs difference of the logits
  logit scale    max |transformers logit|; the check is max |diff| <= tolerance x scale
  KL             mean and max over tokens of KL(p_transformers || p_ours), computed in float64
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np

from af_next_jax.config import ModelConfig, encoder_tokens_for_frames
from af_next_jax.convert.hf_config import MODEL_TYPES
from af_next_jax.convert.errors import BadInputError

DEFAULT_RELATIVE_TOLERANCE = 1e-4
TRANSFORMERS_CLASSES = {"musicflamingo": ("MusicFlamingoConfig", "MusicFlamingoForConditionalGeneration"),
                        "audioflamingo3": ("AudioFlamingo3Config", "AudioFlamingo3ForConditionalGeneration"),
                        # transformers' AF-Next class is a plain subclass of MusicFlamingo's.
                        "audioflamingonext": ("MusicFlamingoConfig", "MusicFlamingoForConditionalGeneration")}


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    max_abs_diff: float
    logit_scale: float
    kl_mean: float
    kl_max: float
    tokens: int
    tolerance: float

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.logit_scale

    @property
    def passed(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance * self.logit_scale)

    def report(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"max |logit diff| = {self.max_abs_diff:.3e}\n"
                f"logit scale (max |transformers logit|) = {self.logit_scale:.3e}\n"
                f"relative diff = {self.relative_diff:.3e} (tolerance {self.tolerance:.0e})\n"
                f"KL(transformers || ours) mean = {self.kl_mean:.3e}, max = {self.kl_max:.3e} "
                f"over {self.tokens} tokens\n{verdict}")


def verification_batch(config: ModelConfig, seed: int = 0) -> dict:
    from af_next_jax.model.synthetic import split_into_windows, synthetic_batch
    frames_per_window = config.encoder.mel_frames_per_window
    frames = min(frames_per_window * 3 // 2, frames_per_window * config.max_windows_per_audio)
    audio_tokens = sum(int(encoder_tokens_for_frames(w)) for w in split_into_windows(frames, frames_per_window))
    needed = audio_tokens + 2 + 2 * 3  # bos + eos, text before and after
    seq_len = -(-needed // 16) * 16
    return synthetic_batch(config, audio_frames_per_example=[[frames], []], seq_len=seq_len, seed=seed)


def load_transformers_model(hf_dir: str | Path):
    import torch
    import transformers
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise BadInputError(f"{config_path} not found")
    hf = json.loads(config_path.read_text())
    model_type = hf.get("model_type")
    if model_type not in TRANSFORMERS_CLASSES:
        raise BadInputError(f"{config_path}: model_type {model_type!r} cannot be verified; supported: "
                            f"{MODEL_TYPES}")
    config_cls, model_cls = (getattr(transformers, name) for name in TRANSFORMERS_CLASSES[model_type])
    hf_config = config_cls.from_dict({**hf, "model_type": config_cls.model_type})
    from af_next_jax.convert.hf_import import read_headers
    read_headers(hf_dir)  # no (or truncated) safetensors: a message naming the files, not from_pretrained's
    return model_cls.from_pretrained(hf_dir, config=hf_config, dtype=torch.float32,
                                     attn_implementation="eager").eval()


def transformers_logits(model, batch: dict) -> np.ndarray:
    import torch
    from af_next_jax.model.synthetic import to_transformers_inputs
    inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in to_transformers_inputs(batch).items()}
    with torch.no_grad():
        return model(**inputs).logits.float().numpy()


@functools.lru_cache(maxsize=4)
def _compiled_apply(config: ModelConfig):
    """One compiled forward per config (repeated checks of one model, e.g. in tests, compile once)."""
    import jax
    from af_next_jax.model.af_next import AFNextModel
    return jax.jit(AFNextModel(config).apply)


def our_logits(params: dict, config: ModelConfig, batch: dict) -> np.ndarray:
    import jax
    float32 = config.replace(compute_dtype="float32", attention_kernel="xla", sequence_parallelism="none")
    # Full float32 matmuls: on GPUs the default precision may use TF32, ~1e-3 relative error.
    with jax.default_matmul_precision("highest"):
        return np.asarray(_compiled_apply(float32)(params, batch))


def compare_logits(reference: np.ndarray, ours: np.ndarray, valid: np.ndarray,
                   tolerance: float = DEFAULT_RELATIVE_TOLERANCE) -> VerifyResult:
    if reference.shape != ours.shape:
        raise BadInputError(f"logit shapes differ: transformers {reference.shape}, ours {ours.shape}; "
                            f"do --hf-dir and --checkpoint hold the same model?")
    ref, own = reference[valid].astype(np.float64), ours[valid].astype(np.float64)
    diff = float(np.abs(ref - own).max())
    log_p = ref - _logsumexp(ref)
    log_q = own - _logsumexp(own)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return VerifyResult(max_abs_diff=diff, logit_scale=float(np.abs(ref).max()), kl_mean=float(kl.mean()),
                        kl_max=float(kl.max()), tokens=int(valid.sum()), tolerance=tolerance)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


def hf_weight_dtype(hf_dir: str | Path) -> str:
    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    return str(hf.get("dtype") or hf.get("torch_dtype") or "float32")


def round_to_dtype(params: dict, dtype: str) -> dict:
    """Our float32 weights as they are after a round trip through `dtype` (bit-exact with an export)."""
    import jax
    import ml_dtypes
    low = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    return jax.tree.map(lambda x: np.asarray(x).astype(low).astype(np.float32), params)


def verify(hf_dir: str | Path, checkpoint: str | Path, *, step: int | None = None,
           tolerance: float = DEFAULT_RELATIVE_TOLERANCE, seed: int = 0, round_to_hf_dtype: bool = True) -> VerifyResult:
    """`checkpoint` and `step` name our side as `to-hf` takes them (a converted checkpoint, or a training
    workdir's export or saved step: sources.py). `round_to_hf_dtype`: when the HF weights are
    bfloat16/float16, round ours the same way first, so the check measures the conversion, not the
    precision an export to that dtype gives up."""
    from af_next_jax.convert.sources import resolve
    source = resolve(checkpoint, step)
    config = source.config
    params = source.load_params()
    dtype = hf_weight_dtype(hf_dir) if (Path(hf_dir) / "config.json").is_file() else "float32"
    if round_to_hf_dtype and dtype in ("bfloat16", "float16"):
        params = round_to_dtype(params, dtype)
    batch = verification_batch(config, seed)
    ours = our_logits(params, config, batch)
    del params
    reference = transformers_logits(load_transformers_model(hf_dir), batch)
    return compare_logits(reference, ours, batch["segment_ids"] > 0, tolerance)
