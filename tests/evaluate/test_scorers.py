"""Each scorer on hand-written answers: right, wrong, unparseable and adversarial ones."""

import pytest

from af_next_jax.evaluate import scorers
from af_next_jax.evaluate.timestamps import Span, interval_iou, parse_spans

MC = {"id": "q1", "choices": ["low", "high", "very high", "none of these"], "answer": "high",
      "reference": "high", "task": "pitch"}


@pytest.mark.parametrize("prediction", ["B", "(B)", "B) high", "The answer is B.", "The beep is high pitched.",
                                        "<think>It rises to 2 kHz.</think>High."])
def test_multiple_choice_reads_letter_or_text(prediction):
    score = scorers.multiple_choice(prediction, MC)
    assert score.correct and score.parsed, score


@pytest.mark.parametrize("prediction", ["C", "It is very high.", "(D)"])
def test_multiple_choice_wrong_choice_is_wrong_but_parsed(prediction):
    score = scorers.multiple_choice(prediction, MC)
    assert not score.correct and score.parsed, score


@pytest.mark.parametrize("prediction", ["", "I cannot tell.", "A, B, C or D", "low or high", "(A) or (B)",
                                        "B) low"])
def test_multiple_choice_unparseable_or_hedged_counts_wrong(prediction):
    score = scorers.multiple_choice(prediction, MC)
    assert not score.correct and not score.parsed, score


def test_multiple_choice_answer_given_as_letter():
    assert scorers.multiple_choice("high", {**MC, "answer": "B"}).correct


@pytest.mark.parametrize("text,spans", [
    ("The beep starts at 2.4s.", [Span(2.4)]), ("at 1:05", [Span(65.0)]), ("1:02:03.5", [Span(3723.5)]),
    ("from 3.0s to 4.5s", [Span(3.0, 4.5)]), ("3.0-4.5s", [Span(3.0, 4.5)]), ("[11.0 - 14.0]", [Span(11.0, 14.0)]),
    ("<t>0.0-0.066</t>", [Span(0.0, 0.066)]), ("10.7s to 16.9s", [Span(10.7, 16.9)]),
    ("a 1 kHz tone", []), ("2.4", []), ("from 5s to 3s", [Span(5.0), Span(3.0)]),
])
def test_timestamps_parse(text, spans):
    assert parse_spans(text) == spans


def test_interval_iou():
    assert interval_iou(Span(0, 2), Span(1, 3)) == pytest.approx(1 / 3)
    assert interval_iou(Span(0, 1), Span(2, 3)) == 0.0
    assert interval_iou(Span(1.0), Span(0, 2)) == 0.0


ONSET = {"id": "t", "reference": "The beep starts at 2.4s.", "task": "beep_onset"}


@pytest.mark.parametrize("prediction,correct,error", [
    ("The beep starts at 2.4s.", True, 0.0), ("It starts at 2.8 seconds", True, 0.4),
    ("At 0:03.5", False, 1.1), ("<think>A tone at 9.0s.</think>The beep starts at 2.5s.", True, 0.1)])
def test_timestamp_error_and_tolerance(prediction, correct, error):
    score = scorers.timestamp(prediction, ONSET)
    assert score.parsed and score.correct == correct and score.metrics["abs_error"] == pytest.approx(error)


@pytest.mark.parametrize("prediction", ["", "The beep starts early.", "2.4", "2.4s or 5.0s or 8.0s"])
def test_timestamp_unparseable_or_hedged_counts_wrong(prediction):
    score = scorers.timestamp(prediction, ONSET)
    assert not score.correct and not score.parsed


def test_timestamp_interval_iou():
    example = {"id": "i", "reference": "From 3.0s to 5.0s.", "task": "event_timestamp"}
    score = scorers.timestamp("[3.2 - 5.2]", example)
    assert score.correct and score.metrics["iou"] == pytest.approx(1.8 / 2.2)
    assert not scorers.timestamp("from 3.0s to 9.0s", example).correct


THINK = {"id": "k", "variant": "think", "task": "order",
         "reference": "<think>A tone plays from 1.0s to 2.0s; a noise burst runs from 4.0s to 4.5s.</think>The beep."}


def test_think_grounding_scores_cited_times_against_events():
    perfect = scorers.think_grounding("<think>tone 1.0s to 2.1s, noise 4.0s to 4.5s</think>x", THINK)
    assert perfect.correct and perfect.metrics["precision"] == 1.0 and perfect.metrics["recall"] == 1.0
    half = scorers.think_grounding("<think>tone from 1.0s to 2.0s, then 9.0s</think>x", THINK)
    assert not half.correct and half.metrics["precision"] == pytest.approx(2 / 3)
    assert half.metrics["recall"] == pytest.approx(2 / 4)


def test_think_grounding_uses_an_events_field_when_given():
    example = {**THINK, "events": {"beep": [1.0, 2.0], "noise": [4.0, 4.5]}}
    assert scorers.event_times(example) == [1.0, 2.0, 4.0, 4.5]


@pytest.mark.parametrize("prediction", ["The beep.", "<think>it is loud</think>The beep."])
def test_think_grounding_without_a_chain_or_times_is_unparseable(prediction):
    score = scorers.think_grounding(prediction, THINK)
    assert not score.correct and not score.parsed


def test_word_error_rate():
    assert scorers.word_error_rate("the cat sat", "The cat sat.") == 0.0
    assert scorers.word_error_rate("the cat", "the cat sat") == pytest.approx(1 / 3)          # deletion
    assert scorers.word_error_rate("a the cat sat", "the cat sat") == pytest.approx(1 / 3)    # insertion
    assert scorers.word_error_rate("the dog sat", "the cat sat") == pytest.approx(1 / 3)      # substitution
    assert scorers.word_error_rate("sat cat the", "the cat sat") == pytest.approx(2 / 3)      # order matters
    empty = scorers.wer("", {"reference": "the cat sat"})
    assert not empty.parsed and empty.metrics["wer"] == 1.0


def test_text_match_keeps_word_order():
    example = {"reference": "The beep comes first, then the noise burst."}
    assert scorers.text_match("the beep comes first then the noise burst", example).correct
    assert not scorers.text_match("The noise burst comes first, then the beep.", example).correct
    assert not scorers.text_match("", example).parsed


def test_scorer_choice():
    assert scorers.scorers_for(MC) == ["multiple_choice"]
    assert scorers.scorers_for(ONSET) == ["timestamp"]
    assert scorers.scorers_for({**ONSET, "task": "asr"}) == ["wer"]
    assert scorers.scorers_for(THINK) == ["text_match", "think_grounding"]
    with pytest.raises(ValueError, match="unknown scorer"):
        scorers.scorers_for({**ONSET, "scorer": "bleu"})
