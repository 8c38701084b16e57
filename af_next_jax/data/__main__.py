"""`python -m af_next_jax.data {inspect,make-demo}`."""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m af_next_jax.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="validate a manifest and print counts, durations, "
                                                  "token lengths and every problem with its line number")
    inspect.add_argument("--manifest", required=True, action="append", help="JSONL manifest (repeatable)")
    inspect.add_argument("--tokenizer", required=True, help="tokenizer.json or SentencePiece .model")
    inspect.add_argument("--preset", default="tiny", help="model preset giving the window length and the audio "
                                                          "layout (af3_7b: no <|sound_bos|>/<|sound_eos|>; default tiny)")
    inspect.add_argument("--seq-len", type=int, default=None, help="flag examples longer than this")
    demo = commands.add_parser("make-demo", help="write the bundled demo dataset (offline, seconds)")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--train-clips", type=int, default=48)
    demo.add_argument("--heldout-clips", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "make-demo":
        from af_next_jax.data.demo import make_demo

        started = time.perf_counter()
        summary = make_demo(args.out, args.train_clips, args.heldout_clips, args.seed)
        print(json.dumps(summary))
        print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s"
              + ("" if summary["spoken_words"] else " (no espeak-ng: tones and noise only)"))
        return 0

    from af_next_jax.config import preset
    from af_next_jax.data.inspection import inspect_manifest
    from af_next_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    model_config = preset(args.preset)
    failed = False
    for manifest in args.manifest:
        report = inspect_manifest(manifest, tokenizer, model_config, seq_len=args.seq_len)
        print(f"== {manifest}\n{report.format()}")
        failed |= bool(report.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
