"""Load a model for decoding: its config, parameters and tokenizer, from any place the converter reads.

  --checkpoint PATH  a converted checkpoint, or a training workdir (its final export, or --step N);
                     af_next_jax/convert/sources.py resolves it
  --hf-dir DIR       a MusicFlamingo / AF3 / AF-Next Hugging Face directory, imported in memory by the
                     converter's reader (af_next_jax/convert/hf_import.py)

The tokenizer is `--tokenizer` when given, else the model's own: beside an HF directory's weights, or
the one convert/sources.py knows for a checkpoint (CKPT/tokenizer.json, the repository's files that
`from-hf --hf-dir` kept in CKPT/hf_tokenizer/, or the tokenizer a training run trained with).

The model computes in the checkpoint's dtype (`checkpoint_dtype`), unless `dtype` overrides it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from af_next_jax.config import COMPUTE_DTYPES, ModelConfig
from af_next_jax.convert.errors import BadInputError
from af_next_jax.data.tokenizer import PAD_CANDIDATES, Tokenizer, load_tokenizer


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    description: str
    generation_config: dict | None = None

    def stop_token_ids(self) -> tuple[int, ...]:
        """`<|im_end|>` (ChatML's end of turn), the end-of-text token, and the HF generation config's eos."""
        stops = {self.tokenizer.special.im_end}
        for token in PAD_CANDIDATES[:1]:  # <|endoftext|>: Qwen's eos
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                stops.add(token_id)
        eos = (self.generation_config or {}).get("eos_token_id")
        stops.update([eos] if isinstance(eos, int) else (eos or []))
        return tuple(sorted(stops))


def load_model(*, checkpoint: str | None = None, hf_dir: str | None = None, step: int | None = None,
               tokenizer: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Raises BadInputError (one line, saying what to pass instead) when the model cannot be read.
    `dtype` (float32, bfloat16, float16): compute in it instead of the checkpoint's dtype."""
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise BadInputError(f"--dtype {dtype!r} is not supported; choose one of {list(COMPUTE_DTYPES)}")
    if (checkpoint is None) == (hf_dir is None):
        raise BadInputError("give exactly one of --checkpoint (ours or a training workdir) and --hf-dir")
    if hf_dir is not None:
        from af_next_jax.convert.hf_import import plan_audio_model, read_params

        if not Path(hf_dir).is_dir():
            raise BadInputError(f"--hf-dir {hf_dir} is not a directory")
        plan = plan_audio_model(hf_dir)
        params = read_params(plan, progress=False)
        config, description, info = plan.config, f"Hugging Face directory {hf_dir}", plan.info
        generation_config = plan.info.get("generation_config")
        candidates = [Path(hf_dir)]
    else:
        from af_next_jax.convert.sources import resolve

        if not Path(checkpoint).exists():
            raise BadInputError(f"--checkpoint {checkpoint} does not exist")
        source = resolve(checkpoint, step)
        params, config, description, info = source.load_params(), source.config, source.description, source.info
        generation_config = source.info.get("generation_config")
        candidates = [path for path in (source.tokenizer, source.tokenizer_dir) if path is not None]
    config = config.replace(compute_dtype=dtype or checkpoint_dtype(config, hf_dir=hf_dir, info=info))
    tokenizer_obj = _load_tokenizer(tokenizer, candidates)
    try:
        tokenizer_obj.check_compatible(config)
    except ValueError as error:
        raise BadInputError(f"tokenizer {tokenizer_obj.path} does not fit the model: {error}") from None
    return LoadedModel(config, params, tokenizer_obj, description, generation_config)


def checkpoint_dtype(config: ModelConfig, *, hf_dir: str | None, info: dict) -> str:
    """The dtype a checkpoint computes in, as the reference does:
      an HF directory:            what transformers' `from_pretrained` (dtype="auto") loads it in: its
                                  config.json's `dtype` (`torch_dtype` in 4.x), else its weights' dtype;
      a checkpoint `from-hf` made: the dtype of the weights it was converted from (conversion.json's
                                  hf_dtype), as `--hf-dir` on that repository would compute;
      a training run (export or step): the compute_dtype it was trained with (its model config).
    """
    if hf_dir is not None:
        fields = json.loads((Path(hf_dir) / "config.json").read_text())
        named = fields.get("dtype") or fields.get("torch_dtype") or info["hf_dtype"]
        where = f"the dtype of {hf_dir} (config.json's, else its weights')"
    else:
        named, where = info.get("hf_dtype") or config.compute_dtype, "the source dtype in conversion.json"
    named = str(named).removeprefix("torch.")
    if named not in COMPUTE_DTYPES:
        raise BadInputError(f"{where} is {named}, not a dtype we compute in; pass --dtype, one of "
                            f"{list(COMPUTE_DTYPES)}")
    return named


def _load_tokenizer(explicit: str | None, candidates: list[Path]) -> Tokenizer:
    if explicit is not None:
        try:
            return load_tokenizer(explicit)
        except ValueError as error:
            raise BadInputError(f"--tokenizer: {error}") from None
    for candidate in candidates:
        if candidate.is_file() or (candidate / "tokenizer.json").is_file():
            return load_tokenizer(str(candidate))
    looked = f" (looked at {', '.join(map(str, candidates))})" if candidates else ""
    raise BadInputError(f"no tokenizer found for the model{looked}; pass --tokenizer PATH (a tokenizer.json or "
                        f"SentencePiece .model)")
