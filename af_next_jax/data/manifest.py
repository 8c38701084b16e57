"""The JSONL manifest: one training example per line (schema in docs/DATA.md).

    {"id": "clip-0007",
     "audio": [{"path": "clips/0007.wav", "start": 0.0, "end": 8.5}],
     "conversation": [
       {"role": "system", "content": "You are a helpful audio assistant."},
       {"role": "user", "content": "<sound>\\nAt what time does the beep start?"},
       {"role": "assistant", "content": "<think>A 1 kHz tone rises at 2.4s.</think>The beep starts at 2.4s."}],
     "task": "timestamp_qa",
     "variant": "think"}

`audio` may also be a single path string or a list of path strings; relative paths resolve against
the manifest's folder. Every `<sound>` in the user turns stands for the next audio, in order.
"""

from __future__ import annotations

import dataclasses
import json
import os

AUDIO_PLACEHOLDER = "<sound>"
ROLES = ("system", "user", "assistant")
VARIANTS = ("instruct", "think", "captioner")

# Every reason an example can be skipped: the keys of the skip counters the trainer logs.
SKIP_REASONS = (
    "malformed_json",      # the line is not a JSON object
    "bad_schema",          # a field is missing or has the wrong type/value
    "no_assistant_turn",   # nothing to train on
    "placeholder_mismatch",  # number of <sound> placeholders != number of audios
    "missing_audio",       # the audio file does not exist
    "empty_audio",         # 0 bytes, 0 samples, or too short to give one encoder token
    "corrupt_audio",       # undecodable or truncated file
    "nan_audio",           # NaN or inf samples
    "bad_span",            # start/end outside the file
    "too_long",            # the tokenised example is longer than the packing length
    "too_many_windows",    # more windows than a row can hold (or its windows crowd one slice: data/packing.py)
)


class ManifestError(ValueError):
    """A manifest line that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class AudioRef:
    path: str
    start: float | None = None
    end: float | None = None


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class Example:
    """One parsed manifest line."""

    example_id: str
    audio: tuple[AudioRef, ...]
    conversation: tuple[Turn, ...]
    task: str
    variant: str


def read_lines(manifest_path: str) -> list[str]:
    """The raw lines of a manifest (blank lines kept, so list index + 1 is the line number)."""
    with open(manifest_path, encoding="utf-8") as manifest_file:
        return manifest_file.read().splitlines()


def parse_line(line: str, base_dir: str, line_number: int = 0) -> Example:
    """Parse and validate one manifest line; raises ManifestError naming the problem."""
    where = f"line {line_number}" if line_number else "manifest line"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ManifestError("malformed_json", f"{where}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ManifestError("malformed_json", f"{where}: expected a JSON object, got {type(record).__name__}")

    audio = tuple(_parse_audio(record.get("audio", []), base_dir, where))
    turns = record.get("conversation")
    if not isinstance(turns, list) or not turns:
        raise ManifestError("bad_schema", f"{where}: 'conversation' must be a non-empty list of "
                                          f"{{'role', 'content'}} objects, got {turns!r:.80}")
    conversation = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ManifestError("bad_schema", f"{where}: conversation[{index}] must be {{'role': one of {ROLES}, "
                                              f"'content': str}}, got {turn!r:.80}")
        conversation.append(Turn(turn["role"], turn["content"]))
    if not any(turn.role == "assistant" for turn in conversation):
        raise ManifestError("no_assistant_turn", f"{where}: the conversation has no assistant turn to train on")
    placeholders = sum(turn.content.count(AUDIO_PLACEHOLDER) for turn in conversation if turn.role == "user")
    stray = sum(turn.content.count(AUDIO_PLACEHOLDER) for turn in conversation if turn.role != "user")
    if placeholders != len(audio) or stray:
        raise ManifestError("placeholder_mismatch",
                            f"{where}: {len(audio)} audio(s) but {placeholders} '{AUDIO_PLACEHOLDER}' placeholders "
                            f"in user turns ({stray} in other turns); put one per audio in a user turn")
    variant = record.get("variant", "instruct")
    if variant not in VARIANTS:
        raise ManifestError("bad_schema", f"{where}: variant must be one of {VARIANTS}, got {variant!r}")
    for turn in conversation:
        if turn.role == "assistant" and turn.content.count("<think>") != turn.content.count("</think>"):
            raise ManifestError("bad_schema", f"{where}: an assistant turn has unbalanced <think>/</think> tags")
    if variant == "think" and not any("</think>" in turn.content for turn in conversation if turn.role == "assistant"):
        raise ManifestError("bad_schema", f"{where}: variant 'think' needs <think>...</think> reasoning in an "
                                          f"assistant turn; use variant 'instruct' for plain answers")
    task = record.get("task", "")
    if not isinstance(task, str):
        raise ManifestError("bad_schema", f"{where}: task must be a string, got {task!r}")
    return Example(example_id=str(record.get("id", line_number)), audio=audio,
                   conversation=tuple(conversation), task=task, variant=variant)


def _parse_audio(value, base_dir: str, where: str):
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list):
        raise ManifestError("bad_schema", f"{where}: 'audio' must be a path, an object or a list, got {value!r:.80}")
    for index, item in enumerate(items):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise ManifestError("bad_schema", f"{where}: audio[{index}] needs a string 'path', got {item!r:.80}")
        start, end = item.get("start"), item.get("end")
        for name, seconds in (("start", start), ("end", end)):
            if seconds is not None and (not isinstance(seconds, (int, float)) or seconds < 0):
                raise ManifestError("bad_schema", f"{where}: audio[{index}].{name} must be seconds >= 0, "
                                                  f"got {seconds!r}")
        if start is not None and end is not None and end <= start:
            raise ManifestError("bad_span", f"{where}: audio[{index}] end {end} <= start {start}")
        path = item["path"] if os.path.isabs(item["path"]) else os.path.join(base_dir, item["path"])
        yield AudioRef(path=path, start=start, end=end)
