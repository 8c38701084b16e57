"""`build-shards`: an Apache Beam pipeline that turns JSONL manifests into ArrayRecord shards.

    manifest lines -> Reshuffle (spread over workers) -> parse + load/resample/validate audio
      (manifest.parse_line, audio.load_audio: the trainer's own code and skip reasons)
      -> encoded record (shard_format.py) keyed by (manifest, shard), or a counted skip
      -> GroupByKey per shard -> records sorted by line -> {stem}-{k:05d}-of-{n:05d}.array_record
    skips and sizes -> {out}/build_summary.json, and Beam counters (namespace "af_next_jax.build_shards")

Each manifest becomes its own shard set, so a mixture keeps one weight per source. Shard k of a
manifest holds the valid examples of its k-th contiguous range of lines, in line order: reading the
shards in file order gives the manifest's order, which is why training from them reproduces the
manifest's batches. Sorting inside each shard makes the bytes independent of the runner's
scheduling: the same inputs give byte-identical shards.

A full disk (disk_space.py): the shard being written is removed (shard_format.write_shard writes
under a temporary name), the complete shards stay (a rerun rewrites them byte for byte), no summary is
written, and the build stops with `DiskFull` naming the shard, its size and the free space.

Only this module imports apache_beam (installed with the `beam` extra); training never needs it.
"""

from __future__ import annotations

import json
import os

from af_next_jax.config import SAMPLE_RATE
from af_next_jax.disk_space import DiskFull, disk_full_error, format_bytes, is_disk_full
from af_next_jax.data.shard_format import DEFAULT_AUDIO_ENCODING, shard_file_name

METRICS_NAMESPACE = "af_next_jax.build_shards"
SUMMARY_FILE = "build_summary.json"
PROBLEMS_KEPT = 100  # per manifest, in the summary (the counters count all)


def manifest_stem(manifest: str) -> str:
    name = os.path.basename(manifest)
    return name[:-len(".jsonl")] if name.endswith(".jsonl") else os.path.splitext(name)[0]


def _numbered_lines(indexed_manifest: tuple[int, str]):
    """(manifest index, ordinal among non-blank lines, their count, line number, line) of one manifest."""
    from etils import epath

    manifest_index, manifest = indexed_manifest
    numbered = [(number, line) for number, line in enumerate(epath.Path(manifest).read_text().splitlines(), 1)
                if line.strip()]
    for ordinal, (number, line) in enumerate(numbered):
        yield manifest_index, ordinal, len(numbered), number, line


def encode_line(manifest: str, line_number: int, line: str, encoding: str):
    """(record bytes, audio seconds) of a manifest line; raises ManifestError/AudioError to skip it."""
    from af_next_jax.data import audio as audio_lib
    from af_next_jax.data.manifest import parse_line
    from af_next_jax.data.shard_format import encode_example

    base_dir = os.path.dirname(manifest if "://" in manifest else os.path.abspath(manifest))
    example = parse_line(line, base_dir, line_number)
    samples = [audio_lib.load_audio(ref.path, ref.start, ref.end) for ref in example.audio]
    record = encode_example(example, samples, encoding, manifest, line_number)
    return record, sum(len(audio) for audio in samples) / SAMPLE_RATE


def _partial_summary(**values) -> dict:
    return {"examples": 0, "bytes": 0, "audio_seconds": 0.0, "skipped": {}, "problems": [], **values}


def merge_summaries(summaries) -> dict:
    """Add up per-worker summaries of one manifest (a Beam combiner: associative, order-free)."""
    merged = _partial_summary()
    for summary in summaries:
        for name in ("examples", "bytes", "audio_seconds"):
            merged[name] += summary[name]
        for reason, count in summary["skipped"].items():
            merged["skipped"][reason] = merged["skipped"].get(reason, 0) + count
        merged["problems"] = sorted(merged["problems"] + summary["problems"])[:PROBLEMS_KEPT]
    return merged


