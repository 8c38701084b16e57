"""Checkpoints of a run: orbax `CheckpointManager` under WORKDIR/checkpoints/STEP/{state,data} (workdir.py).

`state` is the TrainState (params, optimizer state, step, RNG, non-finite counters) as a dict of
arrays; `data` is JSON: the input pipeline's positions (`iterators`: every data shard once, merged
over the processes; the per-process states of injected iterators; `iterator` repeats the first), so
a resumed run reads exactly the batches the uninterrupted run would have read. Saves are asynchronous (training continues while the arrays are
written); orbax writes into a temporary folder and renames it when complete, so a run killed
mid-save leaves no step that looks finished. With several processes every process writes its own
shards of the arrays (orbax multi-host); process 0 writes the metadata and the JSON.
`keep` bounds how many steps stay on disk (the oldest go first).

A full disk (or quota) during a save (disk_space.py): the partial step (`N.orbax-checkpoint-tmp*`) is
removed, every complete step stays, and `DiskFull` says which step needed how much where. Saves are
asynchronous, so the failure surfaces at the next `save`, `wait` or `close`; all processes learn it
there together (a collective) and stop. Running the same command after freeing space resumes from the
last complete step.

Restoring walks the steps from newest to oldest and tells three failures apart:

  unreadable   a step whose files are truncated, missing or fail their checksum (tensorstore
               DATA_LOSS / OUT_OF_RANGE / NOT_FOUND, undecodable JSON, missing metadata): it is moved
               to WORKDIR/corrupt_checkpoints/ with a warning naming it, and the previous step is tried.
  mismatch     a readable step that does not fit this experiment (another model shape, stage or
               optimizer: a different state tree, shape or dtype). Detected from the checkpoint's
               metadata *before* any array is read; the run stops with `CheckpointMismatchError`
               naming the first differing leaves and what to do. Nothing is moved.
  I/O failure  permission denied, an unavailable or failing filesystem: retried `io_retries` times
               with a growing pause, then the run stops with `CheckpointIOError`. Nothing is moved.

Anything else (a bug) propagates unchanged and moves nothing. With several processes every
decision is collective: each process reports what it saw and the most severe outcome wins, so all
processes restore, fall back to, or stop at the same step; only process 0 moves files.

Arrays are restored straight into the shardings of the current mesh, which may differ from the mesh
that saved them (another device or process count).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

from af_next_jax.disk_space import DiskFull, disk_full_error, format_bytes, is_disk_full
from af_next_jax.train import multihost
from af_next_jax.train.host_data import merged_positions
from af_next_jax.workdir import DATA_ITEM, STATE_ITEM, Workdir

logger = logging.getLogger(__name__)

# Outcomes of reading one step on one process, by severity (the most severe over all processes wins).
OK, UNREADABLE, IO_FAILED, MISMATCH, ERROR = range(5)
_OUTCOME_NAMES = {OK: "ok", UNREADABLE: "unreadable", IO_FAILED: "I/O failure", MISMATCH: "mismatch",
                  ERROR: "error"}
# tensorstore reports errors as ValueError("STATUS: ..."); these statuses mean the bytes are bad or absent.
_UNREADABLE_STATUSES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")
_IO_STATUSES = ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                "UNKNOWN", "INTERNAL", "CANCELLED", "UNAUTHENTICATED", "FAILED_PRECONDITION")


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not fit this experiment's state (tree, shapes or dtypes)."""


class CheckpointIOError(OSError):
    """Reading (or setting aside) a checkpoint failed with I/O errors, also after retrying."""


class _Unreadable(Exception):
    """Raised inside this module for a step whose files are proven bad (never escapes)."""


