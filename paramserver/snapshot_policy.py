"""When a job's periodic snapshots fall due (pure: no asyncio, no Ray, no torch).

A job may ask for a snapshot every K steps (`snapshot_every_steps`) and every T seconds
(`snapshot_every_seconds`); 0 turns a rule off. The coordinator asks :meth:`SnapshotPolicy.due`
when it decides a step and, if it launches the snapshot, says so (:meth:`SnapshotPolicy.started`);
every committed snapshot, periodic or on demand, restarts the time rule
(:meth:`SnapshotPolicy.committed`).

Skipping a due snapshot while another one is being written is the coordinator's rule (it owns
the lock). A skipped snapshot is not recorded here, so the policy stays due and the next decided
step tries again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: A monotonic clock in seconds (`time.monotonic`, or a fake one in tests).
Clock = Callable[[], float]


class SnapshotPolicy:
    """The periodic snapshot rules of one job, with the time and step of the last snapshot.

    Step rule (K = `every_steps` > 0): a snapshot at the first step boundary at or after K steps
    from the job's start (version K), or from a restore's version V (version V + K), then K steps
    after each periodic snapshot. Time rule (T = `every_seconds` > 0): a snapshot once T seconds
    passed since the last one was launched or committed (or since the policy was made). Either
    rule makes a snapshot due.
    """

    __slots__ = ("_clock", "_last_time", "_next_version", "every_seconds", "every_steps")

    def __init__(self, *, every_steps: int = 0, every_seconds: float = 0.0, clock: Clock = time.monotonic) -> None:
        """A policy for a job starting now at version 0 (see :meth:`restored` for a restored job)."""
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._clock = clock
        self._next_version = 0
        self._last_time = clock()

    def restored(self, version: int) -> None:
        """Count the step rule from a restored snapshot's version: the next one is at version + K."""
        self._next_version = version + max(1, self.every_steps)

    def due(self, step: int) -> bool:
        """Whether a snapshot at version step + 1 is due, now that `step` is decided."""
        every = self.every_steps
        by_steps = every > 0 and step + 1 >= max(self._next_version, every)
        by_time = self.every_seconds > 0 and self._clock() - self._last_time >= self.every_seconds
        return by_steps or by_time

    def started(self, version: int) -> None:
        """A periodic snapshot at `version` (the decided step + 1) was launched: the next step
        boundary is K steps later (1 with the step rule off) and the time rule restarts now."""
        self._next_version = version + max(self.every_steps, 1)
        self._last_time = self._clock()

    def committed(self) -> None:
        """A snapshot (periodic or on demand) was committed: the time rule restarts now; the step
        rule is left as it is."""
        self._last_time = self._clock()
