"""The ArrayRecord shard format: one training example per record, audio already decoded to 16 kHz.

A record is `MAGIC | uint32 header length | header JSON | audio payloads`, little endian:

    header = {"id", "task", "variant", "conversation": [{"role", "content"}, ...],
              "source": {"manifest": "train.jsonl", "line": 17},
              "audio": [{"encoding": "flac" | "int16", "num_samples": N, "num_bytes": B,
                         "path": original file, "start": s | null, "end": s | null}, ...]}

The audio is what `audio.load_audio` returned for each reference (the span between `start` and
`end`, resampled, mono), quantised to 16-bit: bit-exact for 16-bit sources at 16 kHz, within 1/32768
otherwise. `start`/`end` are kept as metadata only, so timestamps in the conversation keep meaning
seconds from the start of the stored audio, exactly as when the manifest is read. The full span is
stored: the window cap (`max_windows_per_audio`) is a training choice, applied when reading.

Shard files are `{stem}-{index:05d}-of-{count:05d}.array_record`, written with `group_size:1` (what
grain's random access needs) and no extra compression (FLAC does not compress further). docs/DATA.md
gives the measured sizes behind the default encoding.
"""

from __future__ import annotations

import io
import json
import os
import struct

import numpy as np

from af_next_jax.config import SAMPLE_RATE
from af_next_jax.data.manifest import AudioRef, Example, Turn

MAGIC = b"AFX1"
AUDIO_ENCODINGS = ("flac", "int16")
DEFAULT_AUDIO_ENCODING = "flac"
SHARD_SUFFIX = ".array_record"
# group_size:1 gives one record per chunk, so a random read decodes one example (grain's requirement);
# one writer thread keeps the file layout independent of timing.
WRITER_OPTIONS = "group_size:1,uncompressed,max_parallelism:1"
_HEADER_LENGTH = struct.Struct("<I")
_INT16_SCALE = 32768.0  # libsndfile's float <-> 16-bit PCM factor, so int16 / 32768 equals load_audio


class ShardFormatError(ValueError):
    """A record that is not an example of this format (a corrupt or foreign shard)."""


def shard_file_name(stem: str, index: int, count: int) -> str:
    return f"{stem}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def is_shard_pattern(entry: str) -> bool:
    """True for a data source that names ArrayRecord shards (a file or a glob) rather than a JSONL manifest."""
    return entry.endswith(SHARD_SUFFIX)


def to_int16(samples: np.ndarray) -> np.ndarray:
    return np.clip(np.round(samples * _INT16_SCALE), -32768, 32767).astype("<i2")


def encode_audio(samples: np.ndarray, encoding: str) -> bytes:
    """16 kHz float32 samples -> payload bytes (16-bit PCM or a 16-bit FLAC stream)."""
    pcm = to_int16(samples)
    if encoding == "int16":
        return pcm.tobytes()
    if encoding == "flac":
        import soundfile

        buffer = io.BytesIO()
        soundfile.write(buffer, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return buffer.getvalue()
    raise ValueError(f"audio encoding must be one of {AUDIO_ENCODINGS}, got {encoding!r}")


def decode_audio(payload: bytes, encoding: str, num_samples: int) -> np.ndarray:
    """Payload -> float32 samples, converted as libsndfile converts 16-bit files (so equal to load_audio)."""
    if encoding == "int16":
        pcm = np.frombuffer(payload, "<i2")
    elif encoding == "flac":
        import soundfile

        pcm, _ = soundfile.read(io.BytesIO(payload), dtype="int16")
    else:
        raise ShardFormatError(f"unknown audio encoding {encoding!r} (this reader knows {AUDIO_ENCODINGS})")
    if len(pcm) != num_samples:
        raise ShardFormatError(f"audio holds {len(pcm)} samples, its header promises {num_samples}")
    return (pcm.astype(np.float32) / np.float32(_INT16_SCALE)).astype(np.float32)


def encode_example(example: Example, samples: list[np.ndarray], encoding: str, manifest: str,
                   line_number: int) -> bytes:
    """One record: the example's text and metadata, and each audio reference's decoded samples."""
    payloads = [encode_audio(audio, encoding) for audio in samples]
    header = {
        "id": example.example_id, "task": example.task, "variant": example.variant,
        "conversation": [{"role": turn.role, "content": turn.content} for turn in example.conversation],
        "source": {"manifest": os.path.basename(manifest), "line": line_number},
        "audio": [{"encoding": encoding, "num_samples": len(audio), "num_bytes": len(payload),
                   "path": ref.path, "start": ref.start, "end": ref.end}
                  for ref, audio, payload in zip(example.audio, samples, payloads)],
    }
    # sort_keys + fixed separators: the same example always gives the same bytes.
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return b"".join([MAGIC, _HEADER_LENGTH.pack(len(header_bytes)), header_bytes, *payloads])


def decode_header(record: bytes) -> tuple[dict, int]:
    """(header, offset of the first audio payload); raises ShardFormatError on anything malformed."""
    if len(record) < len(MAGIC) + _HEADER_LENGTH.size or record[:len(MAGIC)] != MAGIC:
        raise ShardFormatError(f"record does not start with {MAGIC!r} (not an af_next_jax example record)")
    start = len(MAGIC) + _HEADER_LENGTH.size
    (header_length,) = _HEADER_LENGTH.unpack_from(record, len(MAGIC))
    try:
        header = json.loads(record[start:start + header_length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardFormatError(f"record header is not valid JSON ({error})") from None
    return header, start + header_length


def decode_example(record: bytes) -> tuple[Example, list[np.ndarray], dict]:
    """(Example, samples per audio reference, header) of one record."""
    header, offset = decode_header(record)
    try:
        samples = []
        for audio in header["audio"]:
            payload = record[offset:offset + audio["num_bytes"]]
            if len(payload) != audio["num_bytes"]:
                raise ShardFormatError(f"record ends after {len(record)} bytes, inside its audio payload")
            samples.append(decode_audio(payload, audio["encoding"], audio["num_samples"]))
            offset += audio["num_bytes"]
        example = Example(
            example_id=header["id"], task=header["task"], variant=header["variant"],
            audio=tuple(AudioRef(audio["path"], audio["start"], audio["end"]) for audio in header["audio"]),
            conversation=tuple(Turn(turn["role"], turn["content"]) for turn in header["conversation"]))
    except (KeyError, TypeError) as error:
        raise ShardFormatError(f"record header lacks a field or has a wrong type ({error!r})") from None
    return example, samples, header


def write_shard(path: str, records: list[bytes]) -> None:
    """Write `records` in order to an ArrayRecord file at `path` (local, or any etils.epath location).

    The file appears under its name only once complete (a temporary name, then a rename or copy), so a
    retried or killed worker never leaves a half-written shard behind.
    """
    import tempfile

    from array_record.python.array_record_module import ArrayRecordWriter
    from etils import epath

    destination = epath.Path(path)
    local = "://" not in str(path)
    folder = str(destination.parent) if local else None
    handle, temporary = tempfile.mkstemp(suffix=SHARD_SUFFIX, dir=folder)
    os.close(handle)
    try:
        writer = ArrayRecordWriter(temporary, WRITER_OPTIONS)
        for record in records:
            writer.write(record)
        writer.close()
        os.chmod(temporary, 0o644)  # mkstemp makes 0600 files; shards are read by other users' jobs
        if local:
            os.replace(temporary, path)
        else:
            destination.write_bytes(epath.Path(temporary).read_bytes())
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
