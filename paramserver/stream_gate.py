"""How many data-plane streams one shard serves at once, and for how long (pure: no gRPC, no asyncio).

A shard's data plane must not be exhaustible by very many concurrent streams or by streams that
never end. :class:`StreamGate` counts the open streams of one shard; the servicer admits each
stream once its header is parsed and releases it when the stream ends, however it ends (answer,
error, client cancel, timeout). A stream the gate refuses changes nothing.

Concurrent streams (all RESOURCE_EXHAUSTED, reason TOO_MANY_STREAMS, metadata ``limit``,
``scope`` and ``kind``):

* per shard, every kind together: the roster's ``max_streams`` when non-zero (read at each
  admission: the roster is replaced over time), else :data:`DEFAULT_MAX_STREAMS_PER_SHARD`
  (scope ``shard``);
* uploads (their header names no worker): at most :data:`DEFAULT_MAX_UPLOAD_STREAMS` at once,
  each also counting against the shard (scope ``shard``);
* per worker (the worker id of a push header or a pull request), pushes and pulls together:
  :data:`DEFAULT_MAX_STREAMS_PER_WORKER` (scope ``worker``);
* per worker, pushes: :data:`DEFAULT_MAX_PUSHES_PER_WORKER` (scope ``worker``). Every push that
  is receiving holds a gradient buffer the size of the shard, so a worker gets room for its push
  and one retry that overlaps an attempt the shard has not yet seen end, not more.

Time (the servicer applies them; see shard_service.py):

* a client stream (upload, push) whose next message does not arrive within
  :data:`DEFAULT_STREAM_IDLE_S`, or that is still arriving :data:`DEFAULT_MAX_STREAM_S` after it
  began, is ended with DEADLINE_EXCEEDED, reason LIMIT_EXCEEDED (a service limit; metadata
  ``field``: ``stream.idle_s`` or ``stream.duration_s``, ``limit``: the seconds). The
  code says what happened (time ran out, as for the client's own deadline, and the call is not
  retried), the reason that it was the service's limit, not the client's deadline. Nothing of
  such a stream is kept: its pending contribution is discarded, the step is as before.
* a pull waits for its version at most :data:`DEFAULT_MAX_PULL_WAIT_S` when the call has no
  deadline, and never longer than :data:`DEFAULT_MAX_STREAM_S` when it has one; it then answers
  as a pull whose deadline ran out (DEADLINE_EXCEEDED, STEP_WAITING_FOR_WORKERS). Its answer
  must then be taken by the client within :data:`DEFAULT_MAX_STREAM_S` (a client that stops
  reading is ended with DEADLINE_EXCEEDED, LIMIT_EXCEEDED, field ``stream.duration_s``).

The module's defaults are read when a :class:`StreamLimits` is made, so a test may patch them
before the shards of a job start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from paramserver.errors import ParamServerError, Reason

#: Concurrent streams of one shard, every kind together, when the roster sets no max_streams.
DEFAULT_MAX_STREAMS_PER_SHARD = 256
#: Concurrent pushes and pulls of one worker on one shard.
DEFAULT_MAX_STREAMS_PER_WORKER = 8
#: Concurrent pushes of one worker on one shard (each holds a shard-sized gradient buffer).
DEFAULT_MAX_PUSHES_PER_WORKER = 2
#: Concurrent uploads on one shard (each holds a shard-sized buffer; the header names no worker).
DEFAULT_MAX_UPLOAD_STREAMS = 4
#: Longest wait for the next message of an upload or push stream, seconds.
DEFAULT_STREAM_IDLE_S = 60.0
#: Longest an upload or push stream may take to arrive, seconds; also the longest any pull waits,
#: and the longest a pull's answer may take to be sent.
DEFAULT_MAX_STREAM_S = 600.0
#: Longest a pull without a deadline waits for its version, seconds.
DEFAULT_MAX_PULL_WAIT_S = 300.0

Kind = Literal["upload", "push", "pull"]


@dataclass(frozen=True)
class StreamLimits:
    """A shard's stream limits (defaults: the module's constants when the limits are made)."""

    per_shard: int = field(default_factory=lambda: DEFAULT_MAX_STREAMS_PER_SHARD)
    """Concurrent streams when the roster sets no max_streams."""
    per_worker: int = field(default_factory=lambda: DEFAULT_MAX_STREAMS_PER_WORKER)
    """Concurrent pushes and pulls of one worker."""
    pushes_per_worker: int = field(default_factory=lambda: DEFAULT_MAX_PUSHES_PER_WORKER)
    """Concurrent pushes of one worker."""
    uploads: int = field(default_factory=lambda: DEFAULT_MAX_UPLOAD_STREAMS)
    """Concurrent uploads."""
    idle_s: float = field(default_factory=lambda: DEFAULT_STREAM_IDLE_S)
    """Longest wait for a client stream's next message."""
    max_stream_s: float = field(default_factory=lambda: DEFAULT_MAX_STREAM_S)
    """Longest a client stream may take to arrive; longest any pull waits, and sends."""
    max_pull_wait_s: float = field(default_factory=lambda: DEFAULT_MAX_PULL_WAIT_S)
    """Longest a pull without a deadline waits."""

    def __post_init__(self) -> None:
        for name in ("per_shard", "per_worker", "pushes_per_worker", "uploads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("idle_s", "max_stream_s", "max_pull_wait_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")


class StreamGate:
    """Counts one shard's open streams and refuses those over a limit (see the module docstring).

    Not thread-safe: every admission and release runs on the shard's event loop."""

    def __init__(self, limits: StreamLimits | None = None) -> None:
        self.limits = limits if limits is not None else StreamLimits()
        self._open = 0
        self._uploads = 0
        self._by_worker: dict[int, int] = {}
        self._pushes: dict[int, int] = {}

    @property
    def open(self) -> int:
        """Streams open now."""
        return self._open

    def open_for(self, worker: int) -> int:
        """Pushes and pulls of `worker` open now."""
        return self._by_worker.get(worker, 0)

    @property
    def uploads(self) -> int:
        """Uploads open now."""
        return self._uploads

    def shard_limit(self, roster_max: int = 0) -> int:
        """The per-shard limit: `roster_max` (the roster's max_streams) when non-zero, else the default."""
        return roster_max if roster_max > 0 else self.limits.per_shard

    def _check(self, kind: Kind, worker: int | None, shard_limit: int) -> None:
        lim = self.limits
        if self._open >= shard_limit:
            raise _refused(f"this shard serves at most {shard_limit} concurrent streams", shard_limit, "shard", kind)
        if kind == "upload":
            if self._uploads >= lim.uploads:
                raise _refused(f"this shard accepts at most {lim.uploads} concurrent uploads", lim.uploads, "shard", kind)
            return
        assert worker is not None, "pushes and pulls are counted per worker"
        if self._by_worker.get(worker, 0) >= lim.per_worker:
            raise _refused(
                f"worker {worker} has {lim.per_worker} streams open on this shard, the most it may", lim.per_worker, "worker", kind
            )
        if kind == "push" and self._pushes.get(worker, 0) >= lim.pushes_per_worker:
            raise _refused(
                f"worker {worker} has {lim.pushes_per_worker} pushes open on this shard, the most it may",
                lim.pushes_per_worker,
                "worker",
                kind,
            )

    @contextlib.contextmanager
    def admit(self, kind: Kind, worker: int | None = None, roster_max: int = 0) -> Iterator[None]:
        """Hold one slot for a stream of `kind` (of `worker`: None for an upload) while the block
        runs; RESOURCE_EXHAUSTED (TOO_MANY_STREAMS), counting nothing, when a limit is reached.
        `roster_max`: the roster's max_streams (0 = the default per-shard limit)."""
        if (kind == "upload") != (worker is None):
            raise ValueError("an upload names no worker; a push or a pull names one")
        self._check(kind, worker, self.shard_limit(roster_max))
        self._open += 1
        if worker is None:
            self._uploads += 1
        else:
            _inc(self._by_worker, worker)
            if kind == "push":
                _inc(self._pushes, worker)
        try:
            yield
        finally:
            self._open -= 1
            if worker is None:
                self._uploads -= 1
            else:
                _dec(self._by_worker, worker)
                if kind == "push":
                    _dec(self._pushes, worker)


def _inc(counts: dict[int, int], key: int) -> None:
    counts[key] = counts.get(key, 0) + 1


def _dec(counts: dict[int, int], key: int) -> None:
    n = counts[key] - 1
    if n:
        counts[key] = n
    else:
        del counts[key]  # a worker with no stream open takes no room


def _refused(message: str, limit: int, scope: str, kind: Kind) -> ParamServerError:
    return ParamServerError(
        "RESOURCE_EXHAUSTED",
        Reason.TOO_MANY_STREAMS,
        f"{message}; retry when one ends",
        {"limit": limit, "scope": scope, "kind": kind},
    )


def stream_time_error(what: str, field_name: str, limit_s: float) -> ParamServerError:
    """DEADLINE_EXCEEDED (LIMIT_EXCEEDED) ending a client stream that ran past a time limit."""
    return ParamServerError("DEADLINE_EXCEEDED", Reason.LIMIT_EXCEEDED, what, {"field": field_name, "limit": f"{limit_s:g}"})
