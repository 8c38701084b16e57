"""Scorers: one function per answer kind, each `(prediction, example) -> Score`.

`example` is the manifest record (a dict): `reference` (the annotated assistant answer), plus what
a scorer needs (`choices`, `answer`, `events`). A prediction a scorer cannot read is wrong
(`correct=False`) and flagged `parsed=False` so the evaluator lists it; nothing is dropped.

  multiple_choice   MMAU / MMAU-Pro: choices in the question; answer matched by letter or by text
  timestamp         "2.4s", "1:05", "from 3.0s to 4.5s": abs error of the onset, within-tolerance
                    accuracy, interval IoU
  think_grounding   times cited inside <think> against the annotated event boundaries
  wer               word error rate (transcription)
  text_match        the normalised reference appears, in order, in the normalised prediction
"""

from __future__ import annotations

import dataclasses
import re
import string

from af_next_jax.evaluate.timestamps import Span, interval_iou, parse_spans

TIME_TOLERANCE_SECONDS = 0.5
LETTERS = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class Score:
    correct: bool
    parsed: bool = True
    metrics: dict = dataclasses.field(default_factory=dict)  # scorer-specific numbers (abs_error, iou, wer...)
    note: str = ""                                           # why it was not parsed, what was read


def normalise(text: str) -> str:
    text = text.lower().replace("<think>", " ").replace("</think>", " ")
    text = re.sub(r"[^\w\s.:]|(?<!\d)[.:]|[.:](?!\d)", " ", text)  # keep 2.4 and 1:05, drop sentence dots
    return " ".join(text.split())


def answer_part(prediction: str) -> str:
    """The text after a closed `</think>` (the whole prediction when there is no chain)."""
    return prediction.split("</think>", 1)[1] if "</think>" in prediction else prediction


# ---- multiple choice -------------------------------------------------------------------------------

_LETTER_PATTERNS = (
    r"^\s*\(?([A-Z])\)?\s*(?:[.):]|$)",                       # "B", "B.", "(B)", "B) high" at the start
    r"\(([A-Z])\)",                                           # "... (B) ..."
    r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\b",  # "the answer is B", "Option: C"
)


def _letters_named(text: str, count: int) -> set[int]:
    found = set()
    for pattern in _LETTER_PATTERNS:
        for match in re.finditer(pattern, text, flags=re.IGNORECASE if "answer" in pattern else 0):
            letter = match.group(1).upper()
            if LETTERS.index(letter) < count:
                found.add(LETTERS.index(letter))
    return found


def _choices_named(text: str, choices: list[str]) -> set[int]:
    said = f" {normalise(text)} "
    named = {i for i, choice in enumerate(choices) if normalise(choice) and f" {normalise(choice)} " in said}
    # "very high" also contains "high": a choice inside another named choice does not count.
    return {i for i in named if not any(j != i and normalise(choices[i]) in normalise(choices[j]) for j in named)}


def multiple_choice(prediction: str, example: dict) -> Score:
    choices = [str(c) for c in example["choices"]]
    answer = example["answer"]
    target = answer if isinstance(answer, int) else _answer_index(str(answer), choices)
    text = answer_part(prediction)
    letters, named = _letters_named(text, len(choices)), _choices_named(text, choices)
    candidates = letters | named if (letters and named) else (letters or named)
    if len(candidates) != 1:
        reason = "names no choice" if not candidates else f"names several choices {sorted(candidates)}"
        return Score(False, parsed=False, note=reason)
    (chosen,) = candidates
    return Score(chosen == target, metrics={"choice": chosen}, note=f"chose {LETTERS[chosen]}")


def _answer_index(answer: str, choices: list[str]) -> int:
    if len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:len(choices)]:
        return LETTERS.index(answer.strip().upper())
    for index, choice in enumerate(choices):
        if normalise(choice) == normalise(answer):
            return index
    raise ValueError(f"answer {answer!r} is not one of the choices {choices} (nor their letter)")


# ---- timestamps ------------------------------------------------------------------------------------

def reference_span(example: dict) -> Span:
    """The annotated time: `answer_seconds` ([start, end] or a number) or the first time of the reference."""
    if "answer_seconds" in example:
        value = example["answer_seconds"]
        return Span(float(value[0]), float(value[1])) if isinstance(value, (list, tuple)) else Span(float(value))
    spans = parse_spans(answer_part(example["reference"]))
    if not spans:
        raise ValueError(f"example {example.get('id')}: its reference {example['reference']!r} holds no time; "
                         f"add 'answer_seconds' or use another scorer")
    return spans[0]


