"""What an actor (a shard or the coordinator) records for the front door to show: metric values
and recent log records (pure: no Ray, no gRPC, no prometheus_client).

The front door gathers every actor's ``Telemetry.export()`` at each scrape of ``/metrics``
(paramserver.metrics turns it into Prometheus families) and drains their log records into its
own log (paramserver.log_relay). Names and labels are those of paramserver.metric_names.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import os
import re
import threading
import time
import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from paramserver.metric_names import PHASE_BUCKETS

Labels = tuple[tuple[str, str], ...]

#: Log records an actor keeps for the front door to drain (older ones are dropped, and counted).
LOG_RING = 4096


@dataclass
class Histogram:
    """Cumulative-free bucket counts (one per upper bound, plus +Inf), their sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1


@dataclass(frozen=True)
class Sample:
    """One metric series as exported: counters and gauges carry `value`, histograms `hist`."""

    name: str
    labels: Labels
    value: float = 0.0
    hist: Histogram | None = None


class Telemetry:
    """An actor's metrics (thread-safe: the data plane records from worker threads) and its ring
    of recent log records. `base` labels (job, shard, node) go on every series."""

    def __init__(self, base: Mapping[str, str] | None = None) -> None:
        self.base: Labels = tuple((base or {}).items())
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, Labels], float] = collections.defaultdict(float)
        self._gauges: dict[tuple[str, Labels], float] = {}
        self._hists: dict[tuple[str, Labels], Histogram] = {}
        self.logs = LogRing()
        self.extra: dict[str, Any] = {}
        """Free-form values exported as they are (optimizer health sums; see metrics.py)."""

    def _key(self, name: str, labels: Mapping[str, str]) -> tuple[str, Labels]:
        return name, self.base + tuple(labels.items())

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add to a counter."""
        with self._lock:
            self._counters[self._key(name, labels)] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        with self._lock:
            self._gauges[self._key(name, labels)] = value

    def observe(self, name: str, value: float, bounds: Sequence[float] = PHASE_BUCKETS, **labels: str) -> None:
        """Count an observation in a histogram."""
        self.observe_labelled(name, value, labels, bounds)

    def observe_labelled(self, name: str, value: float, labels: Mapping[str, str], bounds: Sequence[float] = PHASE_BUCKETS) -> None:
        """observe() with the labels as a mapping."""
        key = self._key(name, labels)
        with self._lock:
            h = self._hists.get(key)
            if h is None:
                h = self._hists[key] = Histogram(tuple(bounds))
            h.observe(value)

    def time(self, name: str, **labels: str) -> _Timer:
        """A context manager observing its duration in `name`."""
        return _Timer(self, name, labels)

    def forget(self, name: str) -> None:
        """Drop every series of gauge `name` (a set of labels that changes, e.g. stream kinds)."""
        with self._lock:
            for key in [k for k in self._gauges if k[0] == name]:
                del self._gauges[key]

    def drop(self, label: str, value: str) -> None:
        """Drop every series whose `label` is `value` (a deleted job's)."""
        with self._lock:
            for store in (self._counters, self._gauges, self._hists):
                for key in [k for k in store if (label, value) in k[1]]:
                    del store[key]

    def export(self) -> list[Sample]:
        """Every series now (copies)."""
        with self._lock:
            out = [Sample(n, lab, v) for (n, lab), v in self._counters.items()]
            out += [Sample(n, lab, v) for (n, lab), v in self._gauges.items()]
            out += [Sample(n, lab, hist=Histogram(h.bounds, list(h.counts), h.total, h.count)) for (n, lab), h in self._hists.items()]
        return out


class _Timer:
    def __init__(self, telemetry: Telemetry, name: str, labels: Mapping[str, str]) -> None:
        self.telemetry, self.name, self.labels = telemetry, name, dict(labels)
        self.start = 0.0

    def __enter__(self) -> _Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.telemetry.observe_labelled(self.name, time.perf_counter() - self.start, self.labels)


_FIELD = re.compile(r"\b(job|shard|step|worker) %[sdr]")
_PLACEHOLDER = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[sdrifgex%]")


def fields_of(record: logging.LogRecord) -> dict[str, object]:
    """The job, shard, step and worker a record's message names in the service's own phrasing
    ("job %s", "shard %d", "step %d", "worker %d"), taken from its arguments."""
    if not isinstance(record.msg, str) or not isinstance(record.args, tuple) or not record.args:
        return {}
    out: dict[str, object] = {}
    placeholders = [m.start() for m in _PLACEHOLDER.finditer(record.msg) if m.group() != "%%"]
    for m in _FIELD.finditer(record.msg):
        at = m.end() - 2
        if at in placeholders:
            k = placeholders.index(at)
            if k < len(record.args):
                out[m.group(1)] = record.args[k]
    return out


def attach(ring: LogRing, level: int = logging.INFO) -> None:
    """Keep the service's log records (logger "paramserver") of this process in `ring`."""
    logger = logging.getLogger("paramserver")
    if ring not in logger.handlers:
        logger.addHandler(ring)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)


def resident_set_bytes() -> int:
    """This process's resident set size now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class LogRing(logging.Handler):
    """A logging handler keeping the last LOG_RING records as plain dicts, numbered, for the
    front door to drain (``since(seq)``). Fields: seq, time, level, logger, message, and the
    record's job / shard / step when set (``extra=`` or the actor's context)."""

    def __init__(self, context: Mapping[str, object] | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.context: dict[str, object] = dict(context or {})
        self._ring: collections.deque[dict[str, object]] = collections.deque(maxlen=LOG_RING)
        self._seq = itertools.count(1)
        self._ring_lock = threading.Lock()
        self.dropped = 0
        self.instance = uuid.uuid4().hex
        """This ring's id: a restarted actor's numbers start again, under a new id."""

    def emit(self, record: logging.LogRecord) -> None:
        """Keep `record` (never raises)."""
        try:
            entry: dict[str, object] = {
                "time": record.created,
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                **self.context,
            }
            entry.update(fields_of(record))
            for key in ("job", "shard", "step", "worker"):
                value = getattr(record, key, None)
                if value is not None:
                    entry[key] = value
            if record.exc_info:
                entry["exc"] = "".join(traceback.format_exception(*record.exc_info))[-4000:]
            with self._ring_lock:
                entry["seq"] = next(self._seq)
                if len(self._ring) == self._ring.maxlen:
                    self.dropped += 1
                self._ring.append(entry)
        except Exception:  # noqa: BLE001 - a log handler must not raise
            self.handleError(record)

    def since(self, seq: int) -> list[dict[str, object]]:
        """The records numbered above `seq`, oldest first."""
        with self._ring_lock:
            return [e for e in self._ring if int(e["seq"]) > seq]  # type: ignore[call-overload]
