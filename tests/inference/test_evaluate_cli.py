"""`python -m af_next_jax.evaluate` end to end on the tiny checkpoint (conftest.py): every manifest line
gets a row (bad audio included, as an error), the per-task table counts them, unparseable answers
are listed, and the predictions are the model's greedy answers."""

import json

from af_next_jax.evaluate.__main__ import main
from af_next_jax.inference.answer import answer_requests
from af_next_jax.inference.decoding import generator_for
from af_next_jax.inference.loading import load_model
from af_next_jax.evaluate.runner import read_examples


def line(example_id, audio, task, variant, question, reply, **extra):
    return json.dumps({"id": example_id, "audio": [audio], "task": task, "variant": variant, **extra,
                       "conversation": [{"role": "user", "content": f"<sound>\n{question}"},
                                        {"role": "assistant", "content": reply}]})


def test_evaluate_writes_a_row_per_line_and_a_table(checkpoint, tmp_path, capsys):
    manifest = tmp_path / "heldout.jsonl"
    manifest.write_text("\n".join([
        line("onset", str(checkpoint / "long.wav"), "beep_onset", "instruct", "When does the beep start?",
             "The beep starts at 2.4s."),
        line("order", str(checkpoint / "short.wav"), "order", "think", "Which comes first?",
             "<think>A tone from 1.0s to 2.0s.</think>The beep comes first."),
        line("mc", str(checkpoint / "short.wav"), "pitch", "instruct", "Low or high? (A) low (B) high", "high",
             choices=["low", "high"], answer="high"),
        line("broken", str(checkpoint / "missing.wav"), "beep_onset", "instruct", "When?", "At 1.0s."),
    ]) + "\n")
    out = tmp_path / "results.jsonl"
    assert main(["--checkpoint", str(checkpoint / "ckpt"), "--manifest", str(manifest), "--out", str(out),
                 "--max-new-tokens", "8", "--batch-size", "2", "--quiet"]) == 0
    rows = [json.loads(r) for r in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["line 4", "mc", "onset", "order"]
    by_id = {r["id"]: r for r in rows}
    assert set(by_id["order"]["scores"]) == {"text_match", "think_grounding"}
    assert set(by_id["onset"]["scores"]) == {"timestamp"} and set(by_id["mc"]["scores"]) == {"multiple_choice"}
    assert "missing_audio" in by_id["line 4"]["error"]
    assert by_id["order"]["prediction"].startswith("<think>")

    printed = capsys.readouterr().out
    assert "beep_onset" in printed and "errors (not evaluated, counted wrong): 1" in printed
    for row in rows:
        for name, score in row.get("scores", {}).items():
            if not score["parsed"]:
                assert f"{row['id']} [{name}]" in printed

    loaded = load_model(checkpoint=str(checkpoint / "ckpt"))
    pending, _ = read_examples(str(manifest), loaded.config)
    answers = answer_requests(loaded, generator_for(loaded.config), [p.request for p in pending], max_new_tokens=8)
    assert [a.text for a in answers] == [by_id[p.record["id"]]["prediction"] for p in pending]


def test_missing_manifest_is_a_one_line_error(checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(checkpoint / "ckpt"), "--manifest", str(tmp_path / "nope.jsonl"),
                 "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