def timestamp(prediction: str, example: dict, tolerance: float = TIME_TOLERANCE_SECONDS) -> Score:
    reference = reference_span(example)
    spans = parse_spans(answer_part(prediction))
    if not spans:
        return Score(False, parsed=False, note="no time in the answer")
    # Several different times in one answer is hedging ("2s or 5s"), not an answer.
    if len({(s.start, s.end) for s in spans}) > 1:
        return Score(False, parsed=False, note=f"several times {[(s.start, s.end) for s in spans]}")
    (span,) = spans[:1]
    error = abs(span.start - reference.start)
    metrics = {"abs_error": error}
    if reference.is_interval:
        metrics["iou"] = interval_iou(span, reference)
    correct = error <= tolerance and (not reference.is_interval or not span.is_interval
                                      or abs(span.end - reference.end) <= tolerance)
    return Score(correct, metrics=metrics, note=f"read {span.start:g}" + (f"-{span.end:g}" if span.is_interval else ""))


# ---- temporal chain-of-thought grounding ------------------------------------------------------------

def event_times(example: dict) -> list[float]:
    """Annotated event boundaries: `events` ({name: [start, end]} or [[start, end], ...]), else the
    times in the reference's <think> chain."""
    events = example.get("events")
    if events is not None:
        values = events.values() if isinstance(events, dict) else events
        times = []
        for value in values:
            span = value.get("span", value) if isinstance(value, dict) else value
            times += [float(t) for t in (span if isinstance(span, (list, tuple)) else [span])]
        return times
    chain = re.search(r"<think>(.*?)</think>", example["reference"], re.DOTALL)
    spans = parse_spans(chain.group(1)) if chain else []
    return [t for s in spans for t in ((s.start, s.end) if s.is_interval else (s.start,))]


def think_grounding(prediction: str, example: dict, tolerance: float = TIME_TOLERANCE_SECONDS) -> Score:
    """Precision (cited times near an annotated boundary), recall (boundaries cited), and their mean
    abs error; correct when every boundary is cited and every cited time is grounded."""
    annotated = event_times(example)
    chain = re.search(r"<think>(.*?)(?:</think>|$)", prediction, re.DOTALL)
    if chain is None:
        return Score(False, parsed=False, note="no <think> chain")
    cited = [t for s in parse_spans(chain.group(1)) for t in ((s.start, s.end) if s.is_interval else (s.start,))]
    if not cited:
        return Score(False, parsed=False, note="the <think> chain cites no time")
    nearest = [min(abs(t - a) for a in annotated) for t in cited] if annotated else [float("inf")] * len(cited)
    precision = sum(d <= tolerance for d in nearest) / len(cited)
    recall = (sum(any(abs(t - a) <= tolerance for t in cited) for a in annotated) / len(annotated)
              if annotated else 0.0)
    metrics = {"precision": precision, "recall": recall, "mean_abs_error": sum(nearest) / len(nearest)}
    return Score(precision == 1.0 and recall == 1.0, metrics=metrics, note=f"cited {cited}")


# ---- word error rate -------------------------------------------------------------------------------

def word_error_rate(hypothesis: str, reference: str) -> float:
    """(substitutions + insertions + deletions) / reference words, on normalised words."""
    hyp, ref = normalise(hypothesis).split(), normalise(reference).split()
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / max(len(ref), 1)


def wer(prediction: str, example: dict) -> Score:
    text = answer_part(prediction)
    value = word_error_rate(text, example["reference"])
    if not normalise(text):
        return Score(False, parsed=False, metrics={"wer": value}, note="empty transcript")
    return Score(value == 0.0, metrics={"wer": value})


# ---- plain text ------------------------------------------------------------------------------------

def text_match(prediction: str, example: dict) -> Score:
    reference = normalise(answer_part(example["reference"]))
    said = normalise(answer_part(prediction))
    if not said:
        return Score(False, parsed=False, note="empty answer")
    return Score(f" {reference} " in f" {said} ")


SCORERS = {"multiple_choice": multiple_choice, "timestamp": timestamp, "think_grounding": think_grounding,
           "wer": wer, "text_match": text_match}
TRANSCRIPTION_TASKS = ("asr", "transcription", "transcribe")
TIMESTAMP_TASK_HINTS = ("onset", "offset", "timestamp", "when", "grounding")


def scorers_for(example: dict) -> list[str]:
    """The scorers of an example: its `scorer` field, else chosen from its fields and task; a Think
    example is also scored for grounding when its reference cites times."""
    if "scorer" in example:
        names = [example["scorer"]] if isinstance(example["scorer"], str) else list(example["scorer"])
    elif "choices" in example:
        names = ["multiple_choice"]
    elif example.get("task", "") in TRANSCRIPTION_TASKS:
        names = ["wer"]
    elif any(hint in example.get("task", "") for hint in TIMESTAMP_TASK_HINTS):
        names = ["timestamp"]
    else:
        names = ["text_match"]
    if example.get("variant") == "think" and "think_grounding" not in names and event_times(example):
        names.append("think_grounding")
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"example {example.get('id')}: unknown scorer {unknown}; valid: {sorted(SCORERS)}")
    return names
