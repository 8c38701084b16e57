"""`python -m af_next_jax.convert {from-hf,to-hf,verify}`: Hugging Face <-> our orbax checkpoint.

  from-hf --hf-dir DIR --out CKPT                          MusicFlamingo / AF3 / AF-Next directory
  from-hf --qwen2-dir DIR --whisper-dir DIR --out CKPT     new model: Qwen2 LLM + Whisper encoder,
                                                           random projector, default RoTE
  from-hf --qwen2-dir DIR --whisper-dir DIR --out CKPT --preset af_next_7b|af3_7b
                                                           the same as that preset's model, for its
                                                           experiments' init_from: vocabulary resized,
                                                           RoPE from the preset, CKPT/tokenizer.json
                                                           with the audio and think tokens
  to-hf --checkpoint CKPT --out DIR [--dtype bfloat16] [--tokenizer-dir DIR] [--max-shard-size 5GB]
  to-hf --checkpoint WORKDIR [--step N] --out DIR ...      a training workdir: its final export, or
                                                           with --step the saved checkpoint of step N
  verify --hf-dir DIR --checkpoint CKPT|WORKDIR [--step N] logit check, exit 1 when over tolerance

A training workdir without a final export (a stopped or preempted run) needs --step; the error lists
the saved steps (af_next_jax/convert/sources.py says why the newest is not taken silently).

Exit status: 0 done, 1 verify over tolerance, 2 bad input (one line on stderr naming the file, key,
shape or value; nothing is written). Anything else is a bug: Python's traceback and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from af_next_jax.config import PRESETS
from af_next_jax.convert.errors import BadInputError

if TYPE_CHECKING:
    from af_next_jax.convert.sources import ModelSource

EXIT_OK, EXIT_OVER_TOLERANCE, EXIT_BAD_INPUT = 0, 1, 2


def _gigabytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def from_hf(args) -> int:
    from af_next_jax.convert import hf_export, hf_import, orbax_io, sources
    if args.hf_dir and (args.qwen2_dir or args.whisper_dir):
        raise BadInputError("give either --hf-dir, or --qwen2-dir with --whisper-dir, not both")
    if args.hf_dir and args.preset:
        raise BadInputError("--preset applies to a new model (--qwen2-dir + --whisper-dir); an --hf-dir "
                            "checkpoint keeps its own config")
    if args.hf_dir:
        plan = hf_import.plan_audio_model(args.hf_dir)
    elif args.qwen2_dir and args.whisper_dir:
        ids = {name: getattr(args, name) for name in ("audio_token_id", "audio_bos_token_id", "audio_eos_token_id")
               if getattr(args, name) is not None}
        if args.preset and (ids or args.no_rote):
            flags = ["--" + name.replace("_", "-") for name in ids] + ["--no-rote"] * args.no_rote
            raise BadInputError(f"--preset {args.preset} fixes the audio ids and RoTE; drop {', '.join(flags)}")
        plan = hf_import.plan_qwen2_whisper(args.qwen2_dir, args.whisper_dir, rote=not args.no_rote,
                                            seed=args.seed, preset=args.preset, **ids)
    else:
        raise BadInputError("from-hf needs --hf-dir, or both --qwen2-dir and --whisper-dir")
    if args.max_windows_per_audio is not None:
        plan.config = plan.config.replace(max_windows_per_audio=args.max_windows_per_audio)
    start = time.perf_counter()
    with orbax_io.atomic_directory(args.out, args.overwrite) as staging:
        params = hf_import.read_params(plan, progress=not args.quiet)
        if plan.base_models is not None:  # --preset: resize the vocabulary, write the extended tokenizer
            params, changes = plan.base_models.resize(params)
            plan.info["changes"] = changes
            plan.info["tokenizer_files"] = plan.base_models.tokenizer.write(staging)
            print("\n".join(f"  {line}" for line in [f"preset {args.preset}:"] + changes))
        if args.hf_dir:  # keep the repository's tokenizer, template and processor files for to-hf
            kept = hf_export.copy_tokenizer_files(args.hf_dir, staging / sources.HF_TOKENIZER_DIR)
            plan.info["tokenizer_files"] = kept
        orbax_io.save_checkpoint(staging, params, plan.config, plan.info)
    print(f"wrote {args.out}: {len(plan.assignments)} tensors, {_gigabytes(plan.source_bytes)} read "
          f"({plan.info['hf_dtype']}), model_type "
          f"{'musicflamingo (RoTE)' if plan.config.rote else 'audioflamingo3 (no RoTE)'}, "
          f"{time.perf_counter() - start:.1f} s")
    return EXIT_OK


def to_hf(args) -> int:
    from af_next_jax.convert import hf_export, orbax_io, sources
    source = sources.resolve(args.checkpoint, args.step)
    dtype = args.dtype or source.info.get("hf_dtype") or "float32"
    if dtype not in hf_export.EXPORT_DTYPES:
        raise BadInputError(f"--dtype {dtype!r} is not supported; choose one of {sorted(hf_export.EXPORT_DTYPES)}")
    _check_checkpoint_shapes(source)
    if not args.quiet:
        print(f"reading the {source.description}")
    start = time.perf_counter()
    with orbax_io.atomic_directory(args.out, args.overwrite) as staging, source.open_params() as params:
        summary = hf_export.write_hf_directory(
            staging, params, source.config, dtype=dtype, max_shard_size=args.max_shard_size,
            tokenizer_dir=args.tokenizer_dir or source.tokenizer_dir, tokenizer_json=source.tokenizer,
            generation_config=source.info.get("generation_config"), progress=not args.quiet)
    print(f"wrote {args.out}: {summary['tensors']} tensors in {summary['shards']} shard(s), "
          f"{_gigabytes(summary['bytes'])} {dtype}, tokenizer files {summary['tokenizer_files'] or 'none'}, "
          f"from the {source.description}, {time.perf_counter() - start:.1f} s")
    if not summary["processor"]:
        print(f"note: no tokenizer found for the {source.description}, so no processor files were written "
              f"(AutoProcessor will not load {args.out}); pass --tokenizer-dir DIR with the model's tokenizer.json")
    return EXIT_OK


def _check_checkpoint_shapes(source: ModelSource) -> None:
    """The checkpoint's arrays (orbax metadata, no data read) must be those of its model config."""
    from af_next_jax.convert.checks import expected_shapes
    found, expected = source.parameter_shapes(), expected_shapes(source.config)
    for path in sorted(set(found) | set(expected)):
        if found.get(path) != expected.get(path):
            raise BadInputError(f"{source.description}: parameter {'/'.join(path)} has shape {found.get(path)} "
                                f"but its model config implies {expected.get(path)}")


