"""`build-shards` on a full disk (af_next_jax/data/build_shards.py, disk_space.py; issue 26): the shard being
written is removed, no summary is written, and the build stops with one line naming the shard, its size
and the free space (exit status 2 from the command). A real small disk (tests/small_disk.py: a tmpfs,
skipped where mounting is not permitted) and an injected twin that always runs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from af_next_jax.data import shard_format
from af_next_jax.disk_space import DiskFull
from small_disk import small_disk

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_build_shards_on_a_full_disk_exits_2_naming_the_shard_and_leaves_no_partial_shard(demo_dir, tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    with small_disk(folder, "64k"):
        result = subprocess.run([sys.executable, "-m", "af_next_jax.data", "build-shards", "--manifest",
                                 str(demo_dir / "train.jsonl"), "--out", str(folder / "shards"), "--num-shards", "2"],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1].startswith("error: no space left on the filesystem of "
                                                                 f"{folder / 'shards'} to write shard train-0000")
        assert "MiB for it, " in result.stderr and "The partial shard was removed" in result.stderr
        assert os.listdir(folder / "shards") == []  # nothing half-written, no summary


def test_an_injected_full_disk_stops_the_build_with_one_clear_error(demo_dir, tmp_path, monkeypatch):
    from af_next_jax.data.build_shards import build_shards

    written = []

    def write_shard(path, records):
        if written:
            raise RuntimeError(f"write() failed: {os.strerror(errno.ENOSPC)}; writing {path}")  # as ArrayRecord
        written.append(path)

    monkeypatch.setattr(shard_format, "write_shard", write_shard)
    with pytest.raises(DiskFull) as full:
        build_shards([str(demo_dir / "train.jsonl")], str(tmp_path), num_shards=2)
    message = str(full.value)
    assert "\n" not in message and "[while running" not in message
    assert message.startswith(f"no space left on the filesystem of {tmp_path} to write shard train-0000")
    assert "for it, " in message and "free there now. The partial shard was removed" in message
    assert not (tmp_path / "build_summary.json").exists()
