"""`python -m af_next_jax.generate` and `python -m af_next_jax.evaluate` as a user runs them, in
subprocesses, on the workdir of the `make run` experiment (experiments/debug.py trained on make-demo
data for a few steps: the session's `debug_run`, tests/conftest.py)."""

import json
import os
import subprocess
import sys

import pytest

from debug_run import REPO, environment

QUESTION = "At what time does the beep start?"


def _run(args: list[str], debug_run) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=environment(debug_run["cache_dir"]),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def heldout_clip(debug_run):
    return os.path.join(debug_run["demo_data"], "clips", "heldout_000.wav")


def test_generate_answers_from_the_trained_workdir(debug_run, heldout_clip):
    """Exit 0 and the printed answer is the trained model's greedy answer, decoded in-process."""
    from af_next_jax.data.demo import SYSTEM_PROMPT
    from af_next_jax.inference.answer import Request, answer_requests
    from af_next_jax.inference.decoding import generator_for
    from af_next_jax.inference.loading import load_model
    from af_next_jax.inference.prompts import prompt_turns

    result = _run(["af_next_jax.generate", "--checkpoint", debug_run["workdir"], "--audio", heldout_clip,
                   "--prompt", QUESTION, "--max-new-tokens", "24"], debug_run)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = load_model(checkpoint=debug_run["workdir"])
    request = Request((heldout_clip,), tuple(prompt_turns(QUESTION, 1, variant="instruct", system=SYSTEM_PROMPT)))
    (expected,) = answer_requests(loaded, generator_for(loaded.config), [request], max_new_tokens=24)
    assert expected.answer.strip() and result.stdout.strip() == expected.answer.strip()


def test_evaluate_prints_the_per_task_table_on_the_heldout_set(debug_run, tmp_path):
    out = tmp_path / "results.jsonl"
    manifest = os.path.join(debug_run["demo_data"], "heldout.jsonl")
    result = _run(["af_next_jax.evaluate", "--checkpoint", debug_run["workdir"], "--manifest", manifest,
                   "--out", str(out), "--limit", "7", "--max-new-tokens", "32", "--quiet"], debug_run)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    examples = [json.loads(line) for line in open(manifest)][:7]
    assert [row["id"] for row in rows] == [example["id"] for example in examples]
    table = result.stdout.splitlines()
    assert table[0].split()[:5] == ["task", "scorer", "n", "accuracy", "unparsed"]
    # One table line per (task, scorer) pair the rows were scored by, with its example count.
    pairs = {(row["task"], name) for row in rows for name in row["scores"]}
    for task, scorer in pairs:
        count = sum(row["task"] == task and scorer in row["scores"] for row in rows)
        assert any(line.split()[:3] == [task, scorer, str(count)] for line in table), (task, scorer, table)
