"""Stopping for a preemption notice (SIGTERM) at the same step on every process."""

from __future__ import annotations

import signal

from af_next_jax.train import multihost


class Preemption:
    """Whether to stop after this step because some process got SIGTERM (a preemption notice).

    One process: a SIGTERM handler sets a flag. Several processes: jax's preemption sync manager
    (started by `jax.distributed.initialize`, it catches SIGTERM itself) propagates a notice from any
    process to all and names the same step for everyone (`reached_preemption_sync_point`); without it
    (`jax_enable_preemption_service=False`) each process's flag is combined with a collective `any`
    every step. Either way all processes stop after the same step.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        self._sync_manager = False

    def __enter__(self):
        if multihost.is_multiprocess():
            from jax._src import distributed

            self._sync_manager = distributed.global_state.preemption_sync_manager is not None
        if not self._sync_manager:  # the sync manager's own SIGTERM handler must stay in place
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no signal handling
                self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self._flag = True

    def should_stop(self, step: int) -> bool:
        """Call after every step, on every process, with the same step."""
        if self._sync_manager:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return multihost.agree_any(self._flag)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
