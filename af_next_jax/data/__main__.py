"""`python -m af_next_jax.data {inspect,make-demo,build-shards,from-hf-dataset}`."""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    from af_next_jax.process_setup import configure_cli_process

    configure_cli_process()  # first, before JAX starts: XLA flags, allocator, platforms (process_setup.py)
    parser = argparse.ArgumentParser(prog="python -m af_next_jax.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="validate a manifest and print counts, durations, "
                                                  "token lengths and every problem with its line number")
    inspect.add_argument("--manifest", action="append", default=[], help="JSONL manifest (repeatable)")
    inspect.add_argument("--shards", action="append", default=[],
                         help="ArrayRecord shard pattern, e.g. 'shards/train-*.array_record' (repeatable)")
    inspect.add_argument("--tokenizer", required=True, help="tokenizer.json or SentencePiece .model")
    inspect.add_argument("--preset", default="tiny", help="model preset giving the window length and the audio "
                                                          "layout (af3_7b: no <|sound_bos|>/<|sound_eos|>; default tiny)")
    inspect.add_argument("--seq-len", type=int, default=None, help="flag examples longer than this")
    demo = commands.add_parser("make-demo", help="write the bundled demo dataset (offline, seconds)")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--train-clips", type=int, default=48)
    demo.add_argument("--heldout-clips", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--long-clip-windows", type=int, default=0,
                      help="W in 2..4: every clip spans 2..W of the tiny model's 5 s windows, events in any "
                           "window (the RoTE ablation's data); 0 = the short quickstart clips (default)")
    _add_build_shards(commands)
    _add_from_hf_dataset(commands)
    # Options this CLI does not know go to Beam (build-shards only): --project, --region, --temp_location, ...
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and args.command != "build-shards":
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    if args.command == "build-shards":
        return _build_shards(args, beam_args)
    if args.command == "from-hf-dataset":
        return _from_hf_dataset(args)

    if args.command == "make-demo":
        from af_next_jax.data.demo import make_demo

        started = time.perf_counter()
        try:
            summary = make_demo(args.out, args.train_clips, args.heldout_clips, args.seed, args.long_clip_windows)
        except ValueError as error:
            parser.error(str(error))
        print(json.dumps(summary))
        print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s"
              + ("" if summary["spoken_words"] else " (no espeak-ng: tones and noise only)"))
        return 0

    if not args.manifest and not args.shards:
        parser.error("inspect needs --manifest M or --shards PATTERN (each repeatable)")
    from af_next_jax.config import preset
    from af_next_jax.data.inspection import inspect_manifest, inspect_shards
    from af_next_jax.data.shard_source import ShardReadError
    from af_next_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    model_config = preset(args.preset)
    failed = False
    for manifest in args.manifest:
        report = inspect_manifest(manifest, tokenizer, model_config, seq_len=args.seq_len)
        print(f"== {manifest}\n{report.format()}")
        failed |= bool(report.problems)
    for pattern in args.shards:
        try:
            report = inspect_shards(pattern, tokenizer, model_config, seq_len=args.seq_len)
        except ShardReadError as error:  # missing, truncated or corrupt: the message names the file
            print(f"== {pattern}\nerror: {error}")
            failed = True
            continue
        print(f"== {pattern} (problems name the manifest line each record came from)\n{report.format()}")
        failed |= bool(report.problems)
    return 1 if failed else 0


def _add_build_shards(commands) -> None:
    from af_next_jax.data.shard_format import AUDIO_ENCODINGS, DEFAULT_AUDIO_ENCODING

    build = commands.add_parser(
        "build-shards", help="Apache Beam pipeline: manifests -> ArrayRecord shards (one shard set per manifest); "
                             "options it does not know go to Beam (--project, --region, --temp_location, ...)")
    build.add_argument("--manifest", required=True, action="append", help="JSONL manifest (repeatable)")
    build.add_argument("--out", required=True, help="output folder (local or a Beam file system path)")
    build.add_argument("--num-shards", type=int, default=1, help="files per manifest (aim for ~0.5-1 GB each)")
    build.add_argument("--audio-encoding", choices=AUDIO_ENCODINGS, default=DEFAULT_AUDIO_ENCODING,
                       help="16 kHz audio as FLAC (default, ~0.6x the bytes) or raw int16 (docs/DATA.md)")
    build.add_argument("--runner", default="DirectRunner",
                       help="DirectRunner (local), DataflowRunner, FlinkRunner, SparkRunner, ...")
    build.set_defaults(forwarded_args_check=check_beam_args)


