"""Checkpoints of a run: orbax `CheckpointManager` under WORKDIR/checkpoints/STEP/{state,data}.

`state` is the TrainState (params, optimizer state, step, RNG, non-finite counters) as a dict of
arrays; `data` is the input pipeline's iterator state (JSON), so a resumed run reads exactly the
batches the uninterrupted run would have read. Saves are asynchronous (training continues while
the arrays are written); orbax writes into a temporary folder and renames it when complete, so a
run killed mid-save leaves no step that looks finished.

Restoring walks the steps from newest to oldest: a step that fails to load (a corrupted or
truncated file) is moved to WORKDIR/corrupt_checkpoints/ with a warning and the previous step is
tried. Arrays are restored straight into the shardings of the current mesh, which may differ from
the mesh that saved them (another device count).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

STATE_ITEM = "state"
DATA_ITEM = "data"


class Checkpointer:
    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, DATA_ITEM))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict, data_state: bytes | None, *, force: bool = False) -> bool:
        """Start saving (asynchronously) if `step` is due or `force`; True if a save started."""
        if step in self._manager.all_steps():
            return False
        data = {"iterator": data_state.decode() if data_state is not None else None}
        return self._manager.save(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), DATA_ITEM: ocp.args.JsonSave(data)}), force=force)

    def restore_latest(self, abstract_state: dict) -> tuple[int, dict, bytes | None] | None:
        """(step, state, data iterator state) of the newest loadable step, or None if there is none.

        `abstract_state` is a tree of jax.ShapeDtypeStruct with the target shardings.
        """
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    **{STATE_ITEM: ocp.args.StandardRestore(abstract_state), DATA_ITEM: ocp.args.JsonRestore()}))
                state = restored[STATE_ITEM]
                jax.block_until_ready(state)
            except Exception as error:  # noqa: BLE001 -- any failure to read a step means: try the previous
                logger.warning("checkpoint step %d in %s cannot be restored (%s: %s); moving it to "
                               "corrupt_checkpoints/ and falling back to the previous step", step, self.directory,
                               type(error).__name__, str(error)[:300])
                self._quarantine(step)
                continue
            iterator_state = restored[DATA_ITEM]["iterator"]
            return step, state, iterator_state.encode() if iterator_state is not None else None
        return None

    def _quarantine(self, step: int) -> None:
        source = os.path.join(self.directory, str(step))
        target_root = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        os.makedirs(target_root, exist_ok=True)
        if os.path.exists(source):
            shutil.move(source, os.path.join(target_root, f"{step}-{len(os.listdir(target_root))}"))
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def write_json(path: str, value) -> None:
    """Write JSON atomically (temporary file + rename)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    os.replace(temporary, path)
