"""The grain pipeline: contract, host sharding, seeded shuffles, mixtures, resume determinism, skips."""

import json

import numpy as np
import pytest

from af_next_jax.batch import validate_batch
from af_next_jax.data.pipeline import (SkipThresholdExceeded, make_batch_iterator,
                                       manifest_records)
from pipeline_helpers import assert_restored_iterator_continues_exactly, assert_same_batches, small_config, take


def _config(demo_dir, **changes):
    return small_config(demo_dir, [str(demo_dir / "train.jsonl")], **changes)


def test_batches_follow_the_contract(demo_dir, tiny_config):
    iterator = make_batch_iterator(_config(demo_dir), tiny_config)
    for batch in take(iterator, 3):
        validate_batch(batch, tiny_config)
        assert batch["token_ids"].shape == (2, 512) and batch["mel_windows"].shape == (8, 128, 500)
        assert batch["loss_mask"].sum() > 0 and (batch["mel_valid_frames"] > 0).sum() > 0


def test_hosts_own_disjoint_shards_that_cover_the_manifest(demo_dir):
    shards = [list(manifest_records(_config(demo_dir, process_index=host, process_count=2, num_epochs=1)))
              for host in range(2)]
    lines = [set(number for _, number, _ in shard) for shard in shards]
    total = len(open(demo_dir / "train.jsonl").read().splitlines())
    assert lines[0].isdisjoint(lines[1]) and len(lines[0] | lines[1]) == total


def test_shuffle_is_seeded_and_reshuffled_each_epoch(demo_dir):
    def order(seed):
        records = manifest_records(_config(demo_dir, seed=seed, num_epochs=2))
        return [number for _, number, _ in records]

    first, again, other = order(3), order(3), order(4)
    half = len(first) // 2
    assert first == again and first != other
    assert sorted(first[:half]) == sorted(first[half:]) and first[:half] != first[half:]


def test_mixture_follows_weights(demo_dir, tmp_path):
    second = tmp_path / "other.jsonl"
    second.write_text(open(demo_dir / "heldout.jsonl").read().replace('"clips/', f'"{demo_dir}/clips/'))
    config = _config(demo_dir, manifests=(str(demo_dir / "train.jsonl"), str(second)), weights=(3.0, 1.0))
    records = manifest_records(config)
    sources = [records[index][0] for index in range(400)]
    assert sources.count(str(second)) == pytest.approx(100, abs=5)


# The 7B experiments read with 8 grain worker processes, whose state is per worker: 2 workers run in CI
# (~30 s of process start-up on a 2-core box).
@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_iterator_continues_exactly(demo_dir, tiny_config, num_workers):
    assert_restored_iterator_continues_exactly(_config(demo_dir, num_workers=num_workers), tiny_config)


def test_orbax_grain_handler_saves_and_restores_the_iterator(demo_dir, tiny_config, tmp_path):
    import grain
    from etils import epath

    iterator = make_batch_iterator(_config(demo_dir), tiny_config)
    take(iterator, 1)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(iterator))
    expected = take(iterator, 2)
    restored = handler.restore(epath.Path(tmp_path),
                               args=grain.checkpoint.CheckpointRestore(make_batch_iterator(_config(demo_dir),
                                                                                           tiny_config)))
    assert_same_batches(take(restored, 2), expected)


