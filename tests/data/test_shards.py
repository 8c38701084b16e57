"""ArrayRecord shards: the Beam build (DirectRunner), the record format, and reading them for training.

The reference for every read-side test is the manifest the shards were built from: same examples,
same order, same batches, same skips.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from af_next_jax.data.pipeline import make_batch_iterator, manifest_records
from pipeline_helpers import assert_restored_iterator_continues_exactly, assert_same_batches, small_config, take

NUM_SHARDS = 3


@pytest.fixture(scope="session")
def demo_shards(demo_dir, tmp_path_factory):
    """The demo's train and held-out manifests as 3 shards each, built once per session."""
    from af_next_jax.data.build_shards import build_shards

    out = tmp_path_factory.mktemp("shards")
    summary = build_shards([str(demo_dir / "train.jsonl"), str(demo_dir / "heldout.jsonl")], str(out),
                           num_shards=NUM_SHARDS)
    return out, summary


def _lines(path):
    return [line for line in open(path).read().splitlines() if line.strip()]


def test_build_writes_every_example_in_manifest_order(demo_dir, demo_shards):
    from af_next_jax.data.shard_format import decode_header
    from af_next_jax.data.shard_source import ShardSource

    out, summary = demo_shards
    source = ShardSource(str(out / "train-*.array_record"))
    assert [os.path.basename(path) for path in source.files] == [
        f"train-{index:05d}-of-{NUM_SHARDS:05d}.array_record" for index in range(NUM_SHARDS)]
    manifest = [json.loads(line) for line in _lines(demo_dir / "train.jsonl")]
    headers = [decode_header(source[index][2])[0] for index in range(len(source))]
    assert [header["id"] for header in headers] == [record["id"] for record in manifest]
    assert [header["source"]["line"] for header in headers] == list(range(1, len(manifest) + 1))
    train = summary["manifests"][0]
    assert train["examples"] == len(manifest) and train["skipped_total"] == 0
    assert summary["beam_counters"]["examples"] == len(manifest) + len(_lines(demo_dir / "heldout.jsonl"))


def test_shards_give_the_same_batches_as_their_manifests_step_by_step(demo_dir, demo_shards, tiny_config):
    out, _ = demo_shards
    manifests = [str(demo_dir / "train.jsonl"), str(demo_dir / "heldout.jsonl")]
    shards = [str(out / "train-*.array_record"), str(out / "heldout-*.array_record")]
    # A weighted mixture over more than one epoch of the small held-out source.
    from_manifests = make_batch_iterator(small_config(demo_dir, manifests, weights=(2.0, 1.0)), tiny_config)
    from_shards = make_batch_iterator(small_config(demo_dir, shards, weights=(2.0, 1.0)), tiny_config)
    assert_same_batches(take(from_shards, 8), take(from_manifests, 8))
    assert from_shards.metrics() == from_manifests.metrics()


def test_build_is_deterministic(demo_dir, demo_shards, tmp_path):
    from af_next_jax.data.build_shards import build_shards

    out, _ = demo_shards
    # Another process order and worker layout: 2 DirectRunner workers in threads.
    build_shards([str(demo_dir / "train.jsonl"), str(demo_dir / "heldout.jsonl")], str(tmp_path),
                 num_shards=NUM_SHARDS, pipeline_args=["--direct_num_workers=2", "--direct_running_mode=multi_threading"])
    names = sorted(name for name in os.listdir(out) if name.endswith(".array_record"))
    assert names == sorted(name for name in os.listdir(tmp_path) if name.endswith(".array_record"))
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def _bad_manifest(demo_dir, tmp_path):
    good = [json.loads(line) for line in _lines(demo_dir / "train.jsonl")[:4]]
    for record in good:
        record["audio"][0]["path"] = str(demo_dir / record["audio"][0]["path"])
    junk, empty = tmp_path / "junk.wav", tmp_path / "empty.wav"
    junk.write_bytes(b"RIFF" + bytes(range(200)))
    empty.write_bytes(b"")

    def with_audio(path):
        return json.dumps({**good[0], "audio": [{"path": str(path)}]})

    lines = [json.dumps(good[0]), with_audio(tmp_path / "missing.wav"), json.dumps(good[1]), "{not json",
             with_audio(junk), json.dumps(good[2]), with_audio(empty),
             json.dumps({**good[3], "conversation": good[3]["conversation"][:2]}), json.dumps(good[3])]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, {"missing_audio": 1, "malformed_json": 1, "corrupt_audio": 1, "empty_audio": 1,
                  "no_assistant_turn": 1}, [good[index]["id"] for index in range(4)]


