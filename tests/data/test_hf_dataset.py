"""`from-hf-dataset` on small Hugging Face-layout datasets written here (parquet as on the hub, and
`save_to_disk` arrow folders), checked against the audio and text they were built from."""

import io
import json
import os

import numpy as np
import pytest

SENTENCES = ["the cat sat", "a dog barked twice", "", "rain on the roof"]


def _wav_bytes(samples, sample_rate):
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _rows():
    rng = np.random.default_rng(0)
    clips = [np.round(0.2 * rng.standard_normal(16_000 + 4000 * index) * 32767) / 32768 for index in range(4)]
    rows = [{"audio": {"bytes": _wav_bytes(clip, 16_000), "path": f"clip{index}.wav"}, "sentence": sentence,
             "locale": "en"} for index, (clip, sentence) in enumerate(zip(clips, SENTENCES))]
    return rows, clips


def _table(rows):
    import pyarrow as pa

    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({"audio": pa.array([row["audio"] for row in rows], audio_type),
                     "sentence": [row["sentence"] for row in rows], "locale": [row["locale"] for row in rows]})


@pytest.fixture
def parquet_dataset(tmp_path):
    import pyarrow.parquet as pq

    rows, clips = _rows()
    folder = tmp_path / "hub_layout"
    (folder / "data").mkdir(parents=True)
    pq.write_table(_table(rows[:2]), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(_table(rows[2:]), folder / "data" / "train-00001-of-00002.parquet")
    pq.write_table(_table(rows[:1]), folder / "data" / "test-00000-of-00001.parquet")
    return folder, clips


def test_parquet_dataset_becomes_a_manifest_and_shards(parquet_dataset, tmp_path, capsys):
    from af_next_jax.data.__main__ import main
    from af_next_jax.data.audio import load_audio
    from af_next_jax.data.manifest import parse_line
    from af_next_jax.data.shard_source import ShardSource

    folder, clips = parquet_dataset
    out = tmp_path / "out"
    code = main(["from-hf-dataset", str(folder), "--split", "train", "--audio-column", "audio", "--text-column",
                 "sentence", "--task", "asr", "--prompt", "Transcribe this {locale} speech.", "--out", str(out),
                 "--num-shards", "2"])
    assert code == 0
    lines = (out / "train.jsonl").read_text().splitlines()
    kept = [index for index, sentence in enumerate(SENTENCES) if sentence]  # the empty transcript is skipped
    assert len(lines) == len(kept)
    for line, index in zip(lines, kept):
        example = parse_line(line, str(out))
        assert [turn.content for turn in example.conversation] == [
            "<sound>\nTranscribe this en speech.", SENTENCES[index]]
        assert example.task == "asr" and example.variant == "instruct"
        np.testing.assert_array_equal(load_audio(example.audio[0].path), clips[index].astype(np.float32))
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary == {"manifest": str(out / "train.jsonl"), "rows": 4, "written": 3, "skipped_no_text": 1}
    assert len(ShardSource(str(out / "train-*.array_record"))) == len(kept)


def test_save_to_disk_folder_and_default_prompt(tmp_path):
    import pyarrow as pa

    from af_next_jax.data.hf_dataset import from_hf_dataset

    rows, _ = _rows()
    split_folder = tmp_path / "saved" / "validation"  # a DatasetDict.save_to_disk layout
    split_folder.mkdir(parents=True)
    table = _table(rows)
    with pa.ipc.new_stream(split_folder / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    (split_folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    summary = from_hf_dataset(str(tmp_path / "saved"), "validation", "audio", "sentence", "asr", str(tmp_path / "o"),
                              limit=2)
    assert summary["written"] == 2
    first = json.loads((tmp_path / "o" / "validation.jsonl").read_text().splitlines()[0])
    assert first["conversation"][0]["content"] == "<sound>\nTranscribe the speech."
    assert os.path.exists(tmp_path / "o" / first["audio"][0]["path"]) and first["audio"][0]["path"].endswith(".wav")


def test_wrong_split_column_or_task_say_what_exists(parquet_dataset, tmp_path):
    from af_next_jax.data.hf_dataset import DatasetReadError, from_hf_dataset

    folder, _ = parquet_dataset
    with pytest.raises(DatasetReadError, match=r"no split 'dev'.*\['test', 'train'\]"):
        from_hf_dataset(str(folder), "dev", "audio", "sentence", "asr", str(tmp_path / "a"))
    with pytest.raises(DatasetReadError, match=r"column 'text' is not in the dataset; columns: \['audio', 'locale', "
                                               r"'sentence'\]"):
        from_hf_dataset(str(folder), "train", "audio", "text", "asr", str(tmp_path / "b"))
    with pytest.raises(DatasetReadError, match="task 'emotion' has no default prompt"):
        from_hf_dataset(str(folder), "train", "audio", "sentence", "emotion", str(tmp_path / "c"))
