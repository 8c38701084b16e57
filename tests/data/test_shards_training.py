"""The `make run` experiment trained from shards has the loss curve of the same run from the manifest
its shards were built from, step by step (reference: the session's debug run, tests/conftest.py)."""

import subprocess

from af_next_jax.train.metrics import read_metrics
from debug_run import REPO, TOTAL_STEPS, environment, train_command


def test_training_from_shards_gives_the_manifest_runs_losses_step_by_step(debug_run, tmp_path):
    from af_next_jax.data.build_shards import build_shards

    build_shards([f"{debug_run['demo_data']}/train.jsonl"], str(tmp_path / "shards"), num_shards=3)
    workdir = str(tmp_path / "from_shards")
    command = train_command(workdir, debug_run["demo_data"]) + [
        f"--config.data.train_manifests=('{tmp_path}/shards/train-*.array_record',)"]
    result = subprocess.run(command, cwd=REPO, env=environment(debug_run["cache_dir"]), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, from_shards = read_metrics(debug_run["workdir"]), read_metrics(workdir)
    assert sorted(from_shards) == sorted(reference) == list(range(1, TOTAL_STEPS + 1))
    for name in ("loss", "grad_norm", "data/examples"):
        assert [from_shards[step][name] for step in reference] == [reference[step][name] for step in reference], name
