"""Load a model for decoding: its config, parameters and tokenizer, from any place the converter reads.

  --checkpoint PATH  a converted checkpoint, or a training workdir (its final export, or --step N);
                     af_next_jax/convert/sources.py resolves it
  --hf-dir DIR       a MusicFlamingo / AF3 / AF-Next Hugging Face directory, imported in memory by the
                     converter's reader (af_next_jax/convert/hf_import.py)

The tokenizer is `--tokenizer` when given, else the first that exists of: a tokenizer.json beside
the parameters (an HF directory, a converted checkpoint), the tokenizer the training run used
(WORKDIR/config.json's data entry).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from af_next_jax.config import ModelConfig
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
               tokenizer: str | None = None) -> LoadedModel:
    """Raises BadInputError (one line, saying what to pass instead) when the model cannot be read."""
    if (checkpoint is None) == (hf_dir is None):
        raise BadInputError("give exactly one of --checkpoint (ours or a training workdir) and --hf-dir")
    if hf_dir is not None:
        from af_next_jax.convert.hf_import import plan_audio_model, read_params

        if not Path(hf_dir).is_dir():
            raise BadInputError(f"--hf-dir {hf_dir} is not a directory")
        plan = plan_audio_model(hf_dir)
        params = read_params(plan, progress=False)
        config, description = plan.config, f"Hugging Face directory {hf_dir}"
        generation_config = plan.info.get("generation_config")
        candidates = [Path(hf_dir)]
    else:
        from af_next_jax.convert.sources import resolve

        if not Path(checkpoint).exists():
            raise BadInputError(f"--checkpoint {checkpoint} does not exist")
        source = resolve(checkpoint, step)
        params, config, description = source.load_params(), source.config, source.description
        generation_config = source.info.get("generation_config")
        candidates = [Path(checkpoint), Path(checkpoint) / "export", *_workdir_tokenizers(Path(checkpoint))]
    tokenizer_obj = _load_tokenizer(tokenizer, candidates)
    try:
        tokenizer_obj.check_compatible(config)
    except ValueError as error:
        raise BadInputError(f"tokenizer {tokenizer_obj.path} does not fit the model: {error}") from None
    return LoadedModel(config, params, tokenizer_obj, description, generation_config)


def _workdir_tokenizers(path: Path) -> list[Path]:
    """The tokenizer named by a training workdir's config.json (PATH, or PATH/.. for PATH/export)."""
    found = []
    for workdir in (path, path.parent):
        config_file = workdir / "config.json"
        if not config_file.is_file():
            continue
        try:
            data = json.loads(config_file.read_text()).get("data")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("tokenizer"), str):
            name = Path(data["tokenizer"])
            found += [name, workdir / name, workdir.parent / name]
    return found


def _load_tokenizer(explicit: str | None, candidates: list[Path]) -> Tokenizer:
    if explicit is not None:
        try:
            return load_tokenizer(explicit)
        except ValueError as error:
            raise BadInputError(f"--tokenizer: {error}") from None
    for candidate in candidates:
        if candidate.is_file() or (candidate / "tokenizer.json").is_file():
            return load_tokenizer(str(candidate))
    raise BadInputError(f"no tokenizer found (looked at {', '.join(map(str, candidates))}); pass --tokenizer "
                        f"PATH (a tokenizer.json or SentencePiece .model)")