def _encode_fn(encoding: str, num_shards: int, manifests: tuple[str, ...]):
    import apache_beam as beam

    from af_next_jax.data import audio as audio_lib
    from af_next_jax.data.manifest import ManifestError

    examples = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "examples")
    audio_ms = beam.metrics.Metrics.counter(METRICS_NAMESPACE, "audio_milliseconds")

    class EncodeExample(beam.DoFn):
        def process(self, element):
            manifest_index, ordinal, total, line_number, line = element
            try:
                record, seconds = encode_line(manifests[manifest_index], line_number, line, encoding)
            except (ManifestError, audio_lib.AudioError) as error:
                beam.metrics.Metrics.counter(METRICS_NAMESPACE, f"skipped/{error.reason}").inc()
                yield beam.pvalue.TaggedOutput("skipped", (manifest_index, _partial_summary(
                    skipped={error.reason: 1}, problems=[(line_number, error.reason, str(error))])))
                return
            examples.inc()
            audio_ms.inc(int(round(1000 * seconds)))
            # Contiguous line ranges per shard: file order = manifest order.
            yield (manifest_index, ordinal * num_shards // total), (ordinal, record, seconds)

    return EncodeExample()


def _write_fn(out_dir: str, stems: list[str], num_shards: int):
    import apache_beam as beam

    from af_next_jax.data.shard_format import write_shard

    class WriteShard(beam.DoFn):
        def process(self, keyed):
            (manifest_index, shard), values = keyed
            entries = sorted(value for value in values if value is not None)
            records = [record for _, record, _ in entries]
            name = shard_file_name(stems[manifest_index], shard, num_shards)
            try:
                write_shard(os.path.join(out_dir, name), records)
            except Exception as error:
                if not is_disk_full(error):
                    raise
                raise _shard_disk_full(name, out_dir, records) from error
            yield manifest_index, _partial_summary(examples=len(records), bytes=sum(map(len, records)),
                                                   audio_seconds=sum(seconds for _, _, seconds in entries))

    return WriteShard()


def _shard_disk_full(name: str, out_dir: str, records: list[bytes]) -> DiskFull:
    # ArrayRecord adds a few bytes per record (chunk headers) to the records themselves.
    return disk_full_error(f"shard {name}", out_dir, f"about {format_bytes(sum(map(len, records)))} for it",
                           "The partial shard was removed; the complete ones stay. Free space there and run the "
                           "same command again.")


def _write_summary(summaries, out_dir: str, manifests: tuple[str, ...], stems: list[str], num_shards: int,
                   encoding: str) -> None:
    from etils import epath

    by_manifest = dict(summaries)
    report = {"num_shards": num_shards, "audio_encoding": encoding, "manifests": []}
    for index, manifest in enumerate(manifests):
        summary = by_manifest.get(index, _partial_summary())
        report["manifests"].append({
            "manifest": manifest, "shards": os.path.join(out_dir, f"{stems[index]}-*-of-{num_shards:05d}.array_record"),
            **summary, "skipped_total": sum(summary["skipped"].values()),
            "bytes_per_audio_hour": summary["bytes"] / max(summary["audio_seconds"] / 3600, 1e-9)})
    epath.Path(out_dir, SUMMARY_FILE).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")


def build_shards(manifests: list[str], out_dir: str, num_shards: int = 1, audio_encoding: str = DEFAULT_AUDIO_ENCODING,
                 pipeline_args: list[str] | None = None) -> dict:
    """Run the pipeline (DirectRunner unless `pipeline_args` say `--runner=...`); returns the summary."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from etils import epath

    from af_next_jax.data.shard_format import AUDIO_ENCODINGS

    manifests = tuple(manifests)
    if not manifests:
        raise ValueError("build-shards needs at least one --manifest")
    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    if audio_encoding not in AUDIO_ENCODINGS:
        raise ValueError(f"--audio-encoding must be one of {AUDIO_ENCODINGS}, got {audio_encoding!r}")
    stems = [manifest_stem(manifest) for manifest in manifests]
    if len(set(stems)) != len(stems):
        raise ValueError(f"manifests {list(manifests)} share a file name ({stems}); each becomes the shard set "
                         f"'<name>-*.array_record', so rename one or build them into different --out folders")
    epath.Path(out_dir).mkdir(parents=True, exist_ok=True)

    pipeline = beam.Pipeline(options=PipelineOptions(list(pipeline_args or [])))
    lines = (pipeline
             | "Manifests" >> beam.Create(list(enumerate(manifests)))
             | "NumberLines" >> beam.FlatMap(_numbered_lines)
             | "Spread" >> beam.Reshuffle())
    encoded = lines | "Encode" >> beam.ParDo(_encode_fn(audio_encoding, num_shards, manifests)).with_outputs(
        "skipped", main="records")
    # Every shard key once with no record: shards whose lines were all skipped are still written (empty).
    every_shard = pipeline | "EveryShard" >> beam.Create(
        [((index, shard), None) for index in range(len(manifests)) for shard in range(num_shards)])
    written = ((encoded.records, every_shard) | "WithEveryShard" >> beam.Flatten()
               | "GroupByShard" >> beam.GroupByKey()
               | "WriteShards" >> beam.ParDo(_write_fn(out_dir, stems, num_shards)))
    _ = ((written, encoded.skipped) | "Stats" >> beam.Flatten()
         | "PerManifest" >> beam.CombinePerKey(merge_summaries)
         | "AllManifests" >> beam.combiners.ToList()
         | "WriteSummary" >> beam.Map(_write_summary, out_dir, manifests, stems, num_shards, audio_encoding))
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except Exception as error:
        # Runners re-raise a worker's error wrapped or retyped, with their own text: find ours in it.
        if not is_disk_full(error):
            raise
        raise _first_disk_full(error, out_dir) from error
    summary = json.loads(epath.Path(out_dir, SUMMARY_FILE).read_text())
    summary["beam_counters"] = beam_counters(result)
    return summary


def _first_disk_full(error: BaseException, out_dir: str) -> DiskFull:
    """The worker's own one-line DiskFull message (without the runner's additions) when it is there."""
    text = str(error)
    start = text.find("no space left on the filesystem of")
    if start >= 0:
        return DiskFull(text[start:].splitlines()[0].split(" [while running")[0])
    return disk_full_error("the shards", out_dir, "more space", "The partial shard was removed; the complete ones "
                           "stay. Free space there and run the same command again.")


def unknown_beam_options(beam_args: list[str]) -> list[str]:
    """The arguments that no Beam PipelineOptions class defines (a typo would otherwise be dropped
    with only a warning, and a cluster job would start with the wrong settings)."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for options_class in {str(cls): cls for cls in PipelineOptions.__subclasses__()}.values():
        options_class._add_argparse_args(parser)
    return parser.parse_known_args(beam_args)[1]


def beam_counters(result) -> dict[str, int]:
    """The pipeline's counters by name (for runners that report them)."""
    from apache_beam.metrics.metric import MetricsFilter

    query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    return {counter.key.metric.name: counter.committed for counter in query["counters"]}
