"""The machine's busy CPU time, and waiting for it to go quiet before a timed measurement.

A service does background work after a job starts (a few seconds later it starts warm spare
shard actors, each a process importing torch: seconds of one core). On the 2-core machines benchmarks run on here,
that work would land inside the first timed steps; the benchmarks wait for it to finish first.
"""

from __future__ import annotations

import os
import time


def busy_seconds() -> float | None:
    """Core-seconds the whole machine has spent busy (not idle, not waiting for I/O) since boot;
    None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(max_cores: float = 0.35, window_s: float = 1.0, timeout_s: float = 30.0, settle_s: float = 0.0) -> float:
    """Wait `settle_s` (after a job's start: the service replaces the spares it took only
    ``paramserver.cluster.REFILL_DELAY_S`` later), then until the machine was busy for less than
    `max_cores` cores over a `window_s` window (or `timeout_s` passed); the seconds waited.
    Returns after `settle_s` where busy time is unknown."""
    t0 = time.monotonic()
    time.sleep(settle_s)
    before = busy_seconds()
    if before is None:
        return 0.0
    while time.monotonic() - t0 < timeout_s:
        time.sleep(window_s)
        now = busy_seconds()
        assert now is not None
        if now - before < max_cores * window_s:
            break
        before = now
    return time.monotonic() - t0
