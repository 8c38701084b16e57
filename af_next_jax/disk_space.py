"""A write that ran out of disk space: recognised through whatever wraps it, reported in one line.

The writers we use report a full disk each in its own way: Python as OSError(ENOSPC or EDQUOT),
tensorstore (orbax's arrays) as ValueError("RESOURCE_EXHAUSTED: ... No space left on device
[os_error_code='28']"), ArrayRecord as RuntimeError("write() failed: No space left on device; ..."),
safetensors as its own error carrying the OS message; orbax's asynchronous saves re-raise it later from
another thread, and Beam re-raises a worker's error with its own text added. So `is_disk_full` walks
the whole chain (__cause__, __context__, exception groups) looking for the errno or its message.

A write site that sees one removes its partial output, keeps everything complete, and raises
`DiskFull` with one line saying what it was writing, where, how much that needs and how much is free
(`disk_full_error`). The commands report it as `error: ...` with exit status 2.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# The same conditions as text, for errors that carry only a message (tensorstore, ArrayRecord, Beam).
_FULL_TEXTS = tuple(os.strerror(code) for code in FULL_ERRNOS) + tuple(
    f"os_error_code='{code}'" for code in FULL_ERRNOS)


class DiskFull(OSError):
    """A write failed for lack of space or quota; the message says what, where, and how much it needs."""


def is_disk_full(error: BaseException | None) -> bool:
    """True if `error`, or anything it was raised from or during, is a full disk or an exceeded quota."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DiskFull) or (isinstance(current, OSError) and current.errno in FULL_ERRNOS):
            return True
        if any(text in str(current) for text in _FULL_TEXTS):
            return True
        pending += [current.__cause__, current.__context__, *getattr(current, "exceptions", ())]
    return False


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing parent); None for remote paths."""
    if "://" in str(path):
        return None
    candidate = Path(path).absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    try:
        return shutil.disk_usage(candidate).free
    except OSError:
        return None


def format_bytes(count: int | None) -> str:
    if count is None:
        return "an unknown amount"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def disk_full_error(what: str, where: str | os.PathLike, needed: str, aftermath: str) -> DiskFull:
    """The one-line DiskFull for a write of `what` into `where` that needs `needed` (a phrase: "about
    1.2 GiB"); `aftermath` says what was kept and removed, and how to go on."""
    return DiskFull(f"no space left on the filesystem of {where} to write {what}: it needs {needed}, "
                    f"{format_bytes(free_bytes(where))} is free there now. {aftermath}")