def classify_error(error: BaseException) -> int:
    """UNREADABLE, IO_FAILED, MISMATCH or ERROR (not a checkpoint problem) for an exception raised by a read."""
    if isinstance(error, _Unreadable):
        return UNREADABLE
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError, NotADirectoryError)):
        return UNREADABLE
    if isinstance(error, OSError):  # PermissionError, EIO, ESTALE, ETIMEDOUT, EROFS, ...
        return IO_FAILED
    if isinstance(error, KeyError) and ("not found in the checkpoint" in str(error) or "Unknown key" in str(error)):
        return UNREADABLE  # an item folder (state/ or data/) is missing
    if isinstance(error, ValueError):
        message = str(error).lstrip()
        status = message.split(":", 1)[0].strip()
        if status in _UNREADABLE_STATUSES:
            return UNREADABLE
        if status in _IO_STATUSES or "OS error" in message or "Permission denied" in message:
            return IO_FAILED
        if "tree structures do not match" in message:
            return MISMATCH
    return ERROR


def _leaf_paths(tree) -> dict[str, object]:
    """{"a/b/c": leaf} of a tree as orbax stores it (tuples as lists, named tuples as dicts, ...)."""
    flat = ocp.tree.to_flat_dict(tree)
    return {"/".join(str(key) for key in path): leaf for path, leaf in flat.items()}


def _describe(leaf) -> str:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    if shape is None:
        return type(leaf).__name__
    return f"{tuple(shape)} {getattr(dtype, 'name', dtype)}"


