"""One writer at a time for a directory: a hold file naming the holder, refreshed while it works.

A training run holds its workdir (workdir.py) for as long as it runs, all processes of a multi-host
job together (process 0 holds it for the job); `convert to-hf --out` holds its output. A second
writer stops before writing anything, with an error naming the holder (host, process, job, start
time) and what to do. A holder that died does not block forever: a hold is stale when its process
is gone (same host) or it has not been refreshed for `STALE_SECONDS` (another host: a lost node),
and the next writer takes it over, saying so.

The hold is a JSON file created with O_EXCL (atomic on local and NFS v3+ filesystems); a takeover
first renames the stale file away, which only one contender can do.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 20.0
STALE_SECONDS = 120.0


class DirectoryHeld(RuntimeError):
    """Another live writer holds the directory."""


def _identity(purpose: str) -> dict:
    job = {name: os.environ[name] for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "JOB_ID", "TPU_WORKER_ID")
           if name in os.environ}
    return {"purpose": purpose, "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "job": job}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def describe(holder: dict) -> str:
    job = ", ".join(f"{k}={v}" for k, v in holder.get("job", {}).items())
    return (f"{holder.get('purpose', 'a writer')} (host {holder.get('host')}, pid {holder.get('pid')}"
            f"{', ' + job if job else ''}, started {holder.get('started')})")


class Hold:
    """`with Hold(path, purpose): ...` holds `path` (a hold file) for the block; see the module docstring.
    `target` is what the hold protects, as the refusal names it (default: the folder of the hold file)."""

    def __init__(self, path: str | os.PathLike, purpose: str, *, stale_seconds: float = STALE_SECONDS,
                 refresh_seconds: float = REFRESH_SECONDS, target: str | os.PathLike | None = None):
        self.path = Path(path)
        self.target = Path(target) if target is not None else self.path.parent
        self.purpose = purpose
        self.stale_seconds, self.refresh_seconds = stale_seconds, refresh_seconds
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self.took_over: dict | None = None      # the stale holder this hold replaced, if any

    def __enter__(self) -> "Hold":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        identity = _identity(self.purpose)
        for _ in range(3):  # a contender may rename a stale hold between our checks: look again
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue
                stale = self._stale_reason(holder)
                if stale is None:
                    raise DirectoryHeld(
                        f"{self.target} is in use by {describe(holder)}. Wait for it to finish or stop it; "
                        f"a run that died is taken over automatically once its hold ({self.path}) is "
                        f"{int(self.stale_seconds)} s stale. Or use another directory.")
                with contextlib.suppress(FileNotFoundError):  # only one contender wins this rename
                    aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                    os.rename(self.path, aside)
                    os.unlink(aside)
                    self.took_over = holder
                    logger.warning("took over %s from %s: %s", self.target, describe(holder), stale)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(identity, handle)
            self._identity = identity
            self._refresher = threading.Thread(target=self._refresh, name="af-next-hold", daemon=True)
            self._refresher.start()
            return
        raise DirectoryHeld(f"could not take {self.path}: other writers keep replacing it")

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            # Written but not yet filled (its creator is between open and write), or truncated by a crash:
            # the file's age tells which.
            return {"purpose": "an unknown writer (unreadable hold file)", "host": None, "pid": None,
                    "started": None}

    def _stale_reason(self, holder: dict) -> str | None:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not _process_alive(holder["pid"]):
                return f"its process {holder['pid']} on this host is gone"
            return None
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was released"
        if age > self.stale_seconds:
            return f"not refreshed for {age:.0f} s (its host stopped)"
        return None

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                if json.loads(self.path.read_text()) == self._identity:  # never remove a successor's hold
                    self.path.unlink()
