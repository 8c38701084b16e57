"""`inspect`: validate a manifest line by line (or ArrayRecord shards record by record) and summarise it.

Every line goes through the same `ExamplePreparer.prepare` the training pipeline uses (so a line that
passes here is a line training keeps), but audio is only decoded, never featurised. The report has
counts by task and variant, audio durations, a token-length histogram, and each problem with its
line number.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np

from af_next_jax.config import SAMPLE_RATE, ModelConfig, encoder_tokens_for_frames
from af_next_jax.data import audio as audio_lib
from af_next_jax.data.conversation import encode_conversation, uses_audio_markers
from af_next_jax.data.features import valid_frames_for_samples
from af_next_jax.data.manifest import ManifestError, parse_line
from af_next_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class ManifestReport:
    lines: int = 0
    valid: int = 0
    problems: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)  # (line, reason, message)
    tasks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    variants: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    durations: list[float] = dataclasses.field(default_factory=list)
    token_lengths: list[int] = dataclasses.field(default_factory=list)
    truncated_audio: int = 0

    def format(self, bins: int = 8) -> str:
        out = [f"lines: {self.lines}  valid: {self.valid}  problems: {len(self.problems)}",
               f"tasks: {dict(self.tasks)}", f"variants: {dict(self.variants)}"]
        if self.durations:
            seconds = np.asarray(self.durations)
            out.append(f"audio: {len(seconds)} references, {seconds.sum() / 3600:.3f} h, duration min/median/max "
                       f"{seconds.min():.1f}/{np.median(seconds):.1f}/{seconds.max():.1f} s; "
                       f"truncated at the window cap: {self.truncated_audio}")
        if self.token_lengths:
            lengths = np.asarray(self.token_lengths)
            counts, edges = np.histogram(lengths, bins=bins)
            out.append(f"tokens per example (audio included): min {lengths.min()}, median {int(np.median(lengths))}, "
                       f"max {lengths.max()}")
            scale = 40 / max(1, counts.max())
            for count, low, high in zip(counts, edges[:-1], edges[1:]):
                out.append(f"  {int(low):>7d}-{int(high):<7d} {count:>6d} {'#' * int(round(count * scale))}")
        by_reason = collections.Counter(reason for _, reason, _ in self.problems)
        if self.problems:
            out.append(f"problems by reason: {dict(by_reason)}")
            out += [f"  line {line}: [{reason}] {message}" for line, reason, message in self.problems]
        return "\n".join(out)


def inspect_manifest(manifest_path: str, tokenizer: Tokenizer, model_config: ModelConfig,
                     seq_len: int | None = None, max_windows_per_audio: int | None = None) -> ManifestReport:
    """Check every line of a manifest (schema, audio decodability, token length) and summarise it."""
    base_dir = os.path.dirname(os.path.abspath(manifest_path))
    report = ManifestReport()
    with open(manifest_path, encoding="utf-8") as manifest_file:
        lines = manifest_file.read().splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        report.lines += 1
        try:
            example = parse_line(line, base_dir, line_number)
            _check_example(report, example, lambda ref: audio_lib.load_audio(ref.path, ref.start, ref.end),
                           tokenizer, model_config, seq_len, max_windows_per_audio)
        except (ManifestError, audio_lib.AudioError) as error:
            report.problems.append((line_number, error.reason, str(error)))
    return report


def inspect_shards(pattern: str, tokenizer: Tokenizer, model_config: ModelConfig, seq_len: int | None = None,
                   max_windows_per_audio: int | None = None) -> ManifestReport:
    """`inspect_manifest` for ArrayRecord shards: every record decoded and checked the same way.

    Problems carry the manifest line the record was built from. A record that cannot be read or
    decoded raises `ShardReadError` naming the shard (a corrupt shard is not a data problem to count).
    """
    from af_next_jax.data.pipeline import _decode_shard_record
    from af_next_jax.data.shard_source import ShardSource

    source = ShardSource(pattern)
    report = ManifestReport()
    for index in range(len(source)):
        shard, position, record = source[index]
        example, samples, header = _decode_shard_record(shard, position, record)
        report.lines += 1
        try:
            decoded = iter(samples)  # one per audio reference, in order
            _check_example(report, example, lambda ref: next(decoded), tokenizer, model_config, seq_len,
                           max_windows_per_audio)
        except (ManifestError, audio_lib.AudioError) as error:
            report.problems.append((header["source"]["line"], error.reason, str(error)))
    return report


def _check_example(report: ManifestReport, example, load_samples, tokenizer: Tokenizer, model_config: ModelConfig,
                   seq_len: int | None, max_windows_per_audio: int | None) -> None:
    """Add one example to the report (`load_samples(ref)` gives its audio); raises to record a problem."""
    encoder = model_config.encoder
    window_cap = max_windows_per_audio or model_config.max_windows_per_audio
    token_counts = []
    for ref in example.audio:
        samples = load_samples(ref)
        report.durations.append(len(samples) / SAMPLE_RATE)
        windows = audio_lib.split_windows(samples, encoder, window_cap)
        report.truncated_audio += windows.truncated_seconds > 0
        frames = valid_frames_for_samples(windows.num_samples_W, encoder.mel_frames_per_window)
        token_counts.append(int(encoder_tokens_for_frames(frames).sum()))
    token_ids, _ = encode_conversation(example.conversation, tokenizer, token_counts,
                                       audio_markers=uses_audio_markers(model_config))
    if seq_len is not None and len(token_ids) > seq_len:
        raise ManifestError("too_long", f"{len(token_ids)} tokens exceed seq_len {seq_len}")
    report.valid += 1
    report.tasks[example.task] += 1
    report.variants[example.variant] += 1
    report.token_lengths.append(len(token_ids))
