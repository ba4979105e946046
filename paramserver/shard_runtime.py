"""A shard's step machinery on asyncio: uploads, pushes, step completion, pulls, snapshots; and the
wire encoding of what goes in and out.

No gRPC and no Ray: the servicer (shard_service.py) parses messages and calls it with plain values;
the cross-shard reduction goes through an injected :class:`StepReducer`. The runtime validates
each stream's header once, decodes its chunks into a gradient buffer of the state, and encodes
publications (cached per version and dtype when the state serves views of its memory). CPU-heavy
work (the reduction, the update, encoding) runs in a worker thread so the event loop keeps serving
streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar, cast

import numpy as np

from paramserver import snapshot_names as names
from paramserver.broadcast import Broadcast, Piece
from paramserver.errors import ParamServerError, Reason
from paramserver.grad_buffers import GradBuffer
from paramserver.ledger import Ledger
from paramserver.manifest import UNHASHED, ShardEntry
from paramserver.membership import Roster
from paramserver.optimizer_health import HealthProbe, sampled
from paramserver.placement import Span
from paramserver.shard import Contribution, ShardState
from paramserver.snapshot_store import FaultHook, SnapshotRef, SnapshotStore, no_fault
from paramserver.steps import Decision, Outcome, Redo, ShardStats, StepReport
from paramserver.telemetry import Telemetry
from paramserver.tensor_file import ArrayFile
from paramserver.wire import decode_compressed, encode_blocks, wire_tensor
from paramserver_client.codec import (
    COMPRESSED,
    EVAL,
    INT4_BLOCK,
    INT8_BLOCK,
    ITEMSIZE,
    MAX_CHUNK_BYTES,
    TRAIN,
)

#: The compressed dtypes a pull may ask for (the broadcast of DiLoCo-style rounds).
BROADCAST_DTYPES = (INT8_BLOCK, INT4_BLOCK)
#: Most elements one compressed chunk may cover (its decoded fp32 values: 16 MiB at most).
MAX_CHUNK_ELEMENTS_PACKED = MAX_CHUNK_BYTES

log = logging.getLogger(__name__)

#: The histogram of step phases (paramserver.metric_names.PHASES).
PHASE = "paramserver_step_phase_seconds"

P = ParamSpec("P")
T = TypeVar("T")

#: Steps of push answers a snapshot keeps for exactly-once retries after a restore.
LEDGER_STEPS_KEPT = 64

#: Seconds between attempts when the coordinator cannot be reached during a step.
REDUCE_RETRY_S = 0.5

#: The longest a pull waits for its version when the call has no deadline, seconds.
MAX_PULL_WAIT_S = 3600.0


class StepReducer(Protocol):
    """Turns this shard's stats for a step into the decision shared by all shards."""

    async def reduce(self, stats: ShardStats, step: int) -> Decision | Redo:
        """Report `stats` for `step` and wait for the decision (idempotent per shard and step), or
        for a :class:`Redo` when this shard reduced another set of contributions than the job's
        members."""
        ...


@dataclass(frozen=True)
class Chunk:
    """One parsed chunk of a stream: `count` elements of wire `dtype` at flat `offset`."""

    offset: int
    count: int
    dtype: int
    data: memoryview
    index: int
    """Its position in the stream (for errors)."""


#: Content digests are sums of per-chunk CRC-32s modulo 2^64 (independent of chunk order).
DIGEST_MASK = (1 << 64) - 1


def chunk_digest(c: Chunk) -> int:
    """A chunk's CRC-32 over its offset, count, dtype and bytes."""
    return zlib.crc32(c.data, zlib.crc32(struct.pack("<QQI", c.offset, c.count, c.dtype)))


class Coverage:
    """Which of a shard's local elements a stream has delivered: one bit per element (an eighth
    of a byte, against the four bytes of the buffer it fills), whatever the chunks' sizes and order.
    An overlapping chunk is refused when it arrives (INVALID_ARGUMENT LAYOUT_MISMATCH, field
    ``chunks``), so the elements delivered never exceed the shard's."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.covered = 0
        self._bits = np.zeros((numel + 7) >> 3, dtype=np.uint8)

    def add(self, local: int, count: int, index: int = 0) -> None:
        """Mark local elements [local, local + count) (inside [0, numel), count > 0), unless one of
        them is marked already: then nothing is marked and the chunk (number `index`) is refused."""
        end = local + count
        first, last = local >> 3, (end - 1) >> 3
        bits = self._bits
        if first == last:
            head = ((1 << count) - 1) << (local & 7)
            tail = 0
        else:
            head = (0xFF << (local & 7)) & 0xFF
            tail = (1 << (((end - 1) & 7) + 1)) - 1
        middle = bits[first + 1 : last] if last > first + 1 else None
        if (int(bits[first]) & head) or (tail and int(bits[last]) & tail) or (middle is not None and bool(middle.any())):
            raise ParamServerError.invalid(
                "chunks",
                f"the chunks do not cover this shard's ranges exactly once (chunk {index} overlaps elements already sent, "
                f"local [{local}, {end}))",
                Reason.LAYOUT_MISMATCH,
                chunk_index=index,
            )
        bits[first] |= head
        if tail:
            bits[last] |= tail
        if middle is not None:
            middle[:] = 0xFF
        self.covered += count

    def check_complete(self) -> None:
        """INVALID_ARGUMENT (LAYOUT_MISMATCH, field ``chunks``) naming the first element missing,
        unless every element was delivered."""
        if self.covered == self.numel:
            return
        not_full = np.flatnonzero(self._bits != 0xFF)
        byte = int(not_full[0])
        missing = int(self._bits[byte])
        gap = 8 * byte + next(b for b in range(8) if not missing & (1 << b))
        raise ParamServerError.invalid(
            "chunks",
            f"the chunks cover {self.covered} of this shard's {self.numel} elements (gap at local element {gap})",
            Reason.LAYOUT_MISMATCH,
        )


@dataclass(frozen=True)
class PushPrint:
    """What makes two pushes under one request id the same call: the worker, lease, step, loss
    terms, lrs and the gradient's content digest (None: not known, as for an answer restored
    from a snapshot that predates the field; it then matches anything)."""

    worker: int
    lease: int
    step: int
    terms: int | None = None
    lrs: tuple[float, ...] | None = None
    digest: int | None = None

    def check(self, request_id: str, other: PushPrint) -> None:
        """REQUEST_ID_REUSED naming what differs, unless `other` is the same call."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine is not None and theirs is not None and mine != theirs:
                what = "gradient" if f.name == "digest" else f.name
                raise ParamServerError.invalid(
                    "request_id", f"request id {request_id!r} was used for another push (its {what} differs)", Reason.REQUEST_ID_REUSED
                )


@dataclass(frozen=True)
class PushHeader:
    """The header of a push, as plain values."""

    worker_id: int
    step: int
    request_id: str
    loss_terms: int
    lease: int = 0
    generation: int = 0
    lrs: tuple[float, ...] = ()
    """Each group's lr for the step, when the training loop drives it (empty = the job's schedule)."""


@dataclass(frozen=True)
class PushResult:
    """The answer to a push."""

    outcome: Outcome
    version: int
    contributions: int
    expected: int
    report: StepReport | None


@dataclass(frozen=True)
class Pull:
    """What a pull serves: the version, the step report that produced it, the encoded chunk
    messages (a list when cached, else an iterator that reads as it goes), the element count and
    the parameters the next update will not train."""

    version: int
    report: StepReport | None
    messages: Iterable[bytes]
    elements: int
    frozen: list[int]


class ShardRuntime:
    """Orchestrates one shard's synchronous steps."""

    def __init__(
        self, state: ShardState, reducer: StepReducer, roster: Roster | None = None, generation: int = 0, telemetry: Telemetry | None = None
    ) -> None:
        self.state = state
        self.telemetry = telemetry or Telemetry()
        """Step phase timings and optimizer health (kept across a reset: the host passes its own)."""
        self.reducer = reducer
        self.max_workers = state.config.max_members
        self.roster = roster or Roster(0, (), state.config.min_members)
        self.generation = generation
        self.resume_version = state.version
        """The version this generation of the job started from (a rollback's target)."""
        self._pending: dict[int, Contribution] = {}
        self._requests: dict[int, str] = {}  # worker id -> request id of its pending push
        self._seen: dict[int, float] = {}  # worker id -> loop time of its last push or pull
        self._push_ledger: Ledger[asyncio.Future[PushResult]] = Ledger()
        self._upload_ledger: Ledger[int] = Ledger(capacity=64)
        self._published = asyncio.Condition()
        self._completing: asyncio.Task[None] | None = None
        self._grace_armed = -1  # the version whose grace window runs (quorum mode)
        self._grace_over = -1  # the version whose grace window ran out
        self._grace_task: asyncio.Task[None] | None = None
        self._broadcasts: dict[int, Broadcast] = {}  # compressed pulls' values, per dtype
        self._closed = False
        self._snapshot_busy = False
        self._replica_buffers: dict[str, Any] = {}
        self._upload_lock = asyncio.Lock()
        self._cache: dict[tuple[int, int], tuple[int, list[bytes]]] = {}
        # Snapshot files are written on their own low-priority thread, so that the step's
        # reduce/apply (on the default pool) keep the CPU while a write runs in the background.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="snapshot-writer", initializer=_lower_priority)

    # ---- incoming streams -------------------------------------------------------------------

    async def _receive(self, chunks: AsyncIterator[Chunk], *, compressed: bool = False) -> tuple[GradBuffer, int]:
        """Validate each chunk as it arrives and decode it into a fresh buffer that covers the
        shard exactly once; the buffer (the caller's to hand over, or given back on error) and the
        stream's content digest (see :func:`chunk_digest`). Compressed dtypes (codec.COMPRESSED)
        only when `compressed` (pushes): decoded to fp32 here, ENCODING_INVALID when they do not
        decode.

        What a stream can make the shard hold is bounded as it arrives: a chunk outside the
        shard's ranges, over the chunk size limit or overlapping elements already received is
        refused before it is written, so a stream never writes more than the shard's elements
        into its one buffer; the bookkeeping is one bit per element (:class:`Coverage`)."""
        state = self.state
        buffer = state.grads.acquire()
        coverage = Coverage(state.numel)
        digest = 0
        try:
            async for c in chunks:
                local = self._check_chunk(c, compressed)
                coverage.add(local, c.count, c.index)  # an overlap is refused before it is written
                buffer.write(
                    local, decode_compressed(c.data, c.count, c.dtype, c.index) if c.dtype in COMPRESSED else wire_tensor(c.data, c.dtype)
                )
                digest = (digest + chunk_digest(c)) & DIGEST_MASK
            coverage.check_complete()
        except BaseException:
            state.grads.release(buffer)
            raise
        return buffer, digest

    @staticmethod
    async def _digest(chunks: AsyncIterator[Chunk]) -> int:
        """The content digest of a retried stream (read to its end, nothing decoded)."""
        digest = 0
        async for c in chunks:
            digest = (digest + chunk_digest(c)) & DIGEST_MASK
        return digest

    def _check_chunk(self, c: Chunk, compressed: bool = False) -> int:
        """Validate one chunk (a compressed one's data is validated as it is decoded); its local
        offset. Raises ParamServerError naming the field."""
        packed = c.dtype in COMPRESSED
        if c.dtype not in ITEMSIZE and not (packed and compressed):
            what = "is for pushes (and broadcast pulls) only" if packed else "is not a wire dtype"
            raise ParamServerError.invalid("chunk.dtype", f"dtype {c.dtype} {what}", Reason.DTYPE_UNSUPPORTED, chunk_index=c.index)
        nbytes = len(c.data)
        if nbytes > MAX_CHUNK_BYTES:
            raise ParamServerError(
                "RESOURCE_EXHAUSTED",
                Reason.MESSAGE_TOO_LARGE,
                f"chunk.data: {nbytes} bytes is over the {MAX_CHUNK_BYTES}-byte limit per chunk",
                {"field": "chunk.data", "limit": MAX_CHUNK_BYTES, "chunk_index": c.index},
            )
        if c.count == 0:
            raise ParamServerError.invalid("chunk.count", "must be > 0", chunk_index=c.index)
        if packed and c.count > MAX_CHUNK_ELEMENTS_PACKED:
            raise ParamServerError(
                "RESOURCE_EXHAUSTED",
                Reason.MESSAGE_TOO_LARGE,
                f"chunk.count: a compressed chunk covers at most {MAX_CHUNK_ELEMENTS_PACKED} elements, not {c.count}",
                {"field": "chunk.count", "limit": MAX_CHUNK_ELEMENTS_PACKED, "chunk_index": c.index},
            )
        if not packed and nbytes != c.count * ITEMSIZE[c.dtype]:
            raise ParamServerError.invalid(
                "chunk.data",
                f"{nbytes} bytes for {c.count} elements of {ITEMSIZE[c.dtype]} bytes",
                Reason.LENGTH_MISMATCH,
                chunk_index=c.index,
            )
        local = self.state.local_of(c.offset, c.count)
        if local is None:
            raise ParamServerError.invalid(
                "chunk.offset",
                f"elements [{c.offset}, {c.offset + c.count}) are not inside this shard's ranges {self.state.owned()}",
                Reason.CHUNK_OUT_OF_RANGE,
                offset=c.offset,
                count=c.count,
                chunk_index=c.index,
            )
        return local

    # ---- uploads --------------------------------------------------------------------------

    def _upload_answer(self, request_id: str) -> int | None:
        """The first answer of a retried upload; FAILED_PRECONDITION once parameters exist."""
        _require_request_id(request_id)
        done = self._upload_ledger.lookup(request_id, "upload")
        if done is None and self.state.initialized:
            raise ParamServerError.precondition(Reason.PARAMETERS_ALREADY_INITIALIZED, "this shard's parameters were already uploaded")
        return done

    async def upload(self, request_id: str, chunks: AsyncIterator[Chunk]) -> int:
        """Store the initial parameters (a complete, validated stream) and publish version 0."""
        done = self._upload_answer(request_id)
        if done is not None:
            return done
        buffer, _ = await self._receive(chunks)
        async with self._upload_lock:  # two uploads racing: the second sees the first's result
            try:
                done = self._upload_answer(request_id)
            except ParamServerError:
                self.state.grads.release(buffer)
                raise
            if done is not None:
                self.state.grads.release(buffer)
                return done
            await asyncio.to_thread(self._locked, self.state.load, buffer)
            self._upload_ledger.record(request_id, "upload", self.state.numel)
        await self._notify()
        return self.state.numel

    # ---- membership -----------------------------------------------------------------------

    @property
    def expected(self) -> int:
        """Contributions the open step waits for: the members (at least min_workers)."""
        return max(len(self.roster.members), self.roster.min_workers)

    def check_member(self, worker_id: int, lease: int, generation: int, field: str = "header") -> None:
        """Raise unless `worker_id` holds `lease` in the current roster of this `generation` of
        the job; records the call (a pushing or pulling worker's lease is alive)."""
        if generation != self.generation:
            if generation < self.generation:
                raise ParamServerError(
                    "ABORTED",
                    Reason.JOB_ROLLED_BACK,
                    f"the job was restored to version {self.resume_version} after losing a shard (generation {self.generation}); "
                    f"pull version {self.resume_version} and continue from that step",
                    {"resume_version": self.resume_version, "generation": self.generation},
                )
            raise ParamServerError.invalid(f"{field}.generation", f"{generation} is newer than this shard's ({self.generation})")
        if self.roster.failed:
            raise ParamServerError.precondition(Reason.JOB_FAILED, f"the job failed: {self.roster.failed}")
        if worker_id >= self.max_workers:
            raise ParamServerError.invalid(f"{field}.worker_id", f"must be < max_workers ({self.max_workers})", worker_id=worker_id)
        if lease == 0:
            raise ParamServerError.invalid(f"{field}.lease", "required: the lease JoinJob returned", worker_id=worker_id)
        held = self.roster.lease_of(worker_id)
        if held != lease:
            superseded = held is not None and lease < held
            raise ParamServerError(
                "ABORTED",
                Reason.LEASE_SUPERSEDED if superseded else Reason.LEASE_EXPIRED,
                f"worker {worker_id} rejoined; lease {lease} is an older incarnation"
                if superseded
                else f"worker {worker_id} holds no lease {lease} (it left or its lease expired): join again",
                {"worker_id": worker_id, "current_version": self.state.version},
            )
        self._seen[worker_id] = asyncio.get_running_loop().time()

    def last_seen(self) -> dict[int, float]:
        """Seconds since each worker's last push or pull here."""
        now = asyncio.get_running_loop().time()
        return {w: now - t for w, t in self._seen.items()}

    async def set_roster(self, roster: Roster) -> None:
        """Adopt a newer roster: drop pending contributions of workers that are no longer members
        with that lease, wake waiting pulls, and close the step if it is now complete."""
        if roster.epoch <= self.roster.epoch:
            return
        self.roster = roster
        if self._completing is None:
            self._drop_non_members()
            self._maybe_complete(None)
        await self._notify()

    def _drop_non_members(self) -> None:
        for wid, c in list(self._pending.items()):
            if self.roster.lease_of(wid) != c.lease:
                del self._pending[wid]
                self._push_ledger.forget(self._requests.pop(wid, ""))  # a retry is checked again
                self.state.grads.release(c.buffer)
                log.info("shard %d: dropped worker %d's push (lease %d ended)", self.state.index, wid, c.lease)

    def pushed(self) -> list[int]:
        """The workers whose push of the open step this shard holds."""
        return sorted(self._pending)

    def waiting_for(self) -> list[int]:
        """The members whose push the open step still waits for."""
        return [w for w, _ in self.roster.required(self.state.version) if w not in self._pending]

    def _held(self) -> list[tuple[int, int]]:
        """The members (worker id, lease) whose push of the open step this shard holds."""
        return [(w, lease) for w, lease in self.roster.members if w in self._pending and self._pending[w].lease == lease]

    def _proposal(self) -> list[Contribution] | None:
        """The contributions to reduce now, or None while the step waits: every member's (less
        those the coordinator excused for this step), or, in quorum mode once the grace window
        ran out, those of the members this shard holds (at least min_workers)."""
        roster, version = self.roster, self.state.version
        least = max(roster.min_workers, 1)
        if roster.failed or len(roster.members) < least:
            return None
        held = self._held()
        required = roster.required(version)
        if len(required) >= least and all(m in held for m in required):
            return [self._pending[w] for w, _ in required]
        if roster.grace_s > 0 and roster.excused_step != version and self._grace_over == version and len(held) >= least:
            return [self._pending[w] for w, _ in held]
        return None

    def _arm_grace(self) -> None:
        """Quorum mode: once min_workers members' pushes are in, propose the step with what is
        held after the roster's grace window (once per step, again after a Redo)."""
        roster, version = self.roster, self.state.version
        if roster.grace_s <= 0 or self._grace_armed == version or roster.excused_step == version:
            return
        if len(self._held()) < max(roster.min_workers, 1):
            return
        self._grace_armed = version
        if self._grace_task is not None:
            self._grace_task.cancel()

        async def expire() -> None:
            await asyncio.sleep(roster.grace_s)
            if self._grace_task is not asyncio.current_task():  # re-armed meanwhile (after a Redo)
                return
            if self.state.version == version and self._grace_armed == version and not self._closed:
                self._grace_over = version
                if self._completing is None:
                    self._maybe_complete(None)

        self._grace_task = asyncio.get_running_loop().create_task(expire())

    def _maybe_complete(self, fut: asyncio.Future[PushResult] | None, owner: int = -1) -> None:
        """Start closing the step when every member's push is in; else answer `fut` (the push of
        worker `owner`) PENDING, or ABORTED if its contribution was dropped meanwhile."""
        if fut is not None and owner not in self._pending and not fut.done():
            fut.set_exception(
                ParamServerError(
                    "ABORTED",
                    Reason.LEASE_EXPIRED,
                    f"worker {owner}'s push for step {self.state.version} was discarded: its lease ended before the step closed",
                    {"worker_id": owner, "current_version": self.state.version},
                )
            )
            fut.exception()  # retrieved: a caller that gave up does not leave it unobserved
            fut = None
        chosen = self._proposal() if self._completing is None else None
        if chosen is not None:
            self._completing = asyncio.get_running_loop().create_task(self._complete(self.state.version, chosen, fut, owner))
            return
        if self._completing is None:
            self._arm_grace()
        if fut is not None and not fut.done():
            fut.set_result(PushResult(Outcome.PENDING, self.state.version, len(self._pending), self.expected, None))

    # ---- pushes ---------------------------------------------------------------------------

    async def _push_answer(self, h: PushHeader) -> asyncio.Future[PushResult] | None:
        """Check a push against the step machine: None if it may contribute, or the error that
        says why not."""
        self.check_member(h.worker_id, h.lease, h.generation)
        if not self.state.initialized:
            raise ParamServerError.precondition(Reason.PARAMETERS_NOT_INITIALIZED, "parameters have not been uploaded to this shard yet")
        while self._completing is not None and h.worker_id not in self._pending:  # the step is closing without it
            await asyncio.shield(self._completing)
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

    async def push(self, h: PushHeader, chunks: AsyncIterator[Chunk]) -> PushResult:
        """One worker's gradient for one step: the header is validated before any chunk is read;
        the step's state is checked again when the stream is complete (it may have moved while
        the chunks arrived); the step closes when every member is in."""
        _require_request_id(h.request_id)
        self._check_lrs(h.lrs)
        head = PushPrint(h.worker_id, h.lease, h.step, h.loss_terms, h.lrs)
        entry = self._push_ledger.peek(h.request_id)
        if entry is not None:  # a retry: the same call (content included) gets the first answer
            cast(PushPrint, entry[0]).check(h.request_id, head)
            digest = await self._digest(chunks)
            cast(PushPrint, entry[0]).check(h.request_id, dataclasses.replace(head, digest=digest))
            return await asyncio.shield(entry[1])
        await self._push_answer(h)
        with self.telemetry.time(PHASE, phase="push"):
            buffer, digest = await self._receive(chunks, compressed=True)
        full = dataclasses.replace(head, digest=digest)
        try:
            entry = self._push_ledger.peek(h.request_id)
            if entry is not None:  # a duplicate of this call completed while the chunks arrived
                cast(PushPrint, entry[0]).check(h.request_id, full)
                self.state.grads.release(buffer)
                return await asyncio.shield(entry[1])
            await self._push_answer(h)
        except BaseException:
            self.state.grads.release(buffer)
            raise
        fut: asyncio.Future[PushResult] = asyncio.get_running_loop().create_future()
        self._push_ledger.record(h.request_id, full, fut)
        self._pending[h.worker_id] = Contribution(h.worker_id, h.loss_terms, buffer, h.lease, h.lrs)
        self._requests[h.worker_id] = h.request_id
        self._maybe_complete(fut, h.worker_id)
        return await asyncio.shield(fut)

    def _check_lrs(self, lrs: tuple[float, ...]) -> None:
        """INVALID_ARGUMENT (field header.group_lrs) unless `lrs` is empty or one finite lr >= 0 per group."""
        groups = len(self.state.optimizers)
        if lrs and len(lrs) != groups:
            raise ParamServerError.invalid("header.group_lrs", f"{len(lrs)} values for {groups} parameter group(s) (or none)")
        bad = next((i for i, lr in enumerate(lrs) if not (math.isfinite(lr) and lr >= 0)), None)
        if bad is not None:
            raise ParamServerError.invalid("header.group_lrs", f"group {bad}'s lr {lrs[bad]!r} is not a finite number >= 0")

    async def _reduce(self, stats: ShardStats, step: int) -> Decision | Redo:
        """The coordinator's answer for this shard's stats (retried while it cannot be reached)."""
        while True:
            try:
                return await self.reducer.reduce(stats, step)
            except ParamServerError as exc:
                if exc.code != "UNAVAILABLE" or self._closed:
                    raise
                log.warning("shard %d: step %d reduction unavailable (%s); retrying", self.state.index, step, exc)
            except Exception as exc:  # the coordinator is unreachable: retry, the answer is idempotent
                if self._closed:
                    raise
                log.warning("shard %d: step %d reduction failed (%s); retrying", self.state.index, step, exc)
            await asyncio.sleep(REDUCE_RETRY_S)

    async def _complete(
        self, step: int, contributions: list[Contribution], fut: asyncio.Future[PushResult] | None, owner: int = -1
    ) -> None:
        """Reduce, agree with the other shards through the coordinator, apply, publish. The
        contributions are kept until the coordinator agrees that every shard reduced the same
        (worker, lease) pairs; on a :class:`Redo` the step waits for the members again."""
        try:
            with self.telemetry.time(PHASE, phase="reduce"):
                stats = await asyncio.to_thread(self._locked, self.state.reduce, contributions, keep=True)
            with self.telemetry.time(PHASE, phase="decision"):
                decision = await self._reduce(dataclasses.replace(stats, generation=self.generation), step)
            if isinstance(decision, Redo):
                self._completing = None
                if decision.roster.epoch > self.roster.epoch:
                    self.roster = decision.roster
                if self.roster.excused_step != step:  # no agreement on a quorum: wait a grace window again
                    self._grace_armed = self._grace_over = -1
                self._drop_non_members()
                self._maybe_complete(fut, owner)
                return
            self.state.settle(contributions)
            used = {c.worker_id for c in contributions}
            for w, c in list(self._pending.items()):  # quorum mode: pushes of members the step closed without
                if w not in used:
                    del self._pending[w]
                    self.state.grads.release(c.buffer)
            with self.telemetry.time(PHASE, phase="update"):
                report = await asyncio.to_thread(self._locked, self._apply_observed, decision)
            self._pending.clear()
            self._requests.clear()
            self._completing = None
            if fut is not None and owner not in used:  # quorum mode: its push was left out, like a late one
                fut.set_exception(
                    ParamServerError(
                        "ABORTED",
                        Reason.STEP_ALREADY_APPLIED,
                        f"step {step} closed without worker {owner}'s push (quorum, grace window over); "
                        f"the current version is {self.state.version}",
                        {"current_version": self.state.version, "step": step},
                    )
                )
                fut.exception()
            elif fut is not None:
                fut.set_result(PushResult(report.outcome, self.state.version, len(contributions), self.expected, report))
            with self.telemetry.time(PHASE, phase="publish"):
                await self._notify()
        except BaseException as exc:
            self._completing = None
            if fut is not None and not fut.done():
                fut.set_exception(
                    exc if isinstance(exc, Exception) else ParamServerError("UNAVAILABLE", Reason.SERVICE_UNAVAILABLE, "shard stopping")
                )
            log.exception("shard %d: step %d failed", self.state.index, step)
            if not isinstance(exc, Exception):
                raise

    def _apply(self, decision: Decision) -> StepReport:
        report = self.state.apply(decision)
        self._cache.clear()  # a new version
        return report

    def _apply_observed(self, decision: Decision) -> StepReport:
        """_apply, measuring the optimizer's health (paramserver.optimizer_health) on sampled steps."""
        if not (decision.apply and sampled(decision.step)):
            return self._apply(decision)
        probe = HealthProbe(self.state)
        report = self._apply(decision)
        self.telemetry.extra["health"] = probe.finish(decision.step)
        return report

    # ---- pulls ----------------------------------------------------------------------------

    async def wait_version(self, min_version: int, timeout: float | None = None) -> None:
        """Wait until parameters exist and version >= min_version, at most `timeout` seconds:
        then DEADLINE_EXCEEDED (STEP_WAITING_FOR_WORKERS) naming the workers the step waits for."""

        def ready() -> bool:
            return self._closed or bool(self.roster.failed) or (self.state.initialized and self.state.version >= min_version)

        try:
            async with asyncio.timeout(timeout if timeout is not None else MAX_PULL_WAIT_S), self._published:
                await self._published.wait_for(ready)
        except TimeoutError:
            raise self._waiting_error(min_version) from None
        if self._closed:
            raise ParamServerError("UNAVAILABLE", Reason.SERVICE_UNAVAILABLE, "the shard is shutting down")
        if self.roster.failed:
            raise ParamServerError.precondition(Reason.JOB_FAILED, f"the job failed: {self.roster.failed}")

    def _waiting_error(self, min_version: int) -> ParamServerError:
        version = self.state.version
        if not self.state.initialized:
            what = "the parameters have not been uploaded yet"
            waiting: list[int] = []
        else:
            waiting = self.waiting_for()
            members = len(self.roster.members)
            what = f"step {version} waits for workers {waiting}" if waiting else f"step {version} is being applied"
            if members < self.roster.min_workers:
                what += f" and for members to join ({members} of at least min_workers={self.roster.min_workers})"
        return ParamServerError(
            "DEADLINE_EXCEEDED",
            Reason.STEP_WAITING_FOR_WORKERS,
            f"version {min_version} was not published within the call's deadline: {what}",
            {"waiting_for": ",".join(str(w) for w in waiting), "current_version": version},
        )

    async def pull(
        self,
        min_version: int,
        dtype: int,
        ranges: Sequence[Span] = (),
        point: int = TRAIN,
        *,
        worker_id: int = 0,
        lease: int = 0,
        generation: int = 0,
        timeout: float | None = None,
        base_version: int | None = None,
    ) -> Pull:
        """The parameters (at `point`) of version >= min_version, encoded in `dtype` (optionally a
        subset of ranges), for a member holding `lease`; waits at most `timeout` seconds. The
        whole-shard encoding is cached per dtype and point until the next version, so several
        workers pulling one version share one encoding. A compressed `dtype` (BROADCAST_DTYPES)
        serves the broadcast values as an update to those of `base_version` (see
        :meth:`_broadcast_pull`)."""
        broadcast = dtype in BROADCAST_DTYPES
        if dtype not in ITEMSIZE and not broadcast:
            raise ParamServerError.invalid("dtype", f"unsupported wire dtype {dtype} for a pull", Reason.DTYPE_UNSUPPORTED)
        if point not in (TRAIN, EVAL):
            raise ParamServerError.invalid("point", f"unknown parameter point {point}")
        if broadcast and (ranges or point != TRAIN):
            raise ParamServerError.invalid(
                "ranges" if ranges else "point", "a compressed pull serves all of the shard's ranges at the TRAIN point"
            )
        self.check_member(worker_id, lease, generation, field="request")
        await self.wait_version(min_version, timeout)
        self.check_member(worker_id, lease, generation, field="request")  # still a member after the wait

        if broadcast:
            return await asyncio.to_thread(self._locked, self._broadcast_pull, dtype, base_version)

        def read() -> Pull:
            state = self.state
            elements = sum(r.length for r in ranges) or state.numel
            key = (dtype, point)
            cached = self._cache.get(key)
            if not ranges and cached is not None and cached[0] == state.version:
                return Pull(state.version, state.last_report, cached[1], elements, state.frozen_parameters())
            pub = state.publication(ranges, point)
            messages: Iterable[bytes] = (m for _, _, m in encode_blocks(pub.blocks, dtype))
            if pub.under_lock:  # views of the state: encode now, and keep it for the version
                messages = list(messages)
                if not ranges:
                    self._cache[key] = (pub.version, messages)
            return Pull(pub.version, state.last_report, messages, elements, state.frozen_parameters())

        return await asyncio.to_thread(self._locked, read)

    def _current_values(self) -> np.ndarray:
        """This shard's parameters, local order, as one fp32 array (a copy)."""
        state = self.state
        out = np.empty(state.numel, dtype=np.float32)
        for offset, values in state.publication((), TRAIN).blocks:
            n = values.numel()
            local = state.local_of(offset, n)
            assert local is not None
            out[local : local + n] = values.detach().to("cpu").numpy()
        return out

    def _broadcast_pull(self, dtype: int, base_version: int | None) -> Pull:
        """A compressed pull (under the state lock): the dtype's broadcast values, moved to this
        version if they are behind, answered as an update to `base_version` or whole (see
        paramserver.broadcast)."""
        state = self.state
        b = self._broadcasts.get(dtype)
        if b is None:
            pieces = []
            for span in state.spans:
                local = state.local_of(span.start, span.length)
                assert local is not None
                pieces.append(Piece(span.start, local, span.length))
            b = self._broadcasts[dtype] = Broadcast.start(dtype, pieces, self._current_values(), state.version)
        elif b.version < state.version:
            b.advance(self._current_values(), state.version)
        return Pull(b.version, state.last_report, b.answer(base_version), state.numel, state.frozen_parameters())

    # ---- snapshots ------------------------------------------------------------------------

    async def snapshot(self, store: SnapshotStore, ref: SnapshotRef, version: int, fault: FaultHook | None = None) -> ShardEntry:
        """Write this shard's part of snapshot `ref` at `version` into `store`; its file entry.

        Waits until `version` is published, then opens the state's snapshot under the lock (the
        only pause: a copy to host memory, or freezing a spilled shard's tiles); the file is
        written on a worker thread while training goes on. ABORTED
        (SNAPSHOT_IN_PROGRESS) if another snapshot is being written; ABORTED with reason
        STEP_ALREADY_APPLIED if this shard has already moved past `version` (the coordinator
        then retries at a later version).
        """
        async with self._capturing(version) as (ranges, ledger):
            name = names.shard_file(self.state.index)

            def take() -> tuple[dict[str, Any], int]:
                self._check_version(version)
                return self.state.open_snapshot(), self.state.applied

            tensors, applied = await asyncio.to_thread(self._locked, take)  # the pause
            try:
                meta = self._snapshot_meta(version, applied, ranges, ledger)
                write = functools.partial(store.write_file, ref, name, tensors, meta, fault or no_fault)
                entry = await asyncio.get_running_loop().run_in_executor(self._writer, write)
            finally:
                copied = self.state.close_snapshot()
                if copied:
                    log.info("shard %d: snapshot at %d copied %d bytes of tiles aside while training", self.state.index, version, copied)
            return self._entry(entry, ranges, applied)

    @contextlib.asynccontextmanager
    async def _capturing(self, version: int) -> AsyncIterator[tuple[list[list[int]], list[dict[str, Any]]]]:
        """One snapshot or replica at a time (else ABORTED SNAPSHOT_IN_PROGRESS), once `version` is
        published: this shard's ranges and the ledger entries the file carries."""
        if self._snapshot_busy:
            raise ParamServerError("ABORTED", Reason.SNAPSHOT_IN_PROGRESS, "a snapshot of this shard is being written")
        self._snapshot_busy = True
        try:
            await self.wait_version(version)
            ranges = [[s.start, s.length] for s in self.state.spans]
            yield ranges, self.ledger_entries(version - LEDGER_STEPS_KEPT)  # on the loop, with the version published
        finally:
            self._snapshot_busy = False

    async def replicate(self, version: int) -> tuple[ShardEntry, ArrayFile]:
        """This shard's state at `version` as the snapshot file it would write, held in memory (a
        replica): copied aside under the lock (the only pause, as a snapshot's) into buffers kept
        for replicas, and neither serialised nor hashed (the entry's digest is
        :data:`~paramserver.manifest.UNHASHED`: the file never reaches a disk). The arrays are
        reused by the next replica: the caller copies them before asking again (Ray does, moving
        them to the coordinator). A resident shard only; ABORTED as :meth:`snapshot`."""
        async with self._capturing(version) as (ranges, ledger):

            def take() -> tuple[dict[str, np.ndarray], int]:
                self._check_version(version)
                return {k: v.numpy() for k, v in self.state.capture(self._replica_buffers).items()}, self.state.applied

            arrays, applied = await asyncio.to_thread(self._locked, take)  # the pause
            held = ArrayFile(arrays, self._snapshot_meta(version, applied, ranges, ledger))
            entry = ShardEntry(-1, names.shard_file(self.state.index), held.size, UNHASHED, (), 0)
            return self._entry(entry, ranges, applied), held

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
            p = cast(PushPrint, fingerprint)
            if p.step < since_step or p.step >= self.state.version or not fut.done() or fut.exception() is not None:
                continue
            r = fut.result()
            report = None if r.report is None else {**dataclasses.asdict(r.report), "outcome": r.report.outcome.value}
            out.append({"request_id": request_id, "worker": p.worker, "lease": p.lease, "step": p.step, "terms": p.terms,
                        "lrs": None if p.lrs is None else list(p.lrs), "outcome": r.outcome.value,
                        "version": r.version, "contributions": r.contributions, "expected": r.expected, "report": report})  # fmt: skip
        return out

    def load_ledger(self, entries: list[dict[str, Any]]) -> None:
        """Remember the answers of pushes made before a snapshot (after a restore), so that a
        retry of one of them gets its first answer."""
        loop = asyncio.get_running_loop()
        for e in entries:
            rep = e.get("report")
            report = None if rep is None else StepReport(**{**rep, "outcome": Outcome(rep["outcome"]),
                                                             "workers": tuple(rep.get("workers", ())),
                                                             "missing_workers": tuple(rep.get("missing_workers", ()))})  # fmt: skip
            fut: asyncio.Future[PushResult] = loop.create_future()
            fut.set_result(PushResult(Outcome(e["outcome"]), e["version"], e["contributions"], e["expected"], report))
            lrs = e.get("lrs")
            # no content digest: it covers one shard's ranges, and a restore may place them anew
            fingerprint = PushPrint(e["worker"], e.get("lease", 0), e["step"], e.get("terms"), None if lrs is None else tuple(lrs))
            self._push_ledger.record(e["request_id"], fingerprint, fut)

    # ---- lifecycle --------------------------------------------------------------------------

    async def close(self) -> None:
        """Wake every waiter with UNAVAILABLE and release the state's files."""
        self._closed = True
        if self._grace_task is not None:
            self._grace_task.cancel()
        self._writer.shutdown(wait=False)
        await self._notify()
        await asyncio.to_thread(self._locked, self.state.close)

    async def _notify(self) -> None:
        async with self._published:
            self._published.notify_all()

    def _locked(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        with self.state.lock:
            return fn(*args, **kwargs)


def iterate_in_thread(messages: Iterable[bytes], batch: int = 2) -> AsyncIterator[bytes]:
    """Yield messages produced by a blocking iterator (a spilled shard's reads) from a thread."""
    it: Iterator[bytes] = iter(messages)

    async def gen() -> AsyncIterator[bytes]:
        while True:
            got = await asyncio.to_thread(lambda: [m for _, m in zip(range(batch), it, strict=False)])
            if not got:
                return
            for m in got:
                yield m

    return gen()


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):  # Linux: per-thread nice
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _require_request_id(request_id: str) -> None:
    if not request_id:
        raise ParamServerError.invalid("header.request_id", "must not be empty (every mutating call carries a request id)")
