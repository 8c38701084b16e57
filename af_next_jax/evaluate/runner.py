"""Generate for every manifest example, score it by its task, write per-example rows, tabulate.

An example is the manifest line (docs/DATA.md) whose last assistant turn is the reference answer;
the prompt is the conversation before it, opened for the example's variant. Extra fields that
scorers read (`choices`, `answer`, `answer_seconds`, `events`, `scorer`) ride along on the line.
Nothing is dropped: an unparseable answer is wrong and listed; a line whose audio or schema is bad
gets a row with its `error` and is counted under `errors` in the table.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

from af_next_jax.data import audio as audio_lib
from af_next_jax.data.manifest import ManifestError, parse_line, read_lines
from af_next_jax.evaluate.scorers import SCORERS, scorers_for
from af_next_jax.inference.answer import Request, answer_requests
from af_next_jax.inference.decoding import generator_for
from af_next_jax.inference.loading import LoadedModel
from af_next_jax.inference.prompts import load_audio_input


@dataclasses.dataclass
class Pending:
    record: dict
    request: Request
    audios: list


def read_examples(manifest: str, config) -> tuple[list[Pending], list[dict]]:
    """(examples to generate for, rows of lines that cannot be evaluated)."""
    base_dir = os.path.dirname(os.path.abspath(manifest))
    pending, failed = [], []
    for number, line in enumerate(read_lines(manifest), 1):
        if not line.strip():
            continue
        try:
            example = parse_line(line, base_dir, number)
            turns = list(example.conversation)
            last = max(i for i, turn in enumerate(turns) if turn.role == "assistant")
            record = {**json.loads(line), "id": example.example_id, "task": example.task,
                      "variant": example.variant, "reference": turns[last].content}
            audios = [load_audio_input(ref, config) for ref in example.audio]
        except (ManifestError, audio_lib.AudioError) as error:
            failed.append({"id": f"line {number}", "line": number, "error": f"{error.reason}: {error}"})
            continue
        request = Request(example.audio, tuple(turns[:last]), example.variant)
        pending.append(Pending(record, request, audios))
    return pending, failed


def score_row(record: dict, prediction) -> dict:
    scores = {}
    for name in scorers_for(record):
        score = SCORERS[name](prediction.text, record)
        scores[name] = {"correct": score.correct, "parsed": score.parsed, **score.metrics,
                        **({"note": score.note} if score.note else {})}
    return {"id": record["id"], "task": record["task"], "variant": record["variant"],
            "prediction": prediction.text, "reference": record["reference"], "stopped": prediction.stopped,
            "scores": scores}


def evaluate(loaded: LoadedModel, manifest: str, *, batch_size: int = 4, max_new_tokens: int = 128,
             progress: bool = True, limit: int | None = None) -> list[dict]:
    from tqdm import tqdm

    pending, failed = read_examples(manifest, loaded.config)
    pending = pending[:limit] if limit is not None else pending
    generator = generator_for(loaded.config)
    rows = []
    with tqdm(total=len(pending), desc="evaluating", unit="example", disable=not progress) as bar:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start:start + batch_size]
            answers = answer_requests(loaded, generator, [p.request for p in chunk], max_new_tokens=max_new_tokens,
                                      audios=[p.audios for p in chunk])
            rows += [score_row(p.record, answer) for p, answer in zip(chunk, answers)]
            bar.update(len(chunk))
    return rows + failed


def summary_table(rows: list[dict]) -> str:
    """Per task and scorer: examples, accuracy, unparseable, mean of each metric; then errors."""
    groups = collections.defaultdict(list)
    for row in rows:
        for name, score in row.get("scores", {}).items():
            groups[(row["task"], name)].append(score)
    lines = [f"{'task':<16} {'scorer':<16} {'n':>4} {'accuracy':>9} {'unparsed':>9}  means"]
    for (task, name), scores in sorted(groups.items()):
        accuracy = sum(s["correct"] for s in scores) / len(scores)
        unparsed = sum(not s["parsed"] for s in scores)
        metric_names = sorted({k for s in scores for k, v in s.items()
                               if isinstance(v, float) and k not in ("correct", "parsed")})
        means = []
        for metric in metric_names:
            values = [s[metric] for s in scores if metric in s]
            means.append(f"{metric}={sum(values) / len(values):.3g}")
        lines.append(f"{task:<16} {name:<16} {len(scores):>4} {accuracy:>9.3f} {unparsed:>9}  {' '.join(means)}")
    errors = [row for row in rows if "error" in row]
    if errors:
        lines.append(f"errors (not evaluated, counted wrong): {len(errors)}")
    return "\n".join(lines)


def unparseable_list(rows: list[dict]) -> str:
    listed = []
    for row in rows:
        if "error" in row:
            listed.append(f"  {row['id']}: {row['error']}")
        for name, score in row.get("scores", {}).items():
            if not score["parsed"]:
                listed.append(f"  {row['id']} [{name}] {score.get('note', '')}: {row['prediction'][:80]!r}")
    return "\n".join(listed)
