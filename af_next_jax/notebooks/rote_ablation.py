"""The RoTE ablation of notebooks/rote_ablation.ipynb: data, the two training runs, their evaluation.

The tiny model of `make run` (experiments/debug.py) trains twice on long demo clips (make-demo
`--long-clip-windows`: events in any of up to 4 windows), with RoTE and with `config.model.rote = None`
(the Audio Flamingo 3 architecture), with the same seeds, data and steps, through the project's
trainer. Both are then asked the held-out onset questions by the project's evaluator, and the
answers are scored per position of the event's window in its clip.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONSET_TASKS = ("beep_onset", "noise_onset")
EVENT_OF_TASK = {"beep_onset": "beep", "noise_onset": "noise"}


def make_long_demo(out_dir: str, train_clips: int, heldout_clips: int, windows: int = 4) -> dict:
    from af_next_jax.data.demo import make_demo

    return make_demo(out_dir, train_clips, heldout_clips, seed=0, long_clip_windows=windows)


def ablation_config(data_dir: str, *, rote: bool, steps: int, seq_len: int, batch_size: int = 4,
                    eval_every: int = 0):
    """experiments/debug.py as `make run` trains it, on the long clips, with or without RoTE.

    Only the data, the run length and the row length change (a 4-window clip is 500 audio tokens,
    more than debug's 384-token rows); seeds, model and optimizer are debug's, identical in both arms.
    """
    from af_next_jax.experiment import apply_override, load_config

    config = load_config(os.path.join(REPO, "experiments", "debug.py"))
    for override in (f"data.dir={data_dir}", f"data.seq_len={seq_len}", f"data.batch_size={batch_size}",
                     f"data.max_windows_per_batch={4 * batch_size}", f"total_steps={steps}",
                     f"eval_every={eval_every}", f"checkpoint_every={steps}", "keep_checkpoints=1",
                     f"log_every={max(1, steps // 10)}", f"optimizer.warmup_steps={max(1, min(10, steps // 10))}"):
        apply_override(config, override)
    if not rote:
        config.model.rote = None  # the switch documented in experiment/settings.py: model_config_from
    return config


def train_arm(config, workdir: str):
    """The project's trainer (`python -m af_next_jax.train` in-process; resumes a finished workdir)."""
    from af_next_jax.train.loop import train

    return train(config, workdir)


def loss_curves(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
    from af_next_jax.train.metrics import read_metrics

    curves = {}
    for kind in ("train", "eval"):
        records = read_metrics(workdir, kind) if os.path.isfile(os.path.join(workdir, "metrics.jsonl")) else {}
        steps = sorted(records)
        curves[kind] = (steps, [records[step]["loss"] for step in steps])
    return curves


def onset_manifest(data_dir: str, out_path: str) -> dict[str, dict]:
    """The held-out instruct onset questions as their own manifest; {id: its event's onset and window}."""
    events = json.load(open(os.path.join(data_dir, "events.json")))
    lines, truth = [], {}
    for line in open(os.path.join(data_dir, "heldout.jsonl")):
        record = json.loads(line)
        if record["task"] not in ONSET_TASKS or record["variant"] != "instruct":
            continue
        clip = record["audio"][0]["path"]
        event = events[clip]
        onset = event[EVENT_OF_TASK[record["task"]]][0]
        record["audio"] = [{"path": os.path.join(data_dir, clip)}]
        lines.append(json.dumps(record))
        truth[record["id"]] = {"onset": onset, "window": int(onset // event["window_seconds"]),
                               "clip_windows": event["windows"], "clip_seconds": event["duration"]}
    with open(out_path, "w", encoding="utf-8") as manifest:
        manifest.write("\n".join(lines) + "\n")
    return truth


def evaluate_arm(workdir: str, manifest: str, max_new_tokens: int) -> list[dict]:
    from af_next_jax.evaluate.runner import evaluate
    from af_next_jax.inference.loading import load_model

    return evaluate(load_model(checkpoint=workdir), manifest, batch_size=8, max_new_tokens=max_new_tokens,
                    progress=False)


def per_window(rows: list[dict], truth: dict[str, dict]) -> list[dict]:
    """Per window position of the event: examples, accuracy (within the evaluator's tolerance),
    unparseable answers (counted wrong), mean abs onset error over the parsed answers."""
    groups = collections.defaultdict(list)
    for row in rows:
        groups[truth[row["id"]]["window"]].append(row["scores"]["timestamp"])
    table = []
    for window in sorted(groups):
        scores = groups[window]
        errors = [s["abs_error"] for s in scores if s["parsed"]]
        table.append({"window": window, "n": len(scores), "accuracy": float(np.mean([s["correct"] for s in scores])),
                      "unparsed": sum(not s["parsed"] for s in scores),
                      "mean_abs_error": float(np.mean(errors)) if errors else float("nan")})
    return table


def constant_answer_baseline(data_dir: str, truth: dict[str, dict], tolerance: float) -> list[dict]:
    """What answering every onset question with the training set's median onset scores, per window:
    the floor a model that ignores the audio reaches."""
    events = json.load(open(os.path.join(data_dir, "events.json")))
    train_onsets = [event[kind][0] for clip, event in events.items() if os.path.basename(clip).startswith("train_")
                    for kind in ("beep", "noise")]
    guess = float(np.median(train_onsets))
    groups = collections.defaultdict(list)
    for item in truth.values():
        groups[item["window"]].append(abs(guess - item["onset"]))
    return [{"window": w, "n": len(errors), "accuracy": float(np.mean([e <= tolerance for e in errors])),
             "mean_abs_error": float(np.mean(errors)), "guess": guess} for w, errors in sorted(groups.items())]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; NaN when either side does not vary (beyond float rounding of its values)."""
    def varies(values: np.ndarray) -> bool:
        return values.size > 1 and values.std() > 1e-9 * (1.0 + np.abs(values).max())

    return float(np.corrcoef(a, b)[0, 1]) if varies(a) and varies(b) else float("nan")


def _partial_correlation(x: np.ndarray, y: np.ndarray, control: np.ndarray) -> float:
    """Correlation of x and y once a linear fit on `control` is removed from both (NaN when x is a
    linear function of `control`: nothing is left to correlate)."""
    if control.size < 3:
        return float("nan")
    design = np.stack([np.ones_like(control), control], axis=1)

    def residual(values: np.ndarray) -> np.ndarray:
        return values - design @ np.linalg.lstsq(design, values, rcond=None)[0]

    return _correlation(residual(x), residual(y))


def answer_tracking(rows: list[dict], truth: dict[str, dict]) -> dict:
    """What the stated onsets follow: how many distinct answers, their correlation with the true onset,
    with the clip's length, and with the onset once the clip's length is accounted for (a model can
    place late events late just by hearing a long clip); the mean answer per window position."""
    from af_next_jax.evaluate.scorers import answer_part
    from af_next_jax.evaluate.timestamps import parse_spans

    parsed = [(row, truth[row["id"]]) for row in rows if row["scores"]["timestamp"]["parsed"]]
    # The time the timestamp scorer read: the first span of the answer.
    stated = np.array([parse_spans(answer_part(row["prediction"]))[0].start for row, _ in parsed])
    onsets = np.array([item["onset"] for _, item in parsed])
    lengths = np.array([item["clip_seconds"] for _, item in parsed])
    by_window = collections.defaultdict(list)
    for value, (_, item) in zip(stated, parsed):
        by_window[item["window"]].append(value)
    return {"parsed": len(parsed), "distinct_answers": len(set(stated.tolist())),
            "r_onset": _correlation(stated, onsets), "r_clip_length": _correlation(stated, lengths),
            "r_onset_given_length": _partial_correlation(stated, onsets, lengths),
            "mean_answer_per_window": {w: float(np.mean(v)) for w, v in sorted(by_window.items())}}
