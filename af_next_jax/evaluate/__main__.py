"""Evaluate a model on a manifest.

    python -m af_next_jax.evaluate --checkpoint workdir/debug --manifest demo_data/heldout.jsonl --out results.jsonl

Prints a per-task table (accuracy, unparseable answers, mean metrics) and the list of unparseable
answers; writes one JSON row per example (prediction, reference, every score) to --out. Prompts are the
manifest's conversations rendered in the model's chat format, and the model computes in the
checkpoint's dtype unless `--dtype` says otherwise (both as `python -m af_next_jax.generate` does).
Bad input (missing checkpoint or manifest) is one line `error: ...` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from af_next_jax.config import COMPUTE_DTYPES


def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # first, before JAX starts: XLA flags, allocator, platforms (process_setup.py)
    parser = argparse.ArgumentParser(prog="python -m af_next_jax.evaluate", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="converted checkpoint or training workdir")
    source.add_argument("--hf-dir", help="Hugging Face MusicFlamingo / AF3 / AF-Next directory")
    parser.add_argument("--step", type=int)
    parser.add_argument("--tokenizer")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True, help="per-example results (JSONL)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, help="compute dtype (default: the checkpoint's)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from af_next_jax.convert.errors import BadInputError
    from af_next_jax.evaluate.runner import evaluate, summary_table, unparseable_list
    from af_next_jax.inference.loading import load_model

    try:
        if not os.path.isfile(args.manifest):
            raise BadInputError(f"--manifest {args.manifest} is not a file")
        if args.batch_size <= 0 or args.max_new_tokens <= 0:
            raise BadInputError("--batch-size and --max-new-tokens must be positive")
        loaded = load_model(checkpoint=args.checkpoint, hf_dir=args.hf_dir, step=args.step, tokenizer=args.tokenizer,
                            dtype=args.dtype)
    except BadInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = evaluate(loaded, args.manifest, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                    progress=not args.quiet, limit=args.limit)
    with open(args.out, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    print(summary_table(rows))
    listed = unparseable_list(rows)
    if listed:
        print("unparseable answers and errors (counted wrong):\n" + listed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
