"""A real full disk for tests: a tmpfs of a few MB mounted on a test's folder (needs root, or CAP_SYS_ADMIN).

Where mounting is not permitted (an unprivileged CI runner, a container without the capability) the
tests that need it skip, saying so; each of them has an injected-failure twin that always runs.
"""

from __future__ import annotations

import contextlib
import subprocess

import pytest


def _mount(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *arguments], capture_output=True, text=True)


@contextlib.contextmanager
def small_disk(folder, size: str):
    """Mount a tmpfs of `size` ("6m", "512k") on the existing `folder` for the block; skips if not permitted."""
    try:
        mounted = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    except FileNotFoundError:
        pytest.skip("no `mount` command here: cannot make a small disk (the injected-failure tests still run)")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): the injected-failure tests still run")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def resize(folder, size: str) -> None:
    """Free space the way an operator would: the same disk, bigger (files kept)."""
    resized = _mount("-o", f"remount,size={size}", str(folder))
    assert resized.returncode == 0, resized.stderr
