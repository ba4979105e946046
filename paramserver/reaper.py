"""Stop what a process started when it dies without cleaning up (``python -m paramserver.reaper PID``).

A service that starts its own local Ray owns Ray's processes (GCS, raylet, the dashboard and
runtime-env agents, the actors' workers). A clean stop shuts them down; a SIGKILL does not, and
some of them (the agents) outlive it for good. The reaper is a small process in its own session
that watches the service: every second it records the service's descendants (Linux ``/proc``),
and when the service is gone it sends them SIGTERM, then SIGKILL to those still there a few
seconds later. A process is only signalled if its start time is still the one recorded, so a
reused pid is never hit. Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

#: Seconds between two looks at the watched process.
INTERVAL_S = 1.0
#: Seconds between SIGTERM and SIGKILL.
GRACE_S = 3.0

Proc = tuple[int, int]
"""(pid, start time in clock ticks since boot)."""


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def descendants(pid: int) -> set[Proc]:
    """Every live descendant of `pid`, with its start time."""
    children: dict[int, list[Proc]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append((int(entry.name), st[1]))
    out: set[Proc] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child[0])
    return out


def alive(proc: Proc) -> bool:
    """Whether the process is still the one recorded (same pid, same start time)."""
    st = _stat(proc[0])
    return st is not None and st[1] == proc[1]


def reap(procs: set[Proc], grace_s: float = GRACE_S) -> int:
    """SIGTERM, then SIGKILL after `grace_s`, the processes still alive; how many were signalled."""
    targets = [p for p in procs if alive(p)]
    for pid, _ in targets:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(alive(p) for p in targets):
        time.sleep(0.1)
    for p in targets:
        if alive(p):
            with contextlib.suppress(OSError):
                os.kill(p[0], signal.SIGKILL)
    return len(targets)


def watch(pid: int, interval_s: float = INTERVAL_S) -> int:
    """Record `pid`'s descendants until it is gone, then reap them; how many were signalled."""
    me = _stat(pid)
    if me is None:
        return 0
    watched = (pid, me[1])
    own = _stat(os.getpid())
    myself = (os.getpid(), own[1] if own is not None else 0)  # the reaper is a child of the watched process too
    seen: set[Proc] = set()
    while alive(watched):
        seen = ({p for p in seen if alive(p)} | descendants(pid)) - {myself}
        time.sleep(interval_s)
    return reap(seen)


def start_reaper(pid: int | None = None) -> subprocess.Popen[bytes] | None:
    """Start a reaper for `pid` (default: this process) in its own session; None off Linux."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "paramserver.reaper", str(pid or os.getpid())],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main() -> None:
    """Entry point: ``python -m paramserver.reaper PID``."""
    watch(int(sys.argv[1]))


if __name__ == "__main__":
    main()
