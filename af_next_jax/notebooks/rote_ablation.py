"""The RoTE ablation of notebooks/rote_ablation.ipynb: data, training runs, evaluation, statistics.

The tiny model of `make run` (experiments/debug.py) trains on long demo clips (make-demo
`--long-clip-windows`: events in any of up to W windows) with RoTE and with `config.model.rote = None`
(the Audio Flamingo 3 architecture), for several seeds, with the same data, seeds and steps in both
arms, through the project's trainer. Every checkpoint is asked the validation onset questions by the
project's evaluator; the one with the lowest validation onset error answers the test questions, and
the answers are scored per position of the event's window in its clip.

Uncertainty (`mean_interval`): a number is averaged over seeds, and it varies both with the training
seed and with the test questions drawn; its interval adds the two parts.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ONSET_TASKS = ("beep_onset", "noise_onset")
EVENT_OF_TASK = {"beep_onset": "beep", "noise_onset": "noise"}


# ---- data ------------------------------------------------------------------------------------------

def make_long_demo(out_dir: str, train_clips: int, heldout_clips: int, windows: int = 3) -> dict:
    from af_next_jax.data.demo import make_demo

    return make_demo(out_dir, train_clips, heldout_clips, seed=0, long_clip_windows=windows)


def _is_onset_question(record: dict) -> bool:
    return record["task"] in ONSET_TASKS and record["variant"] == "instruct"


def onset_training_manifest(data_dir: str, name: str = "train_onsets.jsonl") -> str:
    """make-demo's training lines restricted to the two onset questions (beep, noise burst), in the
    demo's shuffled order; returns `name` (written in `data_dir`, where the config's paths start)."""
    lines = [line for line in open(os.path.join(data_dir, "train.jsonl"), encoding="utf-8")
             if line.strip() and _is_onset_question(json.loads(line))]
    with open(os.path.join(data_dir, name), "w", encoding="utf-8") as manifest:
        manifest.write("".join(lines))
    return name


def heldout_clips(data_dir: str, validation_clips: int) -> dict[str, list[str]]:
    """The held-out clips split by number: the first `validation_clips` choose the checkpoint, the rest
    (test) are only scored once, with the chosen checkpoint."""
    events = json.load(open(os.path.join(data_dir, "events.json")))
    clips = sorted(clip for clip in events if os.path.basename(clip).startswith("heldout_"))
    if not 0 < validation_clips < len(clips):
        raise ValueError(f"validation_clips must leave test clips: got {validation_clips} of {len(clips)} held-out clips")
    return {"validation": clips[:validation_clips], "test": clips[validation_clips:]}


def onset_manifest(data_dir: str, out_path: str, clips: list[str] | None = None) -> dict[str, dict]:
    """The held-out instruct onset questions (of `clips`, default all) as their own manifest;
    {id: its event's onset, window, clip windows and length}.

    Lines are ordered by the clip's window count: evaluation batches then share their shapes, and the
    generator compiles once per shape for every checkpoint of an arm instead of once per batch.
    """
    events = json.load(open(os.path.join(data_dir, "events.json")))
    wanted = set(clips) if clips is not None else None
    lines, truth = [], {}
    for line in open(os.path.join(data_dir, "heldout.jsonl")):
        record = json.loads(line)
        clip = record["audio"][0]["path"]
        if not _is_onset_question(record) or (wanted is not None and clip not in wanted):
            continue
        event = events[clip]
        onset = event[EVENT_OF_TASK[record["task"]]][0]
        record["audio"] = [{"path": os.path.join(data_dir, clip)}]
        lines.append((event["windows"], record["id"], json.dumps(record)))
        truth[record["id"]] = {"onset": onset, "window": int(onset // event["window_seconds"]),
                               "window_seconds": event["window_seconds"], "clip_windows": event["windows"],
                               "clip_seconds": event["duration"]}
    with open(out_path, "w", encoding="utf-8") as manifest:
        manifest.write("\n".join(line for *_, line in sorted(lines)) + "\n")
    return truth


# ---- training and evaluation -----------------------------------------------------------------------

def ablation_config(data_dir: str, *, rote: bool, seed: int, steps: int, seq_len: int, windows_per_row: int,
                    train_manifest: str, heldout_manifest: str, checkpoint_every: int, eval_every: int,
                    eval_batches: int, batch_size: int = 4):
    """experiments/debug.py as `make run` trains it, on the long clips, with or without RoTE.

    Changed from debug: the data (manifests, rows long enough for a whole clip, `windows_per_row`
    window slots per row), the run length, checkpoints kept at every `checkpoint_every` steps (each is
    scored on the validation questions), and the seed, which sets both the initialisation
    (`seed`) and the data order (`data.seed`). Model and optimizer are debug's, identical in both arms.
    """
    from af_next_jax.experiment import apply_override, load_config

    config = load_config(os.path.join(REPO, "experiments", "debug.py"))
    for override in (f"data.dir={data_dir}", f"data.train_manifests=('{train_manifest}',)",
                     f"data.heldout_manifest={heldout_manifest}", f"data.seq_len={seq_len}",
                     f"data.batch_size={batch_size}", f"data.max_windows_per_batch={windows_per_row * batch_size}",
                     f"data.seed={seed}", f"seed={seed}", f"total_steps={steps}", f"eval_every={eval_every}",
                     f"eval_batches={eval_batches}", f"checkpoint_every={checkpoint_every}",
                     f"keep_checkpoints={steps // checkpoint_every + 1}", f"log_every={max(1, steps // 10)}",
                     f"optimizer.warmup_steps={max(1, min(10, steps // 10))}"):
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


def evaluate_checkpoint(workdir: str, manifest: str, *, step: int | None, max_new_tokens: int,
                        batch_size: int = 16) -> list[dict]:
    """The evaluator's rows for the checkpoint of `step` (None: the run's final export)."""
    from af_next_jax.evaluate.runner import evaluate
    from af_next_jax.inference.loading import load_model

    return evaluate(load_model(checkpoint=workdir, step=step), manifest, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, progress=False)


def select_checkpoint(error_by_step: dict[int, float]) -> int:
    """The step with the lowest validation error (the earliest on a tie: no credit for training on)."""
    finite = {step: error for step, error in error_by_step.items() if math.isfinite(error)}
    if not finite:
        raise ValueError(f"no checkpoint has a finite validation error: {error_by_step}")
    return min(sorted(finite), key=lambda step: finite[step])


# ---- per-question values ---------------------------------------------------------------------------

def stated_onset(row: dict) -> float:
    """The time the timestamp scorer read (the answer's first time), NaN when it read none."""
    from af_next_jax.evaluate.scorers import answer_part
    from af_next_jax.evaluate.timestamps import parse_spans

    if not row["scores"]["timestamp"]["parsed"]:
        return float("nan")
    return parse_spans(answer_part(row["prediction"]))[0].start


def question_values(rows: list[dict], truth: dict[str, dict], ids: list[str]) -> dict[str, np.ndarray]:
    """Per question of `ids` (in that order): `correct` (within the evaluator's tolerance; 0 when
    unparsed), `abs_error` (NaN when unparsed), `stated`, and the stated time split at the window
    boundaries: `window_correct` (the stated time falls in the event's window; 0 when unparsed) and
    `within_error` (the error modulo the window length: how far the stated time's place in its window
    is from the onset's place in its own, the shorter way round; NaN when unparsed): a model that knows
    where the event sits in a window but not which window it is gets `within_error` ~ 0 and
    `window_correct` at chance."""
    by_id = {row["id"]: row for row in rows}
    missing = [question for question in ids if question not in by_id]
    if missing:
        raise KeyError(f"{len(missing)} questions have no evaluator row, e.g. {missing[:3]}")
    values = collections.defaultdict(list)
    for question in ids:
        row, item = by_id[question], truth[question]
        score, stated = row["scores"]["timestamp"], stated_onset(by_id[question])
        seconds = item["window_seconds"]
        values["correct"].append(float(score["correct"]))
        values["abs_error"].append(score["abs_error"] if score["parsed"] else float("nan"))
        values["stated"].append(stated)
        values["window_correct"].append(float(math.isfinite(stated) and int(stated // seconds) == item["window"]))
        values["within_error"].append(_modulo_window_error(stated, item["onset"], seconds))
    return {name: np.asarray(value, dtype=np.float64) for name, value in values.items()}


def _modulo_window_error(stated: float, onset: float, window_seconds: float) -> float:
    if not math.isfinite(stated):
        return float("nan")
    difference = abs(stated - onset) % window_seconds
    return min(difference, window_seconds - difference)


def constant_answer(data_dir: str) -> float:
    """The training set's median onset: the answer of a model that ignores the audio."""
    events = json.load(open(os.path.join(data_dir, "events.json")))
    return float(np.median([event[kind][0] for clip, event in events.items()
                            if os.path.basename(clip).startswith("train_") for kind in ("beep", "noise")]))


def length_only_windows(data_dir: str) -> dict[int, int]:
    """{clip windows: the event window most frequent in training clips of that many windows}: the best
    guess of the window from the clip's length alone (which every model hears)."""
    events = json.load(open(os.path.join(data_dir, "events.json")))
    counts = collections.defaultdict(collections.Counter)
    for clip, event in events.items():
        if os.path.basename(clip).startswith("train_"):
            for kind in ("beep", "noise"):
                counts[event["windows"]][int(event[kind][0] // event["window_seconds"])] += 1
    # most_common breaks ties by first insertion; sort first so the guess does not depend on clip order.
    return {windows: min(counter, key=lambda w: (-counter[w], w)) for windows, counter in sorted(counts.items())}


def baseline_values(data_dir: str, truth: dict[str, dict], ids: list[str], tolerance: float) -> dict[str, np.ndarray]:
    """`question_values`' fields for the constant answer, plus `length_window_correct`: the
    length-only window guess (`length_only_windows`) is the event's window."""
    guess, by_length = constant_answer(data_dir), length_only_windows(data_dir)
    items = [truth[question] for question in ids]
    errors = np.array([abs(guess - item["onset"]) for item in items])
    return {"correct": (errors <= tolerance).astype(np.float64), "abs_error": errors,
            "stated": np.full(len(items), guess),
            "window_correct": np.array([float(int(guess // item["window_seconds"]) == item["window"]) for item in items]),
            "within_error": np.array([_modulo_window_error(guess, item["onset"], item["window_seconds"])
                                      for item in items]),
            "length_window_correct": np.array([float(by_length.get(item["clip_windows"], 0) == item["window"])
                                               for item in items])}


# ---- uncertainty -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over seeds with its two-sided confidence interval; `seeds`: each seed's own mean."""

    mean: float
    low: float
    high: float
    seeds: tuple[float, ...]
    questions: int
    df: float

    def excludes(self, value: float) -> bool:
        return not self.low <= value <= self.high

    def format(self, digits: int = 2) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def mean_interval(values_SxQ, confidence: float = 0.95, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """Mean over seeds (rows) of each seed's mean over questions (columns; NaN = no value), with a
    `confidence` interval for the mean a new set of seeds and of questions would give.

    The variance of that mean has a seed part (the seeds' means scatter: s_seeds^2 / S) and a question
    part (the test questions are a sample: the variance of the seed-averaged per-question values / Q);
    their sum over-counts the seed-by-question noise a little. Student's t with Welch-Satterthwaite
    degrees of freedom: with 3 seeds and a dominant seed part, t ~ 4.3, not 1.96. Simulated with 3
    seeds and 60-200 questions (tests/notebooks), a 95% interval holds the true mean 92-97% of the
    time, least when the two parts are about equal: read a difference near an interval's edge with care.
    One row means a deterministic predictor (a baseline): no seed part. `bounds`: the values the mean
    can take (0..1 for an accuracy); the interval is cut to them (t intervals know no bounds).
    """
    from scipy import stats

    values_SxQ = np.atleast_2d(np.asarray(values_SxQ, dtype=np.float64))
    answered_SxQ = np.isfinite(values_SxQ)
    seeds_S = np.array([row[ok].mean() if ok.any() else np.nan for row, ok in zip(values_SxQ, answered_SxQ)])
    seeds_S = seeds_S[np.isfinite(seeds_S)]
    columns = answered_SxQ.any(axis=0)
    per_question_Q = np.array([values_SxQ[answered_SxQ[:, q], q].mean() for q in np.flatnonzero(columns)])
    if seeds_S.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), (), 0, float("nan"))
    mean = float(seeds_S.mean())
    count_S, count_Q = seeds_S.size, per_question_Q.size
    seed_part = seeds_S.var(ddof=1) / count_S if count_S > 1 else 0.0
    question_part = per_question_Q.var(ddof=1) / count_Q if count_Q > 1 else 0.0
    if values_SxQ.shape[0] > 1 and count_S < 2:
        seed_part = float("inf")  # several seeds asked for, fewer than 2 answered: no interval
    variance = seed_part + question_part
    if variance == 0.0:
        return Interval(mean, mean, mean, tuple(seeds_S.tolist()), count_Q, float("inf"))
    # Welch-Satterthwaite: each part weighted by its own degrees of freedom.
    denominator = ((seed_part ** 2 / (count_S - 1) if count_S > 1 else 0.0)
                   + (question_part ** 2 / (count_Q - 1) if count_Q > 1 else 0.0))
    df = variance ** 2 / denominator if denominator > 0 else float("inf")
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(variance) if math.isfinite(variance) else float("inf")
    low, high = max(mean - half, bounds[0]), min(mean + half, bounds[1])
    return Interval(mean, low, high, tuple(seeds_S.tolist()), count_Q, float(df))


def paired_effect(first_SxQ, second_SxQ, confidence: float = 0.95,
                  bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """first - second, paired by seed (same initial key and data order) and by question; a pair with
    a missing value on either side is left out."""
    return mean_interval(np.asarray(first_SxQ, np.float64) - np.asarray(second_SxQ, np.float64), confidence, bounds)


def by_window(values_SxQ, windows_Q, confidence: float = 0.95,
              bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict[int, Interval]:
    """`mean_interval` of the questions of each window position, in window order."""
    values_SxQ, windows_Q = np.atleast_2d(np.asarray(values_SxQ, np.float64)), np.asarray(windows_Q)
    if values_SxQ.shape[1] != windows_Q.size:
        raise ValueError(f"{values_SxQ.shape[1]} questions but {windows_Q.size} window positions")
    return {int(w): mean_interval(values_SxQ[:, windows_Q == w], confidence, bounds) for w in np.unique(windows_Q)}


# ---- what the answers track ------------------------------------------------------------------------

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
    parsed = [(row, truth[row["id"]]) for row in rows if row["scores"]["timestamp"]["parsed"]]
    stated = np.array([stated_onset(row) for row, _ in parsed])
    onsets = np.array([item["onset"] for _, item in parsed])
    lengths = np.array([item["clip_seconds"] for _, item in parsed])
    by_window_position = collections.defaultdict(list)
    for value, (_, item) in zip(stated, parsed):
        by_window_position[item["window"]].append(value)
    return {"parsed": len(parsed), "distinct_answers": len(set(stated.tolist())),
            "r_onset": _correlation(stated, onsets), "r_clip_length": _correlation(stated, lengths),
            "r_onset_given_length": _partial_correlation(stated, onsets, lengths),
            "mean_answer_per_window": {w: float(np.mean(v)) for w, v in sorted(by_window_position.items())}}


# ---- what the audio embeddings carry ---------------------------------------------------------------

def linear_probe_r2(train_X: np.ndarray, train_y: np.ndarray, test_X: np.ndarray, test_y: np.ndarray,
                    ridge: float = 1e-2) -> float:
    """R^2 on the test rows of a ridge regression fitted on the training rows (features standardised
    with the training statistics); 1 = the target is a linear function of the features, <= 0 = none."""
    mean, scale = train_X.mean(axis=0), train_X.std(axis=0) + 1e-6
    design = np.c_[(train_X - mean) / scale, np.ones(len(train_X))]
    test_design = np.c_[(test_X - mean) / scale, np.ones(len(test_X))]
    weights = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ train_y)
    residual = test_y - test_design @ weights
    return float(1.0 - np.mean(residual ** 2) / test_y.var())


def token_targets(window_seconds: float, token_seconds: float, tokens_per_window: list[int], event: dict) -> np.ndarray:
    """Per audio token of one clip (windows in order): [absolute time, window index, time in the window,
    inside the beep, inside the noise burst]."""
    rows = []
    for window, tokens in enumerate(tokens_per_window):
        for token in range(tokens):
            seconds = window * window_seconds + token * token_seconds
            rows.append([seconds, window, token * token_seconds,
                         event["beep"][0] <= seconds < event["beep"][1], event["noise"][0] <= seconds < event["noise"][1]])
    return np.asarray(rows, dtype=np.float64)


PROBE_TARGETS = ("absolute time", "window index", "time in the window", "inside the beep", "inside the noise burst")


def audio_embedding_probe(workdir: str, data_dir: str, train_clips: list[str], test_clips: list[str],
                          step: int | None = None) -> dict[str, float]:
    """Linear-probe R^2 of each of PROBE_TARGETS from the trained model's audio embeddings (encoder,
    RoTE when the model has it, projector: what the decoder receives in the `<sound>` slots), fitted on
    `train_clips`' tokens and scored on `test_clips`'. What the decoder can read off a token without
    looking at its neighbours or its place in the sequence."""
    import jax

    from af_next_jax.config import MEL_FRAMES_PER_AUDIO_TOKEN, MEL_HOP_LENGTH, SAMPLE_RATE
    from af_next_jax.inference.loading import load_model
    from af_next_jax.inference.prompts import load_audio_input
    from af_next_jax.model.af_next import AFNextModel

    # One encoder token per MEL_FRAMES_PER_AUDIO_TOKEN mel frames of MEL_HOP_LENGTH samples (40 ms).
    token_seconds = MEL_FRAMES_PER_AUDIO_TOKEN * MEL_HOP_LENGTH / SAMPLE_RATE
    loaded = load_model(checkpoint=workdir, step=step)
    config = loaded.config
    model = AFNextModel(config)
    encode = jax.jit(lambda params, mel, frames, index: model.apply(
        params, mel, frames, index, method=AFNextModel.encode_audio_windows))
    events = json.load(open(os.path.join(data_dir, "events.json")))

    def tokens_of(clips: list[str]) -> tuple[np.ndarray, np.ndarray]:
        features, targets = [], []
        for clip in clips:
            audio = load_audio_input(os.path.join(data_dir, clip), config)
            embeddings_NxTxD, valid_NxT = (np.asarray(x) for x in encode(
                loaded.params, audio.mel_WxMxT, audio.valid_frames_W, audio.window_index_W))
            counts = valid_NxT.sum(axis=1).tolist()
            features.append(np.concatenate([e[:n] for e, n in zip(embeddings_NxTxD, counts)]))
            targets.append(token_targets(config.encoder.window_seconds, token_seconds, counts, events[clip]))
        return np.concatenate(features), np.concatenate(targets)

    train_X, train_Y = tokens_of(train_clips)
    test_X, test_Y = tokens_of(test_clips)
    return {name: linear_probe_r2(train_X, train_Y[:, k], test_X, test_Y[:, k]) for k, name in enumerate(PROBE_TARGETS)}