def check_beam_args(beam_args: list[str]) -> None:
    """Raise when an argument left to Beam is not a Beam pipeline option either."""
    from af_next_jax.data.build_shards import unknown_beam_options

    unknown = unknown_beam_options(beam_args)
    if unknown:
        raise SystemExit(f"build-shards: {' '.join(unknown)} is neither a build-shards option nor a Beam pipeline "
                         f"option (python -m af_next_jax.data build-shards --help; Beam's: --runner, --project, "
                         f"--region, --temp_location, --setup_file, --direct_num_workers, ...)")


def _build_shards(args, beam_args: list[str]) -> int:
    from af_next_jax.data.build_shards import build_shards
    from af_next_jax.disk_space import DiskFull

    check_beam_args(beam_args)
    started = time.perf_counter()
    try:
        summary = build_shards(args.manifest, args.out, num_shards=args.num_shards,
                               audio_encoding=args.audio_encoding, pipeline_args=[f"--runner={args.runner}", *beam_args])
    except DiskFull as error:  # the partial shard was removed; the message says how much is needed where
        print(f"error: {error}", file=sys.stderr)
        return 2
    for manifest in summary["manifests"]:
        print(f"{manifest['manifest']} -> {manifest['shards']}: {manifest['examples']} examples, "
              f"{manifest['audio_seconds'] / 3600:.3f} h, {manifest['bytes'] / 1e6:.1f} MB, skipped "
              f"{manifest['skipped_total']} {manifest['skipped']}")
    print(f"built in {time.perf_counter() - started:.1f} s; summary in {args.out}/build_summary.json")
    return 0


def _add_from_hf_dataset(commands) -> None:
    hf = commands.add_parser("from-hf-dataset", help="a Hugging Face audio dataset (folder or hub name) -> "
                                                     "manifest + audio files, and shards with --num-shards")
    hf.add_argument("dataset", metavar="NAME_OR_PATH", help="dataset folder (parquet or save_to_disk) or hub name")
    hf.add_argument("--split", required=True)
    hf.add_argument("--audio-column", required=True)
    hf.add_argument("--text-column", required=True, help="the answer (e.g. the transcript or caption)")
    hf.add_argument("--task", required=True, help="task tag; asr/caption/sound_caption/music_caption have a "
                                                  "default prompt")
    hf.add_argument("--out", required=True, help="output folder: {split}.jsonl, audio/, shards")
    hf.add_argument("--prompt", default=None, help="user question after <sound>; {column} fields allowed")
    hf.add_argument("--answer", default=None, help="assistant template (default '{TEXT_COLUMN}')")
    hf.add_argument("--system", default=None, help="optional system turn")
    hf.add_argument("--variant", default="instruct")
    hf.add_argument("--limit", type=int, default=None, help="first N rows only")
    hf.add_argument("--num-shards", type=int, default=0, help="also build N ArrayRecord shards (DirectRunner); "
                                                              "0 = manifest only")


def _from_hf_dataset(args) -> int:
    from af_next_jax.data.hf_dataset import DatasetReadError, from_hf_dataset

    try:
        summary = from_hf_dataset(args.dataset, args.split, args.audio_column, args.text_column, args.task, args.out,
                                  prompt=args.prompt, answer=args.answer, system=args.system, variant=args.variant,
                                  limit=args.limit)
    except DatasetReadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    if args.num_shards:
        from af_next_jax.data.build_shards import build_shards

        built = build_shards([summary["manifest"]], args.out, num_shards=args.num_shards)
        print(json.dumps({key: built["manifests"][0][key] for key in ("shards", "examples", "skipped")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
