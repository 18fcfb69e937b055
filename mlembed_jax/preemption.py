"""SIGTERM during training: save at the next step boundary, then stop (exit code 143).

    with Preemption() as preempt:      # the previous SIGTERM handler comes back on exit
        ...
        if preempt.check(step): save, stop

With several processes, all must stop at the same step (a checkpoint save is collective),
so JAX's preemption service decides: it catches SIGTERM in any process, and
reached_preemption_sync_point turns true on every process at one common step.
"""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils


class Preemption:
    """A flag SIGTERM sets; read once per step with check(step)."""

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        self._previous = None

    def __enter__(self) -> Preemption:
        if not self.multi:  # a Python handler would replace the service's own
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        """Whether to save and stop after `step`; called once per step, with the same step
        on every process."""
        if self.multi:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested
