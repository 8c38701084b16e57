"""`from-hf-dataset`: a Hugging Face audio dataset -> a JSONL manifest + audio files (and optionally shards).

Reads the two layouts datasets are stored in, with pyarrow alone (no `datasets` package needed):

  - Parquet, as on the hub (`data/{split}-00000-of-00003.parquet`, or `{split}/*.parquet`): a local
    folder, or a hub name (`org/name`), whose parquet files huggingface_hub downloads when the hub is
    reachable;
  - `Dataset.save_to_disk` folders (`state.json` + arrow stream files; a `DatasetDict` has one
    folder per split).

The audio column is the `Audio` feature's storage, `{"bytes", "path"}` (bytes win; a bare path is
resolved against the dataset folder), or `{"array", "sampling_rate"}`, or a plain path string. Each
row becomes one example; the conversation comes from templates filled with the row's columns:

    user:      "<sound>\\n" + prompt    (default per task, e.g. asr -> "Transcribe the speech.")
    assistant: answer template          (default "{<text column>}")
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

from af_next_jax.data.manifest import AUDIO_PLACEHOLDER, VARIANTS

DEFAULT_PROMPTS = {
    "asr": "Transcribe the speech.",
    "caption": "Describe the audio in detail.",
    "sound_caption": "Describe the sounds you hear.",
    "music_caption": "Describe the music.",
}
# Leading bytes -> file extension, so the written audio file says what it holds.
_MAGIC_EXTENSIONS = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"))


class DatasetReadError(ValueError):
    """The dataset, split or column asked for is not there; the message lists what is."""


@dataclasses.dataclass(frozen=True)
class Templates:
    prompt: str
    answer: str
    system: str | None = None

    def conversation(self, row: dict) -> list[dict]:
        fields = {name: value for name, value in row.items() if isinstance(value, (str, int, float))}
        try:
            user, answer = self.prompt.format_map(fields), self.answer.format_map(fields)
        except KeyError as missing:
            raise DatasetReadError(f"template field {missing} is not a text/number column; columns: "
                                   f"{sorted(fields)}") from None
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return turns + [{"role": "user", "content": f"{AUDIO_PLACEHOLDER}\n{user}"},
                        {"role": "assistant", "content": answer}]


def _arrow_files(folder: str) -> list[str]:
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as state_file:
        return [os.path.join(folder, entry["filename"]) for entry in json.load(state_file)["_data_files"]]


def _split_files(folder: str, split: str) -> tuple[str, list[str]]:
    """("parquet" | "arrow", files) of `split` in a local dataset folder."""
    if os.path.exists(os.path.join(folder, split, "state.json")):  # DatasetDict.save_to_disk
        return "arrow", _arrow_files(os.path.join(folder, split))
    if os.path.exists(os.path.join(folder, "state.json")):  # Dataset.save_to_disk: the folder is the split
        return "arrow", _arrow_files(folder)
    parquet = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    relative = [os.path.relpath(path, folder).split(os.sep) for path in parquet]
    matching = [path for path, parts in zip(parquet, relative)
                if parts[-1].startswith(f"{split}-") or parts[-1] == f"{split}.parquet" or split in parts[:-1]]
    if matching:
        return "parquet", matching
    splits = sorted({parts[-1].split("-")[0].removesuffix(".parquet") for parts in relative})
    raise DatasetReadError(f"no split {split!r} in {folder}: parquet files there name the splits {splits}, "
                           f"and there is no save_to_disk state.json")


def _local_folder(name_or_path: str) -> str:
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/")) or name_or_path.count("/") != 1:
        raise DatasetReadError(f"{name_or_path!r} is neither a dataset folder nor a hub name 'org/name'")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=name_or_path, repo_type="dataset",
                                 allow_patterns=["*.parquet", "*/state.json", "*.arrow", "*.json"])
    except Exception as error:  # offline, unknown name, gated: say which
        raise DatasetReadError(f"cannot fetch dataset {name_or_path!r} from the Hugging Face hub ({error}); "
                               f"download it elsewhere and pass its folder") from None


def iterate_rows(name_or_path: str, split: str, batch_rows: int = 256):
    """(dataset folder, rows as dicts) of a split, read batch by batch."""
    import pyarrow.ipc
    import pyarrow.parquet

    folder = _local_folder(name_or_path)
    kind, files = _split_files(folder, split)

    def rows():
        for path in files:
            if kind == "parquet":
                batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=batch_rows)
            else:
                batches = iter(pyarrow.ipc.open_stream(path))
            for batch in batches:
                yield from batch.to_pylist()

    return folder, rows()


def _write_audio(value, folder: str, out_dir: str, index: int) -> str:
    """The audio of one row as a file under out_dir/audio (path relative to out_dir)."""
    if isinstance(value, str):
        return os.path.abspath(value if os.path.isabs(value) else os.path.join(folder, value))
    if not isinstance(value, dict):
        raise DatasetReadError(f"row {index}: the audio column holds {type(value).__name__}, expected the Audio "
                               f"feature's {{'bytes', 'path'}}, {{'array', 'sampling_rate'}} or a path")
    name = os.path.join("audio", f"{index:08d}")
    if value.get("bytes"):
        data = value["bytes"]
        extension = next((ext for magic, ext in _MAGIC_EXTENSIONS if data.startswith(magic)),
                         os.path.splitext(value.get("path") or "")[1] or ".bin")
        with open(os.path.join(out_dir, name + extension), "wb") as audio_file:
            audio_file.write(data)
        return name + extension
    if value.get("array") is not None:
        import numpy as np
        import soundfile

        soundfile.write(os.path.join(out_dir, name + ".wav"), np.asarray(value["array"], np.float32),
                        int(value["sampling_rate"]), subtype="FLOAT")
        return name + ".wav"
    if value.get("path"):
        return _write_audio(value["path"], folder, out_dir, index)
    raise DatasetReadError(f"row {index}: the audio value has neither bytes, array nor path")


def from_hf_dataset(name_or_path: str, split: str, audio_column: str, text_column: str, task: str, out_dir: str,
                    prompt: str | None = None, answer: str | None = None, system: str | None = None,
                    variant: str = "instruct", limit: int | None = None) -> dict:
    """Write `out_dir/{split}.jsonl` and `out_dir/audio/`; returns counts (rows, written, skipped)."""
    if prompt is None:
        if task not in DEFAULT_PROMPTS:
            raise DatasetReadError(f"task {task!r} has no default prompt ({sorted(DEFAULT_PROMPTS)} do): "
                                   f"pass --prompt 'question to ask, may use {{column}} fields'")
        prompt = DEFAULT_PROMPTS[task]
    if variant not in VARIANTS:
        raise DatasetReadError(f"variant must be one of {VARIANTS}, got {variant!r}")
    templates = Templates(prompt=prompt, answer=answer or f"{{{text_column}}}", system=system)
    folder, rows = iterate_rows(name_or_path, split)
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    manifest = os.path.join(out_dir, f"{split}.jsonl")
    counts = {"rows": 0, "written": 0, "skipped_no_text": 0}
    with open(manifest, "w", encoding="utf-8") as manifest_file:
        for index, row in enumerate(rows):
            if limit is not None and index >= limit:
                break
            counts["rows"] += 1
            for column in (audio_column, text_column):
                if column not in row:
                    raise DatasetReadError(f"column {column!r} is not in the dataset; columns: {sorted(row)}")
            if not isinstance(row[text_column], str) or not row[text_column].strip():
                counts["skipped_no_text"] += 1
                continue
            audio = _write_audio(row[audio_column], folder, out_dir, index)
            record = {"id": f"{split}-{index:08d}", "audio": [{"path": audio}], "task": task, "variant": variant,
                      "conversation": templates.conversation(row)}
            manifest_file.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts["written"] += 1
    return {"manifest": manifest, **counts}