def _bad_manifest(demo_dir, tmp_path, write_wav):
    good = [json.loads(line) for line in open(demo_dir / "train.jsonl").read().splitlines()[:6]]
    for record in good:
        record["audio"][0]["path"] = str(demo_dir / record["audio"][0]["path"])

    def with_audio(path, **changes):
        return json.dumps({**good[0], "audio": [{"path": path}], **changes})

    bad_wav = tmp_path / "junk.wav"
    bad_wav.write_bytes(b"RIFF" + bytes(range(200)))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    import soundfile

    soundfile.write(str(tmp_path / "nan.wav"), np.full(8000, np.nan, np.float32), 16000, subtype="FLOAT")
    long_text = {**good[1], "conversation": good[1]["conversation"][:2]
                 + [{"role": "assistant", "content": "beep " * 600}]}
    lines = [json.dumps(record) for record in good] + [
        "{not json",
        with_audio(str(tmp_path / "missing.wav")),
        with_audio(str(empty)),
        with_audio(str(bad_wav)),
        with_audio(str(tmp_path / "nan.wav")),
        json.dumps({**good[2], "conversation": good[2]["conversation"][:2]}),
        json.dumps(long_text),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, {"malformed_json": 1, "missing_audio": 1, "empty_audio": 1, "corrupt_audio": 1, "nan_audio": 1,
                  "no_assistant_turn": 1, "too_long": 1}


def test_bad_input_is_skipped_and_counted_by_reason(demo_dir, tiny_config, tmp_path, write_wav):
    path, expected = _bad_manifest(demo_dir, tmp_path, write_wav)
    config = _config(demo_dir, manifests=(str(path),), num_epochs=1, skip_threshold=1.0, batch_size=4)
    iterator = make_batch_iterator(config, tiny_config)
    batches = list(iterator)
    assert sum(int(batch["segment_ids"].max(axis=1).sum()) for batch in batches) == 6
    counts = iterator.skip_counts()
    assert {reason: count for reason, count in counts.items() if count} == expected
    metrics = iterator.metrics()
    assert metrics["data/examples"] == 6 and metrics["data/skip_fraction"] == pytest.approx(7 / 13)


def test_skip_fraction_above_threshold_stops_with_a_summary(demo_dir, tiny_config, tmp_path, write_wav):
    path, _ = _bad_manifest(demo_dir, tmp_path, write_wav)
    config = _config(demo_dir, manifests=(str(path),), skip_threshold=0.2, skip_check_after=10, batch_size=4)
    iterator = make_batch_iterator(config, tiny_config)
    with pytest.raises(SkipThresholdExceeded, match=r"missing_audio: \d+.*inspect"):
        take(iterator, 20)


def test_inspect_reports_every_problem_with_its_line_number(demo_dir, tmp_path, write_wav, capsys):
    from af_next_jax.data.__main__ import main

    path, expected = _bad_manifest(demo_dir, tmp_path, write_wav)
    code = main(["inspect", "--manifest", str(path), "--tokenizer", str(demo_dir / "tokenizer.json"),
                 "--seq-len", "512"])
    output = capsys.readouterr().out
    assert code == 1
    assert "lines: 13  valid: 6  problems: 7" in output
    for line_number, reason in enumerate(["malformed_json", "missing_audio", "empty_audio", "corrupt_audio",
                                          "nan_audio", "no_assistant_turn", "too_long"], start=7):
        assert f"line {line_number}: [{reason}]" in output
    assert "tokens per example" in output


def test_audio_beyond_the_window_cap_is_truncated_and_counted(demo_dir, tiny_config):
    iterator = make_batch_iterator(_config(demo_dir, max_windows_per_audio=1, num_epochs=1), tiny_config)
    batches = list(iterator)
    assert all((batch["window_index"] == 0).all() for batch in batches)  # one window per audio kept
    events = json.load(open(demo_dir / "events.json"))
    records = [json.loads(line) for line in open(demo_dir / "train.jsonl")]
    longer_than_a_window = sum(events[record["audio"][0]["path"]]["duration"] > 5.0 for record in records)
    assert iterator.metrics()["data/truncated_audio"] == longer_than_a_window
    assert iterator.metrics()["data/truncated_audio"] > 0


def test_data_config_errors_say_what_to_change(demo_dir):
    with pytest.raises(ValueError, match="weights must be 1 positive numbers"):
        _config(demo_dir, weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="skip_threshold is a fraction"):
        _config(demo_dir, skip_threshold=5)


def test_two_audios_in_one_example_and_text_only_examples(demo_dir, tiny_config, tmp_path):
    events = json.load(open(demo_dir / "events.json"))
    long_clip = next(clip for clip, event in events.items() if event["duration"] > 5.0)
    short_clip = next(clip for clip, event in events.items() if event["duration"] <= 5.0)
    two_audio = {"audio": [str(demo_dir / long_clip), str(demo_dir / short_clip)],
                 "conversation": [{"role": "user", "content": "<sound> vs <sound>"},
                                  {"role": "assistant", "content": "The first is longer."}]}
    text_only = {"conversation": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(two_audio) + "\n" + json.dumps(text_only) + "\n")
    config = _config(demo_dir, manifests=(str(path),), num_epochs=1, shuffle=False, batch_size=1, seq_len=1024)
    batch = next(make_batch_iterator(config, tiny_config))
    validate_batch(batch, tiny_config)
    assert batch["segment_ids"].max() == 2
    assert batch["window_index"][:3].tolist() == [0, 1, 0]  # the index restarts for the second audio
    assert batch["mel_valid_frames"][3:].tolist() == [0] * 5


def _noise_manifest(tmp_path, write_wav, lines):
    """A manifest of one-audio lines: `lines` is a list of (seconds, audio-ref overrides) pairs."""
    rng = np.random.default_rng(0)
    records = []
    for index, (seconds, ref) in enumerate(lines):
        path = write_wav(tmp_path / f"noise_{index}.wav", 0.1 * rng.standard_normal(int(round(seconds * 16000))))
        records.append(json.dumps({"audio": [{"path": path, **ref}],
                                   "conversation": [{"role": "user", "content": f"<sound>clip {index}?"},
                                                    {"role": "assistant", "content": "noise"}]}))
    path = tmp_path / "noise.jsonl"
    path.write_text("\n".join(records) + "\n")
    return path


def test_last_window_too_short_for_an_encoder_token_is_dropped(demo_dir, tiny_config, tmp_path, write_wav):
    """10 s + 200 samples: two full 5 s windows and a 2-mel-frame tail (0 encoder tokens) that is dropped."""
    path = _noise_manifest(tmp_path, write_wav, [(10.0 + 200 / 16000, {}), (10.0 + 800 / 16000, {})])
    config = _config(demo_dir, manifests=(str(path),), num_epochs=1, shuffle=False, batch_size=2)
    batch = next(make_batch_iterator(config, tiny_config))
    validate_batch(batch, tiny_config)
    tokens_per_window = tiny_config.encoder.tokens_per_window
    frames = batch["mel_valid_frames"].tolist()
    # Each row owns 8 / 2 = 4 window slots. First example: the tail is dropped (2 windows); second: its
    # 5-frame tail keeps 1 token (3 windows).
    assert frames == [500, 500, 0, 0, 500, 500, 5, 0]
    assert batch["window_index"].tolist() == [0, 1, 0, 0, 0, 1, 2, 0]
    audio_per_row = (batch["token_ids"] == tiny_config.audio_token_id).sum(axis=1)
    assert audio_per_row.tolist() == [2 * tokens_per_window, 2 * tokens_per_window + 1]


def test_example_with_more_windows_than_a_batch_holds_is_skipped(demo_dir, tiny_config, tmp_path, write_wav):
    """max_windows_per_batch=2: a 3-window (12 s) audio can never be packed, a 2-window one can."""
    path = _noise_manifest(tmp_path, write_wav, [(12.0, {}), (8.0, {}), (3.0, {})])
    config = _config(demo_dir, manifests=(str(path),), num_epochs=1, shuffle=False, batch_size=1,
                     max_windows_per_batch=2, skip_threshold=1.0)
    iterator = make_batch_iterator(config, tiny_config)
    batches = list(iterator)
    assert {reason: count for reason, count in iterator.skip_counts().items() if count} == {"too_many_windows": 1}
    assert [batch["mel_valid_frames"].tolist() for batch in batches] == [[500, 300], [300, 0]]
    assert iterator.metrics()["data/examples"] == 2


def test_spans_outside_the_audio_are_skipped_as_bad_span(demo_dir, tiny_config, tmp_path, write_wav):
    """`end <= start` (caught when parsing) and a `start` past the end of the file (caught when reading)."""
    path = _noise_manifest(tmp_path, write_wav, [(3.0, {"start": 2.0, "end": 1.0}), (3.0, {"start": 4.0}),
                                                 (3.0, {"start": 1.0, "end": 2.5})])
    config = _config(demo_dir, manifests=(str(path),), num_epochs=1, shuffle=False, batch_size=1,
                     skip_threshold=1.0)
    iterator = make_batch_iterator(config, tiny_config)
    batches = list(iterator)
    assert {reason: count for reason, count in iterator.skip_counts().items() if count} == {"bad_span": 2}
    assert len(batches) == 1 and batches[0]["mel_valid_frames"][0] == 150  # the 1.5 s span that is valid


def test_inspect_counts_tokens_in_the_models_audio_layout(demo_dir, demo_tokenizer, tiny_config):
    """AF3 (no RoTE) has no <|sound_bos|>/<|sound_eos|>: two tokens fewer per audio, as training sees them."""
    from af_next_jax.data.inspection import inspect_manifest

    manifest = str(demo_dir / "heldout.jsonl")
    musicflamingo = inspect_manifest(manifest, demo_tokenizer, tiny_config)
    audioflamingo3 = inspect_manifest(manifest, demo_tokenizer, tiny_config.replace(rote=None))
    audios = [len(json.loads(line)["audio"]) for line in open(manifest).read().splitlines()]
    assert musicflamingo.valid == audioflamingo3.valid == len(audios) and min(audios) > 0
    assert [a - b for a, b in zip(musicflamingo.token_lengths, audioflamingo3.token_lengths)] == [2 * n for n in audios]


@pytest.mark.parametrize("family", ["musicflamingo", "audioflamingo3"])
def test_batches_carry_the_audio_markers_of_the_model_family(demo_dir, tiny_config, family):
    """The model config handed to make_batch_iterator (as the trainer hands it) decides the layout."""
    model_config = tiny_config if family == "musicflamingo" else tiny_config.replace(rote=None)
    batch = next(make_batch_iterator(_config(demo_dir), model_config))
    validate_batch(batch, model_config)
    markers = np.isin(batch["token_ids"], [model_config.audio_bos_token_id, model_config.audio_eos_token_id])
    assert (batch["token_ids"] == model_config.audio_token_id).any()
    if family == "musicflamingo":
        # Every run is wrapped: one <|sound_bos|> and one <|sound_eos|> per audio (one audio per demo example).
        assert markers.sum() == 2 * int(batch["segment_ids"].max(axis=1).sum())
    else:
        assert not markers.any()


def test_example_with_more_windows_than_a_row_holds_is_skipped_not_packed_alone(demo_dir, tiny_config, tmp_path,
                                                                                write_wav):
    """2 rows x 2 window slots: a 3-window (12 s) audio fits the batch's 4 windows but no row; it is
    counted as a skip, and no batch is left empty for it."""
    path = _noise_manifest(tmp_path, write_wav, [(3.0, {}), (12.0, {}), (3.0, {})])
    config = _config(demo_dir, manifests=(str(path),), num_epochs=1, shuffle=False, batch_size=2,
                     max_windows_per_batch=4, skip_threshold=1.0)
    iterator = make_batch_iterator(config, tiny_config)
    batches = list(iterator)
    assert {reason: count for reason, count in iterator.skip_counts().items() if count} == {"too_many_windows": 1}
    assert [batch["mel_valid_frames"].tolist() for batch in batches] == [[300, 300, 0, 0]]  # first fit: row 0
