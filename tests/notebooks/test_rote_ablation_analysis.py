"""The RoTE notebook's analysis on hand-made evaluator rows: per-window scores, and what the stated
onsets track (the closing note's claims rest on these numbers)."""

import numpy as np
import pytest

from af_next_jax.evaluate.runner import score_row
from af_next_jax.inference.answer import Answer
from af_next_jax.notebooks.rote_ablation import answer_tracking, per_window

# Onsets in windows 0-3 of clips of growing length (5 s windows).
ONSETS = [1.0, 2.0, 6.0, 8.0, 11.0, 12.0, 16.0, 17.5]
LENGTHS = [9.0, 14.0, 10.0, 19.0, 14.0, 19.0, 19.5, 18.0]


def _rows(answers: list[str]) -> tuple[list[dict], dict]:
    rows, truth = [], {}
    for index, (answer, onset, length) in enumerate(zip(answers, ONSETS, LENGTHS)):
        record = {"id": f"q{index}", "task": "beep_onset", "variant": "instruct",
                  "reference": f"The beep starts at {onset}s."}
        rows.append(score_row(record, Answer(text=answer, think=None, answer=answer, num_tokens=8, stopped=True)))
        truth[f"q{index}"] = {"onset": onset, "window": int(onset // 5), "clip_windows": 4, "clip_seconds": length}
    return rows, truth


def test_per_window_counts_unparseable_answers_as_wrong_and_averages_parsed_errors():
    answers = ["The beep starts at 1.2s.", "no idea", "At 6.0s.", "At 9.0s.", "At 11.0s.", "At 13.0s.",
               "at 16.1s", "hmm"]
    rows, truth = _rows(answers)
    table = {row["window"]: row for row in per_window(rows, truth)}
    assert [table[w]["n"] for w in range(4)] == [2, 2, 2, 2]
    assert table[0]["accuracy"] == 0.5 and table[0]["unparsed"] == 1 and table[0]["mean_abs_error"] == pytest.approx(0.2)
    assert table[1]["accuracy"] == 0.5 and table[1]["mean_abs_error"] == pytest.approx(0.5)
    assert table[3]["unparsed"] == 1 and table[3]["mean_abs_error"] == pytest.approx(0.1)


def test_answers_that_follow_the_clip_length_correlate_with_the_onset_only_through_it():
    """Answering from the clip's length alone: r with the onset is high, but nothing is left once the
    length is accounted for; answers built from the onset keep r = 1 after the length is removed."""
    tracking = answer_tracking(*_rows([f"The beep starts at {0.6 * length:.1f}s." for length in LENGTHS]))
    assert tracking["r_clip_length"] == pytest.approx(1.0) and tracking["r_onset"] > 0.7
    assert np.isnan(tracking["r_onset_given_length"])
    tracking = answer_tracking(*_rows([f"The beep starts at {onset + 0.5 * length:.2f}s."
                                       for onset, length in zip(ONSETS, LENGTHS)]))
    assert tracking["r_onset_given_length"] == pytest.approx(1.0)
    tracking = answer_tracking(*_rows([f"The beep starts at {onset}s." for onset in ONSETS]))
    assert tracking["r_onset"] == pytest.approx(1.0) and tracking["distinct_answers"] == len(ONSETS)
    assert tracking["mean_answer_per_window"] == {0: 1.5, 1: 7.0, 2: 11.5, 3: 16.75}


def test_a_constant_or_unparseable_answer_tracks_nothing():
    tracking = answer_tracking(*_rows(["At 6.2s."] * len(ONSETS)))
    assert tracking["distinct_answers"] == 1 and np.isnan(tracking["r_onset"])
    tracking = answer_tracking(*_rows(["no idea"] * len(ONSETS)))
    assert tracking["parsed"] == 0 and tracking["mean_answer_per_window"] == {}
    assert all(np.isnan(tracking[name]) for name in ("r_onset", "r_clip_length", "r_onset_given_length"))
