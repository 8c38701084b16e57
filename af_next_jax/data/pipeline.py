"""The training input pipeline: manifests or shards -> prepared examples -> packed, sharded, resumable batches.

    data_config = DataConfig(manifests=("train.jsonl",), tokenizer="tokenizer.json", seq_len=1024)
    tokenizer = load_tokenizer(data_config.tokenizer)
    model_config = model_config.replace(**tokenizer.model_config_ids())
    batches = make_batch_iterator(data_config, model_config)
    batch = next(batches)                   # dict of numpy arrays, see af_next_jax/batch.py
    metrics.update(batches.metrics())       # skip counts by reason, skip fraction, examples
    state = batches.get_state()             # bytes; batches.set_state(state) resumes exactly

Grain graph (one per host): per manifest `MapDataset` of lines (per shard pattern, of ArrayRecord
records: shard_source.py) -> host shard -> seeded shuffle
(reshuffled each epoch) -> repeat; weighted `mix` of the manifests; `map(prepare)` (load, resample,
window, log-mel, tokenise; a bad line becomes a counted skip record); packing; optional
`mp_prefetch` worker processes. Everything before packing is index-addressed, so the iterator
state is a few integers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import grain
import numpy as np

from af_next_jax.config import ModelConfig
from af_next_jax.data import audio as audio_lib
from af_next_jax.data.audio_features import example_windows, window_audio
from af_next_jax.data.conversation import encode_conversation, uses_audio_markers
from af_next_jax.data.manifest import SKIP_REASONS, Example, ManifestError, parse_line
from af_next_jax.data.packing import STAT_NAMES, STATS_KEY, PackedBatchIterDataset
from af_next_jax.data.shard_format import SHARD_SUFFIX, is_shard_pattern
from af_next_jax.data.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the input pipeline needs besides the model config."""

    # Data sources: JSONL manifests and/or ArrayRecord shard patterns ("shards/train-*.array_record",
    # local or gs://), read the same way; several sources form a mixture.
    manifests: tuple[str, ...]
    tokenizer: str
    weights: tuple[float, ...] | None = None  # mixture weights, one per source (None = equal)
    seq_len: int = 1024
    batch_size: int = 8
    max_windows_per_batch: int = 16  # static W of mel_windows: each row owns W / batch_size of them
    slot_blocks: int = 1  # blocks of a row's window slots, one per sequence slice (packing.py; Program.slot_blocks)
    max_windows_per_audio: int | None = None  # None = the model's max_windows_per_audio
    num_workers: int = 0  # grain worker processes (0 = featurise in threads of this process)
    num_threads: int = 2  # featurising threads per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None = repeat forever
    skip_threshold: float = 0.05  # stop when more than this fraction of examples was skipped ...
    skip_check_after: int = 200  # ... once at least this many examples have been read
    process_index: int | None = None  # None = jax.process_index()
    process_count: int | None = None  # None = jax.process_count()

    def __post_init__(self):
        if isinstance(self.manifests, str) or not self.manifests:
            raise ValueError(f"manifests must be a non-empty tuple of manifest paths or shard patterns, "
                             f"got {self.manifests!r}")
        for entry in self.manifests:
            if not isinstance(entry, str) or ("*" in entry and not is_shard_pattern(entry)):
                raise ValueError(f"data source {entry!r}: a glob must name ArrayRecord shards "
                                 f"('DIR/train-*{SHARD_SUFFIX}'); a manifest is one .jsonl path")
        if self.weights is not None and (len(self.weights) != len(self.manifests) or min(self.weights) <= 0):
            raise ValueError(f"weights must be {len(self.manifests)} positive numbers (one per manifest), "
                             f"got {self.weights}")
        for name in ("seq_len", "batch_size", "max_windows_per_batch", "num_threads", "skip_check_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DataConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_windows_per_batch % self.batch_size:
            raise ValueError(f"max_windows_per_batch={self.max_windows_per_batch} must be a multiple of batch_size="
                             f"{self.batch_size}: every row owns max_windows_per_batch / batch_size window slots")
        rows_slots = self.max_windows_per_batch // self.batch_size
        if self.slot_blocks < 1 or rows_slots % self.slot_blocks or self.seq_len % self.slot_blocks:
            raise ValueError(f"slot_blocks={self.slot_blocks} must divide a row's {rows_slots} window slots and "
                             f"seq_len={self.seq_len}")
        if self.num_workers < 0:
            raise ValueError(f"DataConfig.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.skip_threshold <= 1.0:
            raise ValueError(f"skip_threshold is a fraction in [0, 1], got {self.skip_threshold}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)


class SkipThresholdExceeded(RuntimeError):
    """Too much of the data is unusable: the message lists the skips by reason."""


@dataclasses.dataclass(frozen=True)
class ExamplePreparer:
    """Turns one manifest line into a prepared example dict, or a `{"skip": reason}` record.

    A picklable callable (grain ships it to worker processes); the tokenizer is loaded lazily per
    process.
    """

    tokenizer_path: str
    model_config: ModelConfig
    seq_len: int
    max_windows_per_audio: int
    max_windows_per_batch: int

    def __call__(self, record: tuple[str, int, str | bytes]) -> dict:
        """`(manifest, line number, line)` or `(shard file, position, record bytes)` -> prepared example.

        An unusable example becomes a counted skip; a shard record that cannot be decoded raises
        `ShardReadError` naming the file (a corrupt shard is a storage fault, not a data problem).
        """
        source, number, payload = record
        if isinstance(payload, bytes):  # a shard record: text and 16 kHz audio, decoded
            example, samples, header = _decode_shard_record(source, number, payload)
            line_number = header["source"]["line"]
            where = f"record {number} of {source} (line {line_number} of {header['source']['manifest']})"
        else:  # a manifest line: parsed here, audio loaded from its files
            line_number, where = number, f"{source}:{number}"
        try:
            if isinstance(payload, bytes):
                return self.prepare_example(example, lambda index, ref: samples[index], line_number)
            example = parse_line(payload, os.path.dirname(os.path.abspath(source)), number)
            return self.prepare_example(example, lambda index, ref: audio_lib.load_audio(ref.path, ref.start, ref.end),
                                        line_number)
        except (ManifestError, audio_lib.AudioError) as error:
            logger.warning("skipping %s (%s): %s", where, error.reason, error)
            return {"skip": error.reason}

    @property
    def tokenizer(self) -> Tokenizer:
        cached = self.__dict__.get("_tokenizer")
        if cached is None:
            cached = load_tokenizer(self.tokenizer_path)
            object.__setattr__(self, "_tokenizer", cached)
        return cached

    def __getstate__(self):
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)

    def prepare(self, line: str, base_dir: str, line_number: int = 0) -> dict:
        example = parse_line(line, base_dir, line_number)
        return self.prepare_example(example, lambda index, ref: audio_lib.load_audio(ref.path, ref.start, ref.end),
                                    line_number)

    def prepare_example(self, example: Example, load_samples, line_number: int = 0) -> dict:
        """Window, featurise and tokenise a parsed example; `load_samples(index, ref)` gives its audio.

        Manifests load from the audio files, shards decode the record: one code path after that, so
        both give the same example (and the same skips) for the same data.
        """
        encoder = self.model_config.encoder
        # One featurisation for training and inference (audio_features.py): windows and token counts
        # first, so the length checks below precede the log-mel work.
        windows = [window_audio(load_samples(index, ref), encoder, self.max_windows_per_audio, name=ref.path)
                   for index, ref in enumerate(example.audio)]
        num_windows = sum(audio.num_windows for audio in windows)
        if num_windows > self.max_windows_per_batch:
            raise ManifestError("too_many_windows", f"line {line_number}: {num_windows} windows but a batch holds "
                                                    f"{self.max_windows_per_batch} (max_windows_per_batch)")
        token_ids, trainable = encode_conversation(example.conversation, self.tokenizer,
                                                   [audio.token_count for audio in windows],
                                                   audio_markers=uses_audio_markers(self.model_config))
        if len(token_ids) > self.seq_len:
            raise ManifestError("too_long", f"line {line_number}: {len(token_ids)} tokens exceed seq_len "
                                            f"{self.seq_len}")
        return {"token_ids": token_ids, "trainable": trainable,
                "truncated_audio": sum(audio.truncated_seconds > 0 for audio in windows),
                **example_windows([audio.log_mel() for audio in windows], encoder)}


def _host_index_and_count(data_config: DataConfig) -> tuple[int, int]:
    if data_config.process_index is not None and data_config.process_count is not None:
        return data_config.process_index, data_config.process_count
    import jax

    return jax.process_index(), jax.process_count()


def _decode_shard_record(shard: str, position: int, record: bytes):
    from af_next_jax.data.shard_format import ShardFormatError, decode_example
    from af_next_jax.data.shard_source import ShardReadError

    try:
        return decode_example(record)
    except ShardFormatError as error:
        raise ShardReadError(f"record {position} of shard {shard} is corrupt: {error}") from None


def source_records(entry: str):
    """The records of one data source: a manifest's non-blank `(manifest, line number, line)`s, or a
    `ShardSource` of `(shard file, position, record)` for an ArrayRecord pattern (same order as the
    manifest it was built from)."""
    if is_shard_pattern(entry):
        from af_next_jax.data.shard_source import ShardSource

        return ShardSource(entry)
    with open(entry, encoding="utf-8") as manifest_file:
        return [(entry, number, line) for number, line in enumerate(manifest_file.read().splitlines(), 1)
                if line.strip()]


def manifest_records(data_config: DataConfig) -> grain.MapDataset:
    """This host's records of every source: sharded, shuffled per epoch, repeated, mixed.

    Manifests and shard sets go through the same steps with the same seeds, so shards built from a
    manifest (with nothing skipped) give the very same sequence of examples.
    """
    host, hosts = _host_index_and_count(data_config)
    if not 0 <= host < hosts:
        raise ValueError(f"process_index {host} must lie in [0, process_count={hosts})")
    sources = []
    for manifest_number, manifest in enumerate(data_config.manifests):
        records = source_records(manifest)
        # Shard before shuffling: each host owns a fixed, disjoint stride of every source.
        shard = grain.MapDataset.source(records)[host::hosts]
        if len(shard) == 0:
            raise ValueError(f"data source {manifest} has {len(records)} examples: too few for host {host} of {hosts}")
        if data_config.shuffle:
            # Shuffle before repeat: grain then reseeds the permutation each epoch.
            shard = shard.shuffle(seed=(data_config.seed * 1_000_003 + manifest_number) % 2**32)
        sources.append(shard.repeat(data_config.num_epochs))
    return sources[0] if len(sources) == 1 else grain.MapDataset.mix(sources, data_config.weights)


def build_dataset(data_config: DataConfig, model_config: ModelConfig) -> grain.IterDataset:
    """The grain graph of this host (see the module docstring)."""
    tokenizer = load_tokenizer(data_config.tokenizer)
    tokenizer.check_compatible(model_config)
    mixture = manifest_records(data_config)
    preparer = ExamplePreparer(
        tokenizer_path=data_config.tokenizer, model_config=model_config, seq_len=data_config.seq_len,
        max_windows_per_audio=data_config.max_windows_per_audio or model_config.max_windows_per_audio,
        max_windows_per_batch=data_config.max_windows_per_batch)
    prepared = mixture.map(preparer).to_iter_dataset(
        grain.ReadOptions(num_threads=data_config.num_threads, prefetch_buffer_size=4 * data_config.num_threads))
    encoder = model_config.encoder
    batches = PackedBatchIterDataset(prepared, data_config.batch_size, data_config.seq_len,
                                     data_config.max_windows_per_batch,
                                     (encoder.num_mel_bins, encoder.mel_frames_per_window), tokenizer.special.pad,
                                     tokenizer.special.audio, data_config.slot_blocks)
    if data_config.num_workers:
        from absl import flags

        # grain's worker processes read absl flags; outside an absl app nobody parsed them.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.num_workers,
                                                                   per_worker_buffer_size=2))
    return batches


