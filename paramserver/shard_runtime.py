"""A shard's step machinery on asyncio: uploads, pushes, step completion, pulls.

No gRPC and no Ray: the servicer (shard_service.py) calls it with plain
values, and the cross-shard reduction goes through an injected
:class:`StepReducer`. CPU-heavy work (decoding, the optimizer update,
encoding) runs in a worker thread so the event loop keeps serving streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar, cast

from paramserver import snapshot_names as names
from paramserver.errors import ParamServerError, Reason
from paramserver.ledger import Ledger
from paramserver.manifest import ShardEntry
from paramserver.placement import Span
from paramserver.shard import Contribution, ShardState, Staging
from paramserver.snapshot_store import FaultHook, SnapshotRef, SnapshotStore, no_fault
from paramserver.steps import Decision, Outcome, ShardStats, StepReport
from paramserver_client.codec import TRAIN

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Steps of push answers a snapshot keeps for exactly-once retries after a restore.
LEDGER_STEPS_KEPT = 64

#: Seconds between attempts when the coordinator cannot be reached during a step.
REDUCE_RETRY_S = 0.5


class StepReducer(Protocol):
    """Turns this shard's stats for a step into the decision shared by all shards."""

    async def reduce(self, stats: ShardStats, step: int) -> Decision:
        """Report `stats` for `step` and wait for the decision (idempotent per shard and step)."""
        ...


@dataclass(frozen=True)
class PushResult:
    """The answer to a push."""

    outcome: Outcome
    version: int
    contributions: int
    expected: int
    report: StepReport | None


@dataclass(frozen=True)
class Publication:
    """What a pull serves: the version, the step report that produced it, the encoded chunks
    [(offset, count, message)], and the parameters the next update will not train."""

    version: int
    report: StepReport | None
    chunks: Iterable[tuple[int, int, bytes]]
    """A list (in memory, cached) or an iterator that reads as it goes (a spilled shard)."""
    elements: int
    frozen: list[int]


@dataclass(frozen=True)
class PushHeader:
    """The header of a push, as plain values."""

    worker_id: int
    step: int
    request_id: str
    loss_terms: int


class ShardRuntime:
    """Orchestrates one shard's synchronous steps."""

    def __init__(self, state: ShardState, reducer: StepReducer) -> None:
        self.state = state
        self.reducer = reducer
        self.expected = state.config.num_workers
        self._pending: dict[int, Contribution] = {}
        self._push_ledger: Ledger[asyncio.Future[PushResult]] = Ledger()
        self._upload_ledger: Ledger[int] = Ledger(capacity=64)
        self._published = asyncio.Condition()
        self._completing: asyncio.Task[None] | None = None
        self._closed = False
        self._snapshot_busy = False
        self._upload_lock = asyncio.Lock()
        # Snapshot files are written on their own low-priority thread, so that the step's
        # reduce/apply (on the default pool) keep the CPU while a write runs in the background.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="snapshot-writer", initializer=_lower_priority)

    # ---- uploads --------------------------------------------------------------------------

    def check_upload_header(self, request_id: str) -> int | None:
        """Validate an upload's header; return the first answer if it is a retry."""
        _require_request_id(request_id)
        done = self._upload_ledger.lookup(request_id, "upload")
        if done is not None:
            return done
        if self.state.initialized:
            raise ParamServerError.precondition(Reason.PARAMETERS_ALREADY_INITIALIZED, "this shard's parameters were already uploaded")
        return None

    async def upload(self, request_id: str, staging: Staging) -> int:
        """Store the initial parameters (a complete, validated stream) and publish version 0."""
        async with self._upload_lock:  # two uploads racing: the second sees the first's result
            try:
                done = self.check_upload_header(request_id)
                if done is None:
                    self.state.check_coverage(staging.pieces)
            except ParamServerError:
                self.state.release(staging.buffer)
                raise
            if done is not None:
                self.state.release(staging.buffer)
                return done
            await asyncio.to_thread(self._locked, self.state.load, staging)
            self._upload_ledger.record(request_id, "upload", self.state.numel)
        await self._notify()
        return self.state.numel

    # ---- pushes ---------------------------------------------------------------------------

    def check_push_header(self, h: PushHeader) -> asyncio.Future[PushResult] | None:
        """Validate a push header before its chunks are read; return the first answer's
        future if this is a retry of a known request id."""
        _require_request_id(h.request_id)
        first = self._push_ledger.lookup(h.request_id, (h.worker_id, h.step))
        if first is not None:
            return first
        if not self.state.initialized:
            raise ParamServerError.precondition(Reason.PARAMETERS_NOT_INITIALIZED, "parameters have not been uploaded to this shard yet")
        if h.worker_id >= self.expected:
            raise ParamServerError.invalid("header.worker_id", f"must be < num_workers ({self.expected})", worker_id=h.worker_id)
        version = self.state.version
        if h.step < version:
            raise ParamServerError(
                "ABORTED",
                Reason.STEP_ALREADY_APPLIED,
                f"step {h.step} was already applied; the current version is {version}",
                {"current_version": version, "step": h.step},
            )
        if h.step > version:
            raise ParamServerError.precondition(
                Reason.STEP_NOT_READY,
                f"step {h.step} cannot be pushed yet; the current version is {version} (pull it first)",
                current_version=version,
                step=h.step,
            )
        if h.worker_id in self._pending:
            raise ParamServerError(
                "ALREADY_EXISTS",
                Reason.DUPLICATE_CONTRIBUTION,
                f"worker {h.worker_id} already pushed step {h.step} with another request id",
                {"worker_id": h.worker_id, "step": h.step},
            )
        return None

    async def push(self, h: PushHeader, staging: Staging) -> PushResult:
        """Record a complete, validated push; complete the step when all workers are in."""
        try:
            first = self.check_push_header(h)  # again: the state may have moved while chunks arrived
            if first is None:
                self.state.check_coverage(staging.pieces)
        except ParamServerError:
            self.state.release(staging.buffer)
            raise
        if first is not None:
            self.state.release(staging.buffer)
            return await asyncio.shield(first)
        fut: asyncio.Future[PushResult] = asyncio.get_running_loop().create_future()
        self._push_ledger.record(h.request_id, (h.worker_id, h.step), fut)
        self._pending[h.worker_id] = Contribution(h.worker_id, h.loss_terms, staging.buffer)
        count = len(self._pending)
        if count < self.expected:
            fut.set_result(PushResult(Outcome.PENDING, self.state.version, count, self.expected, None))
            return fut.result()
        contributions = list(self._pending.values())
        self._completing = asyncio.create_task(self._complete(h.step, contributions, fut))
        return await asyncio.shield(fut)

    async def _complete(self, step: int, contributions: list[Contribution], fut: asyncio.Future[PushResult]) -> None:
        try:
            stats = await asyncio.to_thread(self._locked, self.state.reduce, contributions)
            while True:
                try:
                    decision = await self.reducer.reduce(stats, step)
                    break
                except ParamServerError:
                    raise
                except Exception as exc:  # the coordinator is unreachable: retry, the answer is idempotent
                    if self._closed:
                        raise
                    log.warning("shard %d: step %d reduction failed (%s); retrying", self.state.index, step, exc)
                    await asyncio.sleep(REDUCE_RETRY_S)
            report = await asyncio.to_thread(self._locked, self.state.apply, decision)
            self._pending.clear()
            self._completing = None
            fut.set_result(PushResult(report.outcome, self.state.version, len(contributions), self.expected, report))
            await self._notify()
        except BaseException as exc:
            self._completing = None
            if not fut.done():
                fut.set_exception(
                    exc if isinstance(exc, Exception) else ParamServerError("UNAVAILABLE", Reason.SERVICE_UNAVAILABLE, "shard stopping")
                )
            log.exception("shard %d: step %d failed", self.state.index, step)
            if not isinstance(exc, Exception):
                raise

    # ---- pulls ----------------------------------------------------------------------------

    async def wait_version(self, min_version: int) -> None:
        """Wait until parameters exist and version >= min_version (the caller's deadline bounds it)."""
        async with self._published:
            await self._published.wait_for(lambda: self._closed or (self.state.initialized and self.state.version >= min_version))
        if self._closed:
            raise ParamServerError("UNAVAILABLE", Reason.SERVICE_UNAVAILABLE, "the shard is shutting down")

    async def publication(self, dtype: int, ranges: Sequence[Span], point: int = TRAIN) -> Publication:
        """The current version's parameters (at `point`) encoded in `dtype` (optionally a subset)."""

        def read() -> Publication:
            version, chunks = self.state.publication(dtype, ranges, point)
            elements = sum(r.length for r in ranges) or self.state.numel
            return Publication(version, self.state.last_report, chunks, elements, self.state.frozen_parameters())

        return await asyncio.to_thread(self._locked, read)

    # ---- snapshots ------------------------------------------------------------------------

    async def snapshot(self, store: SnapshotStore, ref: SnapshotRef, version: int, fault: FaultHook | None = None) -> ShardEntry:
        """Write this shard's part of snapshot `ref` at `version` into `store`; return its file entry.

        Waits until `version` is published, then copies the state to host memory under the lock
        (the only pause); the file is written on a worker thread while training goes on. ABORTED
        (SNAPSHOT_IN_PROGRESS) if another snapshot is being written; ABORTED with reason
        STEP_ALREADY_APPLIED if this shard has already moved past `version` (the coordinator
        then retries at a later version).
        """
        if self._snapshot_busy:
            raise ParamServerError("ABORTED", Reason.SNAPSHOT_IN_PROGRESS, "a snapshot of this shard is being written")
        self._snapshot_busy = True
        try:
            await self.wait_version(version)

            ranges = [[s.start, s.length] for s in self.state.spans]
            ledger = self.ledger_entries(version - LEDGER_STEPS_KEPT)  # on the loop, with the version published
            name = names.shard_file(self.state.index)
            hook = fault or no_fault
            if self.state.streams_snapshots:  # a spilled shard writes under the lock, from its tiles

                def streamed() -> ShardEntry:
                    self._check_version(version)
                    meta = self._snapshot_meta(version, self.state.applied, ranges, ledger)
                    return self._entry(store.write_file(ref, name, self.state.stream_snapshot(), meta, hook), ranges, self.state.applied)

                return await asyncio.get_running_loop().run_in_executor(self._writer, self._locked, streamed)

            def take() -> tuple[dict[str, Any], int]:
                self._check_version(version)
                return {k: v.numpy() for k, v in self.state.capture().items()}, self.state.applied

            tensors, applied = await asyncio.to_thread(self._locked, take)
            meta = self._snapshot_meta(version, applied, ranges, ledger)
            write = functools.partial(store.write_file, ref, name, tensors, meta, hook)
            entry = await asyncio.get_running_loop().run_in_executor(self._writer, write)
            return self._entry(entry, ranges, applied)
        finally:
            self._snapshot_busy = False

    def _check_version(self, version: int) -> None:
        """ABORTED (STEP_ALREADY_APPLIED) when this shard has moved past `version`."""
        if self.state.version != version:
            raise ParamServerError(
                "ABORTED",
                Reason.STEP_ALREADY_APPLIED,
                f"shard {self.state.index} is at version {self.state.version}, not {version}",
                {"current_version": self.state.version},
            )

    def _snapshot_meta(self, version: int, applied: int, ranges: list[list[int]], ledger: list[dict[str, Any]]) -> dict[str, str]:
        return {
            names.META_SHARD: str(self.state.index),
            names.META_VERSION: str(version),
            names.META_APPLIED: str(applied),
            names.META_RANGES: json.dumps(ranges),
            names.META_LEDGER: json.dumps(ledger),
            **self.state.snapshot_metadata(),
        }

    def _entry(self, entry: ShardEntry, ranges: list[list[int]], applied: int) -> ShardEntry:
        return dataclasses.replace(entry, index=self.state.index, ranges=tuple((a, n) for a, n in ranges), applied=applied)

    def ledger_entries(self, since_step: int) -> list[dict[str, Any]]:
        """The answered pushes of steps >= since_step, as JSON-able data (for snapshots)."""
        out = []
        for request_id, fingerprint, fut in self._push_ledger.items():
            worker, step = cast(tuple[int, int], fingerprint)
            if step < since_step or step >= self.state.version or not fut.done() or fut.exception() is not None:
                continue
            r = fut.result()
            report = None if r.report is None else {**dataclasses.asdict(r.report), "outcome": r.report.outcome.value}
            out.append({"request_id": request_id, "worker": worker, "step": step, "outcome": r.outcome.value,
                        "version": r.version, "contributions": r.contributions, "expected": r.expected, "report": report})  # fmt: skip
        return out

    def load_ledger(self, entries: list[dict[str, Any]]) -> None:
        """Remember the answers of pushes made before a snapshot (after a restore), so that a
        retry of one of them gets its first answer."""
        loop = asyncio.get_running_loop()
        for e in entries:
            rep = e.get("report")
            report = None if rep is None else StepReport(**{**rep, "outcome": Outcome(rep["outcome"])})
            fut: asyncio.Future[PushResult] = loop.create_future()
            fut.set_result(PushResult(Outcome(e["outcome"]), e["version"], e["contributions"], e["expected"], report))
            self._push_ledger.record(e["request_id"], (e["worker"], e["step"]), fut)

    # ---- lifecycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Wake every waiter with UNAVAILABLE and release the state's files."""
        self._closed = True
        self._writer.shutdown(wait=False)
        await self._notify()
        await asyncio.to_thread(self._locked, self.state.close)

    async def _notify(self) -> None:
        async with self._published:
            self._published.notify_all()

    def _locked(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        with self.state.lock:
            return fn(*args, **kwargs)


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):  # Linux: per-thread nice
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _require_request_id(request_id: str) -> None:
    if not request_id:
        raise ParamServerError.invalid("header.request_id", "must not be empty (every mutating call carries a request id)")
