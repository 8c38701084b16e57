"""Times written in answers, parsed to seconds.

Styles seen in AF-Next outputs and our data: `2.4s`, `2.4 seconds`, `1:05` (m:ss), `1:02:03.5`,
`from 3.0s to 4.5s`, `3.0s to 4.5s`, `3.0-4.5s`, `10.7s to 16.9s`, `[11.0 - 14.0]`, `<t>0.0-0.066</t>`.
A bare number (`2.4`, `1 kHz`) is not a time: without a unit, a colon or brackets it could be
anything, and parsing it would let an answer full of numbers hit by chance.
"""

from __future__ import annotations

import dataclasses
import re

_NUMBER = r"\d+(?:\.\d+)?"
_CLOCK = r"\d+:\d{1,2}(?::\d{1,2})?(?:\.\d+)?"
_UNIT = r"\s*(?:s|sec|secs|second|seconds)\b"
# One time: a clock value, or a number with a seconds unit.
_TIME = rf"(?:{_CLOCK}|{_NUMBER}{_UNIT})"
# A number whose unit may come after the interval's end ("3.0-4.5s", "from 3.0 to 4.5 seconds").
_BOUND = rf"(?:{_CLOCK}|{_NUMBER}(?:{_UNIT})?)"
_INTERVAL = re.compile(
    rf"<t>\s*(?P<t0>{_NUMBER})\s*-\s*(?P<t1>{_NUMBER})\s*</t>"
    rf"|\[\s*(?P<b0>{_BOUND})\s*(?:-|–|to|,)\s*(?P<b1>{_BOUND})\s*\]"
    rf"|(?P<a0>{_BOUND})\s*(?:-|–|to|until|and)\s*(?P<a1>{_TIME})", re.IGNORECASE)
_POINT = re.compile(_TIME, re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Span:
    start: float
    end: float | None = None  # None: a point in time

    @property
    def is_interval(self) -> bool:
        return self.end is not None


def to_seconds(text: str) -> float:
    """'2.4s' -> 2.4, '1:05' -> 65.0, '1:02:03.5' -> 3723.5, '4.5' -> 4.5."""
    text = re.sub(_UNIT + "$", "", text.strip(), flags=re.IGNORECASE).strip()
    if ":" in text:
        seconds = 0.0
        for part in text.split(":"):
            seconds = seconds * 60 + float(part)
        return seconds
    return float(text)


def parse_spans(text: str) -> list[Span]:
    """Every interval and point time in `text`, in reading order (an interval's ends are not also points)."""
    spans: list[tuple[int, Span]] = []
    taken = []
    for match in _INTERVAL.finditer(text):
        groups = [g for g in match.groups() if g is not None]
        start, end = to_seconds(groups[0]), to_seconds(groups[1])
        if end < start:  # "from 5s to 3s" is not an interval; keep both as points
            continue
        spans.append((match.start(), Span(start, end)))
        taken.append(match.span())
    for match in _POINT.finditer(text):
        if any(lo <= match.start() < hi for lo, hi in taken):
            continue
        spans.append((match.start(), Span(to_seconds(match.group(0)))))
    return [span for _, span in sorted(spans, key=lambda item: item[0])]


def interval_iou(a: Span, b: Span) -> float:
    """Intersection over union of two intervals (0 when either is a point or they are disjoint)."""
    if not (a.is_interval and b.is_interval):
        return 0.0
    overlap = max(0.0, min(a.end, b.end) - max(a.start, b.start))
    union = max(a.end, b.end) - min(a.start, b.start)
    return overlap / union if union > 0 else float(a == b)
