"""Manifest schema: what parses, and the reason each malformed line is rejected with."""

import json

import pytest

from af_next_jax.data.manifest import ManifestError, parse_line

GOOD = {"id": "x", "audio": [{"path": "a.wav", "start": 1.0, "end": 2.0}], "task": "qa", "variant": "think",
        "conversation": [{"role": "user", "content": "<sound>\nWhen?"},
                         {"role": "assistant", "content": "<think>It starts at 1.2s.</think>At 1.2s."}]}


def test_good_line_parses_with_paths_resolved_against_the_manifest():
    example = parse_line(json.dumps(GOOD), "/data")
    assert example.audio[0].path == "/data/a.wav" and (example.audio[0].start, example.audio[0].end) == (1.0, 2.0)
    assert example.variant == "think" and example.conversation[1].role == "assistant"
    assert parse_line(json.dumps({**GOOD, "audio": "/abs/b.flac"}), "/data").audio[0].path == "/abs/b.flac"


@pytest.mark.parametrize("change,reason", [
    ({"conversation": []}, "bad_schema"),
    ({"conversation": [{"role": "robot", "content": "hi"}]}, "bad_schema"),
    ({"variant": "chatty"}, "bad_schema"),
    ({"audio": [{"path": "a.wav", "start": 3.0, "end": 2.0}]}, "bad_span"),
    ({"audio": []}, "placeholder_mismatch"),
    ({"conversation": [{"role": "user", "content": "<sound>"}]}, "no_assistant_turn"),
    ({"variant": "think", "conversation": [{"role": "user", "content": "<sound>"},
                                           {"role": "assistant", "content": "plain"}]}, "bad_schema"),
    ({"conversation": [{"role": "user", "content": "<sound>"},
                       {"role": "assistant", "content": "<think>open"}]}, "bad_schema"),
])
def test_malformed_lines_name_their_reason(change, reason):
    with pytest.raises(ManifestError) as error:
        parse_line(json.dumps({**GOOD, **change}), "/data", line_number=7)
    assert error.value.reason == reason and "line 7" in str(error.value)


def test_non_json_line_is_malformed_json():
    with pytest.raises(ManifestError) as error:
        parse_line('{"id": 1,', "/data")
    assert error.value.reason == "malformed_json"