def test_bad_audio_and_lines_are_skipped_and_counted_during_the_build(demo_dir, tmp_path):
    from af_next_jax.data.build_shards import build_shards
    from af_next_jax.data.shard_format import decode_header
    from af_next_jax.data.shard_source import ShardSource

    path, expected, good_ids = _bad_manifest(demo_dir, tmp_path)
    summary = build_shards([str(path)], str(tmp_path / "out"), num_shards=2)
    built = summary["manifests"][0]
    assert built["skipped"] == expected and built["examples"] == len(good_ids)
    assert [(line, reason) for line, reason, _ in built["problems"]] == [
        (2, "missing_audio"), (4, "malformed_json"), (5, "corrupt_audio"), (7, "empty_audio"), (8, "no_assistant_turn")]
    assert {name: count for name, count in summary["beam_counters"].items() if name.startswith("skipped/")} == {
        f"skipped/{reason}": count for reason, count in expected.items()}
    assert json.loads((tmp_path / "out" / "build_summary.json").read_text())["manifests"][0]["skipped"] == expected
    source = ShardSource(str(tmp_path / "out" / "bad-*.array_record"))
    assert [decode_header(source[index][2])[0]["id"] for index in range(len(source))] == good_ids


def test_a_corrupt_shard_fails_naming_the_shard(demo_dir, demo_shards, tiny_config, tmp_path, capsys):
    from array_record.python.array_record_module import ArrayRecordWriter

    from af_next_jax.data.__main__ import main
    from af_next_jax.data.shard_source import ShardReadError, ShardSource

    out, _ = demo_shards
    original = (out / "train-00001-of-00003.array_record").read_bytes()
    for index in range(NUM_SHARDS):
        (tmp_path / f"cut-{index:05d}.array_record").write_bytes(
            (out / f"train-{index:05d}-of-00003.array_record").read_bytes())
    truncated = tmp_path / "cut-00001.array_record"
    truncated.write_bytes(original[:len(original) // 2])
    with pytest.raises(ShardReadError, match=f"cannot open shard {truncated}"):
        ShardSource(str(tmp_path / "cut-*.array_record"))

    # Bytes flipped inside a record's payload: riegeli's chunk hash catches it when the record is read.
    flipped = bytearray(original)
    flipped[len(flipped) // 3:len(flipped) // 3 + 64] = bytes(64)
    truncated.write_bytes(bytes(flipped))
    source = ShardSource(str(tmp_path / "cut-*.array_record"))
    first, last = source._ends[0], source._ends[1]
    with pytest.raises(ShardReadError, match=f"of shard {truncated}"):
        for index in range(first, last):
            source[index]
    assert main(["inspect", "--shards", str(tmp_path / "cut-*.array_record"), "--tokenizer",
                 str(demo_dir / "tokenizer.json")]) == 1
    output = capsys.readouterr().out
    assert "error: cannot read record" in output and f"of shard {truncated}" in output

    # A readable file whose records are not examples: training stops with the shard's name.
    foreign = tmp_path / "foreign-00000-of-00001.array_record"
    writer = ArrayRecordWriter(str(foreign), "group_size:1")
    writer.write(b"not an example")
    writer.close()
    iterator = make_batch_iterator(small_config(demo_dir, [str(foreign)]), tiny_config)
    with pytest.raises(ShardReadError, match=f"record 0 of shard {foreign} is corrupt: .*AFX1"):
        next(iterator)


def test_hosts_read_disjoint_parts_of_the_shards_that_together_cover_them(demo_dir, demo_shards):
    out, _ = demo_shards
    pattern = str(out / "train-*.array_record")
    parts = [{(shard, position) for shard, position, _ in manifest_records(
        small_config(demo_dir, [pattern], process_index=host, process_count=2, num_epochs=1))} for host in range(2)]
    everything = {(shard, position) for shard, position, _ in manifest_records(small_config(demo_dir, [pattern],
                                                                                       num_epochs=1))}
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == everything
    assert len(everything) == len(_lines(demo_dir / "train.jsonl"))
    assert all(len(part) == len(everything) // 2 for part in parts)


@pytest.mark.parametrize("num_workers", [0, 2])  # the 7B configs read with 8 grain worker processes
def test_restored_shard_iterator_continues_exactly(demo_dir, demo_shards, tiny_config, num_workers):
    out, _ = demo_shards
    config = small_config(demo_dir, [str(out / "train-*.array_record")], num_workers=num_workers)
    assert_restored_iterator_continues_exactly(config, tiny_config)


def test_inspect_reads_shards_as_it_reads_the_manifest(demo_dir, demo_shards, demo_tokenizer, tiny_config, capsys):
    from af_next_jax.data.__main__ import main
    from af_next_jax.data.inspection import inspect_manifest, inspect_shards

    out, _ = demo_shards
    pattern = str(out / "train-*.array_record")
    # seq_len 150 makes the longer examples problems, named by their manifest line.
    from_shards = inspect_shards(pattern, demo_tokenizer, tiny_config, seq_len=150)
    from_manifest = inspect_manifest(str(demo_dir / "train.jsonl"), demo_tokenizer, tiny_config, seq_len=150)
    assert from_shards.problems and from_shards.format() == from_manifest.format()
    code = main(["inspect", "--shards", pattern, "--tokenizer", str(demo_dir / "tokenizer.json")])
    assert code == 0 and f"lines: {len(_lines(demo_dir / 'train.jsonl'))}" in capsys.readouterr().out


def test_stored_audio_decodes_to_what_load_audio_returns(demo_dir, tmp_path, write_wav):
    from af_next_jax.data.audio import load_audio
    from af_next_jax.data.manifest import parse_line
    from af_next_jax.data.shard_format import decode_example, encode_example

    clip = str(demo_dir / json.loads(_lines(demo_dir / "train.jsonl")[0])["audio"][0]["path"])
    rng = np.random.default_rng(0)
    resampled = write_wav(tmp_path / "cd.wav", 0.3 * rng.standard_normal(44_100).astype(np.float32), 44_100)
    line = json.dumps({"id": "two", "audio": [{"path": clip, "start": 0.5, "end": 2.25}, resampled],
                       "conversation": [{"role": "user", "content": "<sound><sound>"},
                                        {"role": "assistant", "content": "The beep starts at 0.2s."}]})
    example = parse_line(line, str(tmp_path), 7)
    loaded = [load_audio(ref.path, ref.start, ref.end) for ref in example.audio]
    sizes = {}
    for encoding in ("int16", "flac"):
        record = encode_example(example, loaded, encoding, "m.jsonl", 7)
        decoded_example, decoded, header = decode_example(record)
        assert decoded_example == example and header["source"] == {"manifest": "m.jsonl", "line": 7}
        np.testing.assert_array_equal(decoded[0], loaded[0])  # a 16-bit 16 kHz source: bit-exact
        np.testing.assert_allclose(decoded[1], loaded[1], rtol=0, atol=0.5 / 32768)  # resampled: 16-bit rounding
        assert len(decoded[0]) == int(1.75 * 16_000)  # the span only; its timestamps stay relative to `start`
        sizes[encoding] = len(record)
    assert sizes["flac"] < sizes["int16"]


def test_data_sources_are_validated_with_clear_errors(demo_dir, tmp_path):
    from af_next_jax.data.shard_source import ShardReadError

    with pytest.raises(ValueError, match=r"a glob must name ArrayRecord shards \('DIR/train-\*\.array_record'\)"):
        small_config(demo_dir, [str(tmp_path / "*.jsonl")])
    with pytest.raises(ShardReadError, match=r"matches no file; build shards with"):
        manifest_records(small_config(demo_dir, [str(tmp_path / "nothing-*.array_record")]))


def test_training_imports_do_not_need_apache_beam():
    code = ("import sys; import af_next_jax.data, af_next_jax.data.pipeline, af_next_jax.data.shard_source, "
            "af_next_jax.data.inspection, af_next_jax.train.loop; print('apache_beam' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
