"""Reading ArrayRecord shards: a glob -> an ordered, random-access source of `(shard, position, record)`.

`ShardSource` is a grain data source over grain's `ArrayRecordDataSource`, with two additions: the
files of a pattern are read in sorted order (`-00000-of-N` first, so the global record order is the
order of the manifest the shards were built from), and any read failure names the shard file and the
record position. array_record's reader opens `gs://` files itself (it embeds a GCS client); globbing
a `gs://` pattern goes through etils.epath, which needs gcsfs or tensorflow installed. Local paths
need nothing.
"""

from __future__ import annotations

import bisect
import itertools

from af_next_jax.data.shard_format import SHARD_SUFFIX


class ShardReadError(RuntimeError):
    """A shard file that cannot be read: missing, truncated or corrupt. The message names the file."""


def resolve_shard_files(pattern: str) -> list[str]:
    """The files a shard pattern names, sorted; an error naming the pattern when there are none."""
    from etils import epath

    if not pattern.endswith(SHARD_SUFFIX):
        raise ValueError(f"a shard pattern must end in {SHARD_SUFFIX} (e.g. 'shards/train-*{SHARD_SUFFIX}'), "
                         f"got {pattern!r}")
    if not any(character in pattern for character in "*?["):
        # A remote file is opened by array_record's own GCS reader (its error names the file).
        if "://" not in pattern and not epath.Path(pattern).exists():
            raise ShardReadError(f"shard file {pattern} does not exist")
        return [pattern]
    folder, _, name_pattern = pattern.rpartition("/")
    if any(character in folder for character in "*?["):
        raise ValueError(f"only the file name of a shard pattern may hold wildcards, got {pattern!r}")
    files = sorted(str(path) for path in epath.Path(folder or ".").glob(name_pattern))
    if not files:
        raise ShardReadError(f"shard pattern {pattern} matches no file; build shards with "
                             f"`python -m af_next_jax.data build-shards --manifest M --out DIR`")
    return files


def _count_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
        count = reader.num_records()
        reader.close()
    except Exception as error:  # riegeli reports truncation/corruption as a bare RuntimeError
        raise ShardReadError(f"cannot open shard {path}: {error}") from error
    return count


class ShardSource:
    """Random access to the records of every file of a shard pattern, as `(shard path, position, bytes)`.

    Picklable (grain ships it to worker processes); readers open lazily in each process.
    """

    def __init__(self, pattern: str):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.pattern = pattern
        self.files = resolve_shard_files(pattern)
        counts = [_count_records(path) for path in self.files]
        self._ends = list(itertools.accumulate(counts))
        # "path[0:n]" read instructions: grain's source then skips reopening every file to count it.
        self._records = ArrayRecordDataSource([f"{path}[0:{count}]" for path, count in zip(self.files, counts)])

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, index: int) -> tuple[str, int]:
        """(shard file, position inside it) of global record `index`."""
        file_index = bisect.bisect_right(self._ends, index)
        return self.files[file_index], index - (self._ends[file_index - 1] if file_index else 0)

    def __getitem__(self, index: int) -> tuple[str, int, bytes]:
        index = index.__index__()
        path, position = self.locate(index)
        try:
            return path, position, self._records[index]
        except Exception as error:
            raise ShardReadError(f"cannot read record {position} of shard {path}: {error}") from error

    def __repr__(self) -> str:
        return f"ShardSource({self.pattern!r}, {len(self.files)} files, {len(self)} records)"