class BatchIterator:
    """Iterator of batch dicts with skip accounting and byte-string state.

    `get_state() -> bytes` / `set_state(bytes)` / `start_prefetch()` follow grain's DataLoaderIterator,
    so orbax saves it next to the model with `grain.checkpoint.CheckpointSave(iterator)` (see DATA.md).
    """

    def __init__(self, dataset: grain.IterDataset, data_config: DataConfig):
        self._dataset = dataset
        self._iterator = dataset.__iter__()
        self._config = data_config
        self._totals = np.zeros(len(STAT_NAMES), np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        self._totals += batch.pop(STATS_KEY)
        self._check_skips()
        return batch

    def skip_counts(self) -> dict[str, int]:
        """Examples skipped so far on this host, by reason (every reason listed, zeros included)."""
        return {reason: int(self._totals[STAT_NAMES.index(reason)]) for reason in SKIP_REASONS}

    def metrics(self) -> dict[str, float]:
        """Flat `data/...` scalars for the training metrics."""
        skipped = sum(self.skip_counts().values())
        used = int(self._totals[STAT_NAMES.index("examples")])
        metrics = {f"data/skipped/{reason}": float(count) for reason, count in self.skip_counts().items()}
        metrics.update({"data/examples": float(used), "data/skipped": float(skipped),
                        "data/skip_fraction": skipped / max(1, skipped + used),
                        "data/truncated_audio": float(self._totals[STAT_NAMES.index("truncated_audio")])})
        return metrics

    def _check_skips(self) -> None:
        skipped = sum(self.skip_counts().values())
        seen = skipped + int(self._totals[STAT_NAMES.index("examples")])
        if seen >= self._config.skip_check_after and skipped > self._config.skip_threshold * seen:
            summary = ", ".join(f"{reason}: {count}" for reason, count in self.skip_counts().items() if count)
            raise SkipThresholdExceeded(
                f"{skipped} of {seen} examples ({skipped / seen:.1%}) were skipped, above skip_threshold "
                f"{self._config.skip_threshold:.1%}: {summary}. Run `python -m af_next_jax.data inspect "
                f"--manifest M` on {list(self._config.manifests)} to see every problem with its line number.")

    def get_state(self) -> bytes:
        return json.dumps({"grain": self._iterator.get_state(), "totals": self._totals.tolist()}).encode()

    def set_state(self, state: bytes) -> None:
        decoded = json.loads(state)
        self._iterator.set_state(decoded["grain"])
        self._totals = np.asarray(decoded["totals"], np.int64)

    def start_prefetch(self) -> None:
        """No-op hook that grain's orbax CheckpointHandler calls after restoring (prefetch starts lazily)."""

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def make_batch_iterator(data_config: DataConfig, model_config: ModelConfig) -> BatchIterator:
    """Batches for this host, in the format of af_next_jax/batch.py (see the module docstring)."""
    return BatchIterator(build_dataset(data_config, model_config), data_config)