def verify(args) -> int:
    from af_next_jax.convert.verify import verify as run_verify
    from af_next_jax.convert.verify import hf_weight_dtype
    result = run_verify(args.hf_dir, args.checkpoint, step=args.step, tolerance=args.tolerance, seed=args.seed,
                        round_to_hf_dtype=not args.keep_checkpoint_dtype)
    dtype = hf_weight_dtype(args.hf_dir)
    if dtype != "float32":
        print(f"HF weights are {dtype}; ours were " + ("kept in float32" if args.keep_checkpoint_dtype
                                                        else f"rounded to {dtype} first"))
    print(result.report())
    return EXIT_OK if result.passed else EXIT_OVER_TOLERANCE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m af_next_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("from-hf", help="HF directory -> our orbax checkpoint")
    p.add_argument("--hf-dir", help="MusicFlamingo / AudioFlamingo3 / AF-Next directory (config.json + safetensors)")
    p.add_argument("--qwen2-dir", help="bare Qwen2 directory: the decoder of a new model")
    p.add_argument("--whisper-dir", help="Whisper (or AF3 / AF3-encoder) directory: the encoder of a new model")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="new model: the preset whose experiments will init_from it (vocabulary resized, RoPE "
                        "theta / max positions and audio ids from the preset, dimensions checked, Qwen2's "
                        "tokenizer.json extended with the AF-Next special tokens into --out)")
    p.add_argument("--no-rote", action="store_true", help="new model without RoTE (AF3-style); default has RoTE")
    p.add_argument("--seed", type=int, default=0, help="seed of the new model's random projector")
    p.add_argument("--audio-token-id", type=int, help="new model: id of <sound> (default 151669)")
    p.add_argument("--audio-bos-token-id", type=int, help="new model: id of <|sound_bos|> (default 151670)")
    p.add_argument("--audio-eos-token-id", type=int, help="new model: id of <|sound_eos|> (default 151671)")
    p.add_argument("--max-windows-per-audio", type=int, help="override the 30 s windows per audio in the config")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=from_hf)

    p = commands.add_parser("to-hf", help="our orbax checkpoint -> HF directory")
    p.add_argument("--checkpoint", required=True,
                   help="converted checkpoint (from-hf), or a training workdir (its final export; see --step)")
    p.add_argument("--step", type=int, help="training workdir only: export the saved checkpoint of this step")
    p.add_argument("--out", required=True, help="HF directory to create")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="tensor dtype (default: the dtype the checkpoint was imported from, else float32)")
    p.add_argument("--tokenizer-dir", help="copy tokenizer / processor files from this directory")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=to_hf)

    p = commands.add_parser("verify", help="compare logits of transformers and ours on random audio + text")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--checkpoint", required=True, help="what to-hf read: a converted checkpoint or a training workdir")
    p.add_argument("--step", type=int, help="training workdir only: the saved step that to-hf exported")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |diff| / max |logit| allowed (1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch")
    p.add_argument("--keep-checkpoint-dtype", action="store_true",
                   help="with bfloat16/float16 HF weights, compare against our float32 weights as they are "
                        "(measures the export's precision loss) instead of rounding them the same way")
    p.set_defaults(run=verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BadInputError as error:  # only checked input; a bug (any other exception) keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