def state_differences(saved_metadata, abstract_state) -> list[str]:
    """Human-readable differences between a checkpoint's state metadata and the expected state tree
    (parameters first); empty when they fit."""
    saved = {path: leaf for path, leaf in _leaf_paths(saved_metadata).items() if hasattr(leaf, "shape")}
    expected = {path: leaf for path, leaf in _leaf_paths(ocp.tree.serialize_tree(abstract_state,
                                                                                   keep_empty_nodes=True)).items()
                if hasattr(leaf, "shape")}
    differences = []
    for path, leaf in expected.items():
        if path not in saved:
            differences.append(f"{path}: {_describe(leaf)} in this experiment, absent from the checkpoint")
        elif tuple(saved[path].shape) != tuple(leaf.shape) or (
                saved[path].dtype is not None and jax.numpy.dtype(saved[path].dtype) != jax.numpy.dtype(leaf.dtype)):
            differences.append(f"{path}: checkpoint {_describe(saved[path])}, this experiment {_describe(leaf)}")
    differences += [f"{path}: {_describe(leaf)} in the checkpoint, absent from this experiment"
                    for path, leaf in saved.items() if path not in expected]
    # Parameters first: they say what changed in the model; the optimizer state only follows them.
    return sorted(differences, key=lambda line: not line.startswith("params/"))


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True,
                 io_retries: int = 3, retry_seconds: float = 2.0):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self.io_retries = io_retries
        self.retry_seconds = retry_seconds
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: ocp.JsonCheckpointHandler()})
        self._saved = set(self._manager.all_steps())
        self._state_bytes = 0  # of the last state saved: what a step needs on disk (before compression)
        self._corrupt_dir = Workdir(os.path.dirname(self.directory)).corrupt_checkpoints

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def due(self, step: int) -> bool:
        return bool(self.save_every) and step % self.save_every == 0 and step not in self._saved

    def save(self, step: int, state: dict, data_state: bytes | None, *, force: bool = False) -> bool:
        """Start saving (asynchronously) if `step` is due or `force`; True if a save started.

        A collective with several processes: every process calls it at every step, with its own
        iterator state; the states of all processes are gathered into the step's `data` JSON, each
        data shard once (host_data.merged_positions: the members of a row group must agree).
        """
        if step in self._saved or not (force or self.due(step)):
            return False
        states = merged_positions(multihost.allgather_bytes(data_state if data_state is not None else b""))
        iterators = [state.decode() if state else None for state in states]
        data = {"iterator": iterators[0], "iterators": iterators, "processes": jax.process_count()}
        self._state_bytes = sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(state))
        self._stop_if_disk_full(lambda: self._manager.save(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: ocp.args.JsonSave(data)}), force=True))
        self._saved.add(step)
        return True

    # ---------------------------------------------------------------- a full disk

    def _stop_if_disk_full(self, action) -> None:
        """Run `action` (a manager call that may report a failed asynchronous save); on a full disk on
        any process, remove the partial step and raise DiskFull on every process (a collective)."""
        failure = None
        try:
            action()
        except Exception as error:  # noqa: BLE001 -- only a full disk is handled; anything else re-raised
            if not is_disk_full(error):
                raise
            failure = error
        if not multihost.agree_any(failure is not None):
            return
        partial = self._remove_partial_steps()
        complete = [int(name) for name in os.listdir(self.directory) if name.isdigit()]
        self._saved = set(complete)
        kept = (f"the last complete checkpoint, step {max(complete)}, is intact and a relaunch resumes from it"
                if complete else "no complete checkpoint was saved yet, so a relaunch starts from step 0")
        raise disk_full_error(
            f"checkpoint step {', '.join(map(str, partial)) or '?'}", self.directory,
            f"about {format_bytes(self._state_bytes)} per step", f"The partial step was removed and {kept}; free "
            f"space there (or lower --config.keep_checkpoints) and run the same command again.") from failure

    def _remove_partial_steps(self) -> list[int]:
        """Remove orbax's temporary folders (`N.orbax-checkpoint-tmp*`); their step numbers."""
        steps = set()
        for name in os.listdir(self.directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)  # processes may race
                if name.split(".")[0].isdigit():
                    steps.add(int(name.split(".")[0]))
        return sorted(steps)

    # ---------------------------------------------------------------- restore

    def restore_latest(self, abstract_state: dict) -> tuple[int, dict, list[bytes | None] | None] | None:
        """(step, state, iterator states by saving process) of the newest readable step, or None if none.

        `abstract_state` is a tree of jax.ShapeDtypeStruct with the target shardings. Raises
        CheckpointMismatchError or CheckpointIOError (see the module docstring); moves only
        unreadable steps.
        """
        below = None
        while True:
            local = [step for step in self.all_steps() if below is None or step < below]
            step = multihost.agree_min(local[-1] if local else -1)
            if step < 0:
                return None
            restored = self._restore_step(step, abstract_state)
            if restored is not None:
                state, data = restored
                iterators = data.get("iterators") if isinstance(data, dict) else None
                if iterators is None and isinstance(data, dict) and "iterator" in data:
                    iterators = [data["iterator"]]  # written before per-process states were saved
                iterators = [s.encode() if s is not None else None for s in iterators] if iterators else None
                return step, state, iterators
            self._set_aside(step)
            below = step

    def _restore_step(self, step: int, abstract_state: dict):
        """(state, data JSON) of `step`, or None if it is unreadable on some process (set it aside)."""
        last_error = None
        for attempt in range(self.io_retries + 1):
            outcome, detail = self._attempt(step, abstract_state)
            agreed = multihost.agree_max(outcome)
            if agreed == OK:
                return detail
            if outcome != OK:
                last_error = detail
            where = "" if outcome == agreed else " (reported by another process)"
            if agreed == MISMATCH:
                raise CheckpointMismatchError(
                    detail if outcome == MISMATCH else f"checkpoint step {step} in {self.directory} does not fit "
                    f"this experiment{where}") from None
            if agreed == ERROR:
                if isinstance(detail, BaseException):
                    raise detail
                raise RuntimeError(f"restoring checkpoint step {step} failed on another process; see its log")
            if agreed == UNREADABLE:
                logger.warning("checkpoint step %d in %s is unreadable%s (%s); moving it to %s/ and falling back "
                               "to the previous step", step, self.directory, where, _short(detail),
                               self._corrupt_dir.name)
                return None
            # IO_FAILED: maybe transient; never move anything.
            if attempt < self.io_retries:
                pause = self.retry_seconds * 2**attempt
                logger.warning("reading checkpoint step %d in %s failed with an I/O error%s (%s); retrying in "
                               "%.1f s (%d/%d)", step, self.directory, where, _short(last_error), pause,
                               attempt + 1, self.io_retries)
                time.sleep(pause)
        raise CheckpointIOError(
            f"reading checkpoint step {step} in {self.directory} failed with I/O errors {self.io_retries + 1} "
            f"times (last: {_short(last_error)}). Nothing was moved or deleted. Check the filesystem "
            f"(permissions, mount, quota, network storage), then run the same command again.")

    def _attempt(self, step: int, abstract_state: dict):
        """(outcome, detail) of reading `step` on this process: detail is the restored pair when OK,
        the mismatch message, or the exception."""
        try:
            metadata = self._manager.item_metadata(step)
            saved = metadata[STATE_ITEM]
            if saved is None:
                raise _Unreadable(f"step {step} has no readable state metadata ({STATE_ITEM}/_METADATA missing)")
            differences = state_differences(getattr(saved, "tree", saved), abstract_state)
            if differences:
                return MISMATCH, self._mismatch_message(step, differences)
        except Exception as error:  # noqa: BLE001 -- classified; unknown errors are re-raised by the caller
            return classify_error(error), error
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardRestore(abstract_state), DATA_ITEM: ocp.args.JsonRestore()}))
            state = jax.block_until_ready(restored[STATE_ITEM])
            return OK, (state, restored[DATA_ITEM])
        except Exception as error:  # noqa: BLE001
            return classify_error(error), error

    def _mismatch_message(self, step: int, differences: list[str]) -> str:
        workdir = os.path.dirname(self.directory)
        shown = "\n  ".join(differences[:6])
        more = f"\n  ... and {len(differences) - 6} more" if len(differences) > 6 else ""
        return (f"checkpoint step {step} in {self.directory} does not fit this experiment ({len(differences)} "
                f"differing leaves):\n  {shown}{more}\n"
                f"The workdir holds a run of another experiment (a different model shape, stage or optimizer; "
                f"its settings are in {Workdir(workdir).config_file}). Nothing was moved or deleted. "
                f"To continue that run, use the config it was started with. To run this experiment, give it a new "
                f"--workdir; to start it from that run's weights, add --config.init_from={workdir} (its export/, "
                f"written when it finished).")

    def _set_aside(self, step: int) -> None:
        """Move an unreadable step to WORKDIR/corrupt_checkpoints/ (process 0), then all reload."""
        failure = None
        if jax.process_index() == 0:
            source = os.path.join(self.directory, str(step))
            target_root = str(self._corrupt_dir)
            try:
                os.makedirs(target_root, exist_ok=True)
                target = os.path.join(target_root, f"{step}-{len(os.listdir(target_root))}")
                if os.path.exists(source):
                    shutil.move(source, target)
                    logger.warning("moved unreadable checkpoint step %d to %s", step, target)
            except OSError as error:
                failure = error
        if multihost.agree_any(failure is not None):
            raise CheckpointIOError(
                f"checkpoint step {step} in {self.directory} is unreadable, and moving it to "
                f"{self._corrupt_dir.name}/ failed ({_short(failure) if failure else 'on process 0'}). Nothing was "
                f"moved. Make the workdir writable, or move {os.path.join(self.directory, str(step))} away by hand, then run "
                f"the same command again.")
        self._manager.reload()
        self._saved.discard(step)

    def wait(self) -> None:
        self._stop_if_disk_full(self._manager.wait_until_finished)

    def close(self) -> None:
        try:
            self._stop_if_disk_full(self._manager.wait_until_finished)
        except DiskFull:
            with contextlib.suppress(Exception):  # the failed save's error again: already reported
                self._manager.close()
            raise
        self._manager.close()


def _short(error) -> str:
    if error is None:
        return "unknown"
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return text.replace("\n", " ")[:300]
