"""Fixtures of the fuzz tier: one in-process service per test module (tests/service/harness.py: the
real JobServicer, coordinator and ShardHosts with their grpc.aio ports on loopback; no Ray), run on
an event loop of its own in a background thread, so that synchronous hypothesis tests drive it.

Every case sends raw bytes (no client library, no serializer: bytes that do not decode reach the
server), unary calls through a grpc.aio channel and client streams through the synchronous client
(see :meth:`FuzzService.client_stream`), and checks the properties of the fuzz tier:

* the status is never INTERNAL or UNKNOWN, and no call hangs (every call has a deadline of a few
  seconds; DEADLINE_EXCEEDED only for a pull that legitimately waits for a version);
* every error carries a google.rpc.Status whose details hold an ErrorInfo (domain "paramserver")
  with a reason;
* a rejected call changes nothing: the reference job "ref" (2 shards, 2 members, one applied step,
  a snapshot) and the job "upl" (awaiting its upload) look the same through GetJob, ListJobs,
  ListSnapshots, a pull of every shard and a read of every shard's tensors (optimizer state
  included) and pending pushes, before and after. A call that succeeded may change them: the
  service is then brought back to its reference shape (jobs the case created deleted, extra members
  removed, a deleted reference job created again...) and that becomes the new baseline;
* after the module's cases the service still trains (:meth:`FuzzService.still_trains`).

test_fuzz_auth.py runs the same checks on a service that requires credentials (FuzzService's
`auth`): the harness's own calls then carry an admin token or the job's worker token, and a
:class:`HeaderProxy` relays calls whose ``authorization`` value holds bytes no gRPC client sends.

Environment: PARAMSERVER_FUZZ_EXAMPLES (examples per test, default 30: the whole directory in well
under a minute on 2 cores), PARAMSERVER_FUZZ_RANDOM=1 (a new random seed per run instead of the
derandomized default), PARAMSERVER_FUZZ_STRICT=1 (no tolerance for the known bugs listed in
:data:`KNOWN_BUGS`). The number of cases per method and the statuses seen are printed at the end of
the session (and written, one line per method / kind / status / reason / field, to the file the
summary names).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

from paramserver.access import AuthConfig
from paramserver.jobconfig import MAX_DIMENSION, MAX_DIMS, MAX_JOB_ELEMENTS, MAX_PARAM_ELEMENTS, MAX_PARAMETERS
from paramserver.rpc import GRPC_OPTIONS
from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client.aio import make_spec
from paramserver_client.codec import FLOAT32, encode_chunk_message
from paramserver_client.reasons import DOMAIN
from tests.service.harness import InProcessService

# Hypothesis writes nothing into the repository (no example database; its caches go to a temp dir).
set_hypothesis_home_dir(Path(tempfile.mkdtemp(prefix="ps-hypothesis-")))

EXAMPLES = int(os.environ.get("PARAMSERVER_FUZZ_EXAMPLES", "30"))
RANDOM = os.environ.get("PARAMSERVER_FUZZ_RANDOM", "") not in ("", "0")
STRICT = os.environ.get("PARAMSERVER_FUZZ_STRICT", "") not in ("", "0")

#: The settings of every fuzz test.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not RANDOM,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
#: pytest-timeout per fuzz test, scaled with the number of examples.
TIMEOUT = pytest.mark.timeout(max(300, 2 * EXAMPLES))

#: Deadlines of the fuzzed calls, seconds: most calls; a pull that may wait for its version; calls
#: that start shards or write snapshots.
CALL_S, WAIT_S, SLOW_S = 5.0, 0.5, 20.0

JOB_SERVICE = jpb.DESCRIPTOR.services_by_name["JobService"]
SHARD_SERVICE = spb.DESCRIPTOR.services_by_name["ShardService"]

REF, UPL, FOREIGN = "ref", "upl", "foreign"
OBSERVER, OBSERVER2 = "observer", "observer-2"
SHAPES = [("w", (10, 13)), ("b", (13,))]
TOTAL = 143
HYPER = {"lr": 0.01}

# ---- what the session saw ----------------------------------------------------------------------------

CASES: Counter[str] = Counter()
"""Cases tried, by "Service.Method"."""
OUTCOMES: Counter[tuple[str, str, str, str, str]] = Counter()
"""(method, kind of malformation, status, reason, field) -> cases."""
FIRST_MESSAGE: dict[tuple[str, str, str, str, str], str] = {}
"""The message of the first answer of each OUTCOMES key (for the report)."""
TOLERATED: Counter[str] = Counter()
"""Cases that hit a known bug (see KNOWN_BUGS), by bug id."""


@dataclass(frozen=True)
class KnownBug:
    """A server bug this tier found and reported, outside the files it may change: its cases are
    counted (and printed) instead of failing, unless PARAMSERVER_FUZZ_STRICT=1."""

    id: str
    description: str
    match: Callable[[str, Outcome], bool]


KNOWN_BUGS: list[KnownBug] = []
"""None open: over-long or NUL-containing snapshot paths (INTERNAL) and errors quoting huge fields
(RESOURCE_EXHAUSTED without a reason) were fixed; add one here only with its issue."""


@dataclass
class Outcome:
    """What a call answered."""

    code: grpc.StatusCode
    reason: str = ""
    domain: str = ""
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    responses: list[bytes] = field(default_factory=list)
    has_status: bool = False

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason} {self.metadata} {self.message[:300]!r}"


def outcome_of(err: Any) -> Outcome:
    """An error's status, reason and metadata, parsed from the trailing grpc-status-details-bin."""
    out = Outcome(err.code(), message=err.details() or "")
    trailing = err.trailing_metadata() or ()
    raw = next((v for k, v in trailing if k == "grpc-status-details-bin"), None)
    if isinstance(raw, bytes):
        status = status_pb2.Status.FromString(raw)
        out.has_status = True
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                out.reason, out.domain, out.metadata = info.reason, info.domain, dict(info.metadata)
                break
    return out


def kind_label(kind: str) -> str:
    """Mixed mutation lists share one label in the summary."""
    prefix, _, rest = kind.partition(":")
    return f"{prefix}:mixed" if "+" in rest else kind


def record(method: str, kind: str, outcome: Outcome) -> None:
    CASES[method] += 1
    key = (method, kind_label(kind), outcome.code.name, outcome.reason, outcome.metadata.get("field", ""))
    OUTCOMES[key] += 1
    FIRST_MESSAGE.setdefault(key, " ".join(outcome.message.split())[:160])


# ---- the service on a loop of its own ----------------------------------------------------------------

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a daemon thread; :meth:`run` blocks on one coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-service-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """The coroutine's result; a hang is a failure (TimeoutError) after `timeout` seconds."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"the case did not finish within {timeout} s: a hang") from None

    def close(self) -> None:
        """Cancel what is left on the loop (the coordinator's watcher), then stop it."""

        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(cancel_rest(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def too_big_to_create(raw: bytes) -> bool:
    """Whether a CreateJob request would be accepted and then allocate more than a test may (big
    models, many shards, many preallocated gradient files): such a case is not sent. Requests over
    the limits, which the service refuses before allocating anything, are sent."""
    try:
        req = jpb.CreateJobRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - refused by the service
        return False
    spec = req.spec
    members = max(spec.num_workers, spec.min_workers, spec.max_workers)
    if spec.shard_memory_budget_bytes and members > 16:  # a spilled shard preallocates members + 1 gradient files
        return True
    if req.restore_from:
        return 8 < spec.num_shards <= 1 << 20
    if len(spec.parameters) > MAX_PARAMETERS:
        return False
    total = 0
    for p in spec.parameters:
        shape = list(p.shape)
        if len(shape) > MAX_DIMS or any(not 1 <= d <= MAX_DIMENSION for d in shape):
            return False
        n = int(np.prod(shape, dtype=object)) if shape else 1
        if n > MAX_PARAM_ELEMENTS:
            return False
        total += n
    if total > MAX_JOB_ELEMENTS:
        return False
    return total > 1 << 20 or 8 < spec.num_shards <= total


#: Call metadata: (key, value) pairs.
Metadata = Sequence[tuple[str, str | bytes]]


def bearer_metadata(token: str) -> Metadata:
    """The metadata carrying `token` (none for no token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class FuzzService:
    """The in-process service, its reference jobs and the checks every case makes. With `auth`
    (tests/fuzz/test_fuzz_auth.py) the service requires credentials: the harness's own calls carry
    `admin_token` on the front door (a JoinJob, the job's worker token) and each job's worker token
    on its shards, and :meth:`observe` also covers every job's tenant, tokens and members."""

    def __init__(self, root: Path, auth: AuthConfig | None = None, admin_token: str = "") -> None:
        self.loop = LoopThread()
        self.svc = InProcessService(root, auth=auth)
        self.admin_token = admin_token
        self.worker_tokens: dict[str, str] = {}
        """The worker token of each job the harness created (its CreateJob answer's)."""
        self.proxies: dict[str, HeaderProxy] = {}
        """Relays that put raw bytes into header values, by the address they relay to."""
        self.raw_values: dict[bytes, tuple[bytes, bytes]] = {}
        """A placeholder's first RAW_HEAD bytes -> (the placeholder, the bytes the relays send
        instead); see :meth:`raw_header`."""
        self.channels: dict[str, aio.Channel] = {}
        self.sync_channels: dict[str, grpc.Channel] = {}
        self.ctx: dict[str, Any] = {}
        self.baseline: dict[str, Any] = {}
        self.creations = 0

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return self.loop.run(coro, timeout)

    # ---- raw calls --------------------------------------------------------------------------------

    def _channel(self, address: str) -> aio.Channel:
        if address not in self.channels:
            self.channels[address] = aio.insecure_channel(address, options=GRPC_OPTIONS)
        return self.channels[address]

    async def unary(
        self, address: str, path: str, raw: bytes, timeout: float, server_stream: bool = False, metadata: Metadata = ()
    ) -> Outcome:
        """One unary (or server-streaming) call with raw request bytes (and `metadata`)."""
        ch = self._channel(address)
        md = tuple(metadata) or None
        try:
            if server_stream:
                call = ch.unary_stream(path, request_serializer=None, response_deserializer=None)
                responses = [r async for r in call(raw, timeout=timeout, metadata=md)]
                return Outcome(grpc.StatusCode.OK, responses=responses)
            fn = ch.unary_unary(path, request_serializer=None, response_deserializer=None)
            return Outcome(grpc.StatusCode.OK, responses=[await fn(raw, timeout=timeout, metadata=md)])
        except grpc.aio.AioRpcError as err:
            return outcome_of(err)

    async def client_stream(self, address: str, path: str, messages: Sequence[bytes], timeout: float, metadata: Metadata = ()) -> Outcome:
        """One client-stream call with raw messages, made by the synchronous gRPC client in a
        thread: the asyncio client loses the server's status when the server ends the call while
        a write is still in flight (it answers INTERNAL "Internal error from Core" instead;
        grpc/grpc#36066), which would hide what the server answered."""
        if address not in self.sync_channels:
            self.sync_channels[address] = grpc.insecure_channel(address, options=GRPC_OPTIONS)
        fn = self.sync_channels[address].stream_unary(path, request_serializer=None, response_deserializer=None)

        md = tuple(metadata) or None

        def call() -> Outcome:
            try:
                return Outcome(grpc.StatusCode.OK, responses=[fn(iter(messages), timeout=timeout, metadata=md)])
            except grpc.RpcError as err:
                return outcome_of(err)

        return await asyncio.to_thread(call)

    def job_metadata(self, job_id: str) -> Metadata:
        """The metadata of the harness's calls on a job's shards (its worker token, if any)."""
        return bearer_metadata(self.worker_tokens.get(job_id, ""))

    async def job_call(self, method: str, request: Message, timeout: float = SLOW_S, token: str | None = None) -> Any:
        """A well-formed JobService call for the harness itself (with `token`, by default the
        admin token); raises on an error."""
        m = JOB_SERVICE.methods_by_name[method]
        md = bearer_metadata(self.admin_token if token is None else token)
        out = await self.unary(self.svc.address, method_path(m), request.SerializeToString(), timeout, m.server_streaming, md)
        if not out.ok:
            raise AssertionError(f"harness call {method} failed: {out}")
        cls = message_factory.GetMessageClass(m.output_type)
        return [cls.FromString(r) for r in out.responses] if m.server_streaming else cls.FromString(out.responses[0])

    async def get_job(self, job_id: str) -> jpb.Job:
        job: jpb.Job = await self.job_call("GetJob", jpb.GetJobRequest(job_id=job_id))
        return job

    async def pull(self, job: jpb.Job, shard: int, worker_id: int, lease: int) -> list[bytes]:
        """A shard's parameters at the job's version: the answer's messages (header, chunks)."""
        req = pull_request(job, worker_id, lease)
        out = await self.unary(job.shards[shard].address, method_path(SHARD_SERVICE.methods_by_name["PullParameters"]), req, CALL_S, True,
                               self.job_metadata(job.job_id))  # fmt: skip
        if not out.ok:
            raise AssertionError(f"harness pull of shard {shard} of {job.job_id} failed: {out}")
        return out.responses

    async def push(self, job: jpb.Job, shard: int, worker_id: int, lease: int, step: int, grad: np.ndarray, terms: int) -> Outcome:
        """A well-formed push of one worker's gradient to one shard."""
        header = spb.PushHeader(job_id=job.job_id, worker_id=worker_id, step=step, request_id=uuid.uuid4().hex, loss_terms=terms,
                                lease=lease, generation=job.generation)  # fmt: skip
        messages = [spb.PushGradientsRequest(header=header).SerializeToString()]
        messages += chunks_of(job.shards[shard], grad)
        return await self.client_stream(
            job.shards[shard].address,
            method_path(SHARD_SERVICE.methods_by_name["PushGradients"]),
            messages,
            SLOW_S,
            self.job_metadata(job.job_id),
        )

    async def upload(self, job: jpb.Job, values: np.ndarray) -> None:
        for shard in job.shards:
            messages = [spb.UploadParametersRequest(header=spb.UploadHeader(job_id=job.job_id, request_id=uuid.uuid4().hex))]
            raw = [messages[0].SerializeToString(), *chunks_of(shard, values)]
            path = method_path(SHARD_SERVICE.methods_by_name["UploadParameters"])
            out = await self.client_stream(shard.address, path, raw, SLOW_S, self.job_metadata(job.job_id))
            assert out.ok, f"harness upload failed: {out}"

    async def step(self, job: jpb.Job, members: Sequence[tuple[int, int]], seed: int) -> list[Outcome]:
        """Every member pushes the job's current version to every shard (members in order; each
        member's pushes together, since the last one's wait for every shard's reduction)."""
        rng = np.random.default_rng(seed)
        outs: list[Outcome] = []
        for wid, lease in members:
            grad = rng.standard_normal(TOTAL).astype(np.float32)
            outs += await asyncio.gather(*(self.push(job, i, wid, lease, job.version, grad, 1 + wid) for i in range(len(job.shards))))
        assert all(o.ok for o in outs), [str(o) for o in outs]
        return outs

    # ---- the reference jobs ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.svc.start()
        await self._create_foreign()
        await self._create_ref()
        await self._create_upl()
        await self.refresh()
        self.baseline = await self.observe()

    async def _create(self, job_id: str, shapes: Sequence[tuple[str, Sequence[int]]], token: str | None = None, **settings: Any) -> jpb.Job:
        """Create a job (with `token`, by default the admin token); its worker token is kept."""
        self.creations += 1
        spec = make_spec(shapes, optimizer="adamw", hyperparameters=HYPER, **settings)
        req = jpb.CreateJobRequest(request_id=uuid.uuid4().hex, job_id=job_id, spec=spec)
        job: jpb.Job = await self.job_call("CreateJob", req, token=token)
        if job.worker_token:
            self.worker_tokens[job_id] = job.worker_token
        return job

    async def join(self, job_id: str, name: str) -> tuple[int, int]:
        """Join with the job's worker token when it has one (an admin's JoinJob would issue yet
        another token each time, up to the job's limit)."""
        req = jpb.JoinJobRequest(request_id=uuid.uuid4().hex, job_id=job_id, worker_name=name)
        r = await self.job_call("JoinJob", req, token=self.worker_tokens.get(job_id) or None)
        return int(r.worker_id), int(r.lease)

    async def _create_foreign(self) -> None:
        """A job of another model, snapshotted and deleted: its snapshot stays (a foreign snapshot)."""
        job = await self._create(FOREIGN, [("x", (5,))], num_workers=1, num_shards=1)
        await self.join(FOREIGN, "f")
        await self.upload(job, np.arange(5, dtype=np.float32))
        snap = await self.job_call("CreateSnapshot", jpb.CreateSnapshotRequest(request_id=uuid.uuid4().hex, job_id=FOREIGN))
        self.ctx["foreign_snapshot"] = snap.path
        await self.job_call("DeleteJob", jpb.DeleteJobRequest(request_id=uuid.uuid4().hex, job_id=FOREIGN))

    async def _create_ref(self) -> None:
        """The reference job: 2 shards, members `observer` and `observer-2`, step 0 applied, a snapshot."""
        job = await self._create(REF, SHAPES, num_workers=2, num_shards=2, max_workers=3, worker_timeout_s=3600.0)
        a = await self.join(REF, OBSERVER)
        b = await self.join(REF, OBSERVER2)
        await self.upload(job, np.linspace(-1, 1, TOTAL, dtype=np.float32))
        await self.step(await self.get_job(REF), [a, b], seed=self.creations)
        await self.job_call("CreateSnapshot", jpb.CreateSnapshotRequest(request_id=uuid.uuid4().hex, job_id=REF))

    async def _create_upl(self) -> None:
        """A job awaiting its parameters (uploads reach their checks here)."""
        await self._create(UPL, SHAPES, num_workers=1, num_shards=2)

    async def refresh(self) -> None:
        """The context the cases' placeholders are taken from."""
        job = await self.get_job(REF)
        by_name = {m.name: m for m in job.members}
        snaps = await self.job_call("ListSnapshots", jpb.ListSnapshotsRequest(job_id=REF))
        upl = await self.get_job(UPL)
        self.ctx.update(
            job=REF,
            other_job=UPL,
            foreign_job=FOREIGN,
            observer_name=OBSERVER,
            observer_name2=OBSERVER2,
            worker_id=by_name[OBSERVER].worker_id,
            lease=by_name[OBSERVER].lease,
            worker_id2=by_name[OBSERVER2].worker_id,
            lease2=by_name[OBSERVER2].lease,
            version=job.version,
            generation=job.generation,
            snapshot=snaps.snapshots[-1].path if snaps.snapshots else "",
            snapshot_root=str(self.svc.snapshot_dir),
            lrs=[0.01] * len(job.groups),
            total=job.total_elements,
            jobs={REF: job, UPL: upl},
        )
        live = {self.svc.address}
        for job_id in list(self.svc.coordinator.jobs):
            live |= {h.address for h in await self.svc.handles(job_id)}
        for target in [t for t in self.proxies if t not in live]:
            await self.proxies.pop(target).close()
        live |= {p.address for p in self.proxies.values()}
        for address in [a for a in self.channels if a not in live]:  # shards of jobs deleted since
            await self.channels.pop(address).close(None)
        for address in [a for a in self.sync_channels if a not in live]:
            self.sync_channels.pop(address).close()

    def case_ctx(self, job_id: str = REF, shard: int = 0) -> dict[str, Any]:
        """The context of one case whose target is `shard` of `job_id` (the job others name)."""
        job: jpb.Job = self.ctx["jobs"][job_id]
        s = job.shards[shard % len(job.shards)]
        start, length = int(s.ranges[0].start), int(s.ranges[0].length)
        other = UPL if job_id == REF else REF
        return {
            **self.ctx,
            "job": job_id,
            "other_job": other,
            "fresh_job": f"fz-{uuid.uuid4().hex[:10]}",
            "request_id": uuid.uuid4().hex,
            "address": s.address,
            "shard": s.index,
            "spans": [(int(r.start), int(r.length)) for r in s.ranges],
            "shard_start": start,
            "shard_len": length,
            "shard_end": start + length,
            "shard_version": int(s.version),
            "shard_initialized": bool(s.initialized),
        }

    async def observe(self) -> dict[str, Any]:
        """Everything a rejected call must leave as it was."""
        listed = await self.job_call("ListJobs", jpb.ListJobsRequest())
        out: dict[str, Any] = {"jobs": sorted(j.job_id for j in listed.jobs)}
        for job_id in (REF, UPL):
            if job_id not in out["jobs"]:  # deleted by a case that succeeded (settle creates it again)
                continue
            job = await self.get_job(job_id)
            out[job_id] = summary(job)
            out[f"{job_id} tensors"] = [{k: v.tobytes() for k, v in t.items()} for t in await self.svc.tensors(job_id)]
            out[f"{job_id} pending"] = [sorted(getattr(h.host.runtime, "_pending", {})) for h in await self.svc.handles(job_id)]
            a = next((m for m in job.members if m.name == OBSERVER), None)
            if job_id == REF and a is not None:  # (a case that succeeded may have made it leave)
                out["ref pulls"] = [await self.pull(job, i, a.worker_id, a.lease) for i in range(len(job.shards))]
        snaps = await self.job_call("ListSnapshots", jpb.ListSnapshotsRequest(job_id=REF))
        out["ref snapshots"] = [s.path for s in snaps.snapshots]
        if self.svc.auth is not None:  # every tenant's jobs, their tokens and members
            coordinator = self.svc.coordinator
            out["owners"] = dict(sorted(coordinator.owners.items()))
            out["secured jobs"] = {
                j.job_id: (j.tenant, j.membership.tokens, sorted((w, m.lease, m.lost) for w, m in j.membership.members.items()))
                for j in sorted(coordinator.jobs.values(), key=lambda j: j.job_id)
            }
        return out

    async def settle(self) -> None:
        """Bring the service back to its reference shape after a call that succeeded: jobs a case
        created are deleted, the reference jobs exist (created again if deleted), `ref` has exactly
        its two observers with nothing pending, `upl` awaits its upload."""
        listed = await self.job_call("ListJobs", jpb.ListJobsRequest())
        jobs = {j.job_id for j in listed.jobs}
        for j in sorted(jobs - {REF, UPL}):
            await self.job_call("DeleteJob", jpb.DeleteJobRequest(request_id=uuid.uuid4().hex, job_id=j))
        if REF not in jobs:
            await self._create_ref()
        else:
            job = await self.get_job(REF)
            pending = {w for h in await self.svc.handles(REF) for w in getattr(h.host.runtime, "_pending", {})}
            for m in job.members:
                if m.name not in (OBSERVER, OBSERVER2) or m.worker_id in pending:
                    await self.job_call("LeaveJob", jpb.LeaveJobRequest(request_id=uuid.uuid4().hex, job_id=REF, worker_id=m.worker_id))
            names = {m.name for m in (await self.get_job(REF)).members}
            for name in (OBSERVER, OBSERVER2):
                if name not in names:
                    await self.join(REF, name)
        upl = None if UPL not in jobs else await self.get_job(UPL)
        if upl is None or any(s.initialized for s in upl.shards):
            if upl is not None:
                await self.job_call("DeleteJob", jpb.DeleteJobRequest(request_id=uuid.uuid4().hex, job_id=UPL))
            await self._create_upl()
        await self.refresh()

    # ---- cases ----------------------------------------------------------------------------------

    def case(
        self,
        method: str,
        kind: str,
        send: Callable[[], Awaitable[Outcome]],
        *,
        read_only: bool,
        may_wait: bool = False,
        prime: Callable[[], Awaitable[Outcome]] | None = None,
    ) -> Outcome:
        """Run one case and check its properties (see the module docstring). `prime` is a call
        made first, not checked: when it succeeds, the state it leaves is the baseline the case
        must not change when it is rejected."""
        return self.run(self._case(method, kind, send, read_only, may_wait, prime))

    async def _case(
        self,
        method: str,
        kind: str,
        send: Callable[[], Awaitable[Outcome]],
        read_only: bool,
        may_wait: bool,
        prime: Callable[[], Awaitable[Outcome]] | None,
    ) -> Outcome:
        primed = False
        if prime is not None and (await prime()).ok:
            primed = True
            self.baseline = await self.observe()
        outcome = await send()
        record(method, kind, outcome)
        check_status(method, outcome, may_wait)
        after = await self.observe()
        if not outcome.ok or read_only:
            assert_same(self.baseline, after, f"{method} answered {outcome}")
        if (outcome.ok and not read_only) or primed:
            await self.settle()
            self.baseline = await self.observe()
        return outcome

    # ---- the end --------------------------------------------------------------------------------

    async def still_trains(self) -> None:
        """A normal step on the reference job (both members push, every shard's new version is
        pulled) and on a job created now (create, join, upload, push, pull)."""
        await self.settle()
        job = await self.get_job(REF)
        by_name = {m.name: m for m in job.members}
        a, b = by_name[OBSERVER], by_name[OBSERVER2]
        before = [await self.pull(job, i, a.worker_id, a.lease) for i in range(len(job.shards))]
        outs = await self.step(job, [(a.worker_id, a.lease), (b.worker_id, b.lease)], seed=job.version + 1000)
        last = spb.PushGradientsResponse.FromString(outs[-1].responses[0])
        assert last.outcome == spb.STEP_OUTCOME_APPLIED, last
        after = await self.get_job(REF)
        assert after.version == job.version + 1, (job.version, after.version)
        pulled = [await self.pull(after, i, a.worker_id, a.lease) for i in range(len(after.shards))]
        assert pulled != before
        for blob in pulled:
            values = decode_chunks(blob)
            assert values.size and np.isfinite(values).all()
        fresh = f"final-{uuid.uuid4().hex[:8]}"
        created = await self._create(fresh, SHAPES, num_workers=1, num_shards=2)
        wid, lease = await self.join(fresh, "w")
        await self.upload(created, np.ones(TOTAL, dtype=np.float32))
        outs = await self.step(await self.get_job(fresh), [(wid, lease)], seed=7)
        assert spb.PushGradientsResponse.FromString(outs[-1].responses[0]).outcome == spb.STEP_OUTCOME_APPLIED
        done = await self.get_job(fresh)
        assert done.version == 1
        for i in range(len(done.shards)):
            assert decode_chunks(await self.pull(done, i, wid, lease)).size
        await self.job_call("DeleteJob", jpb.DeleteJobRequest(request_id=uuid.uuid4().hex, job_id=fresh))
        await self.refresh()
        self.baseline = await self.observe()

    # ---- raw header bytes -----------------------------------------------------------------------

    def raw_header(self, value: bytes) -> str:
        """A placeholder header value that the relay of :meth:`relayed` replaces by `value` (any
        bytes: non-ASCII, control characters; gRPC clients refuse to send them, a raw HTTP/2 peer
        can). At least :data:`MIN_RAW_HEADER` bytes (the placeholder's length is the value's)."""
        if len(value) < MIN_RAW_HEADER:
            raise ValueError(f"a raw header value needs at least {MIN_RAW_HEADER} bytes")
        head = b"%s%06x" % (RAW_MARK, len(self.raw_values))
        placeholder = head + b"_" * (len(value) - len(head))
        self.raw_values[head] = (placeholder, value)
        return placeholder.decode()

    async def relayed(self, address: str) -> str:
        """The address of a relay to `address` that swaps the placeholders of :meth:`raw_header`."""
        if address not in self.proxies:
            proxy = HeaderProxy(address, self.raw_values)
            await proxy.start()
            self.proxies[address] = proxy
        return self.proxies[address].address

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close(None)
        for sync in self.sync_channels.values():
            sync.close()
        for proxy in self.proxies.values():
            await proxy.close()
        await self.svc.close()


#: The start of every raw header placeholder; its first RAW_HEAD bytes (the mark and a serial
#: number) name it; it is at least MIN_RAW_HEADER bytes long.
RAW_MARK = b"ZqXj"
RAW_HEAD = MIN_RAW_HEADER = len(RAW_MARK) + 6


class HeaderProxy:
    """A TCP relay to `target` that replaces, in what clients send, each registered placeholder by
    its raw bytes (as long as the placeholder: HTTP/2 frame lengths and HPACK table sizes stay
    right). gRPC's HPACK encoder writes header values as plain literals (no Huffman coding), so a
    placeholder travels verbatim. The server's answers pass unchanged."""

    def __init__(self, target: str, values: Mapping[bytes, tuple[bytes, bytes]]) -> None:
        self.target = target
        self.values = values
        self.address = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = self.target.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        pipes = [asyncio.ensure_future(self._pipe(reader, up_writer, True)), asyncio.ensure_future(self._pipe(up_reader, writer, False))]
        self._tasks.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._tasks.difference_update(pipes)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rewrite: bool) -> None:
        held = b""  # the end of what arrived, when it may be the start of a placeholder
        try:
            while True:
                try:
                    data = await (asyncio.wait_for(reader.read(1 << 16), 0.05) if held else reader.read(1 << 16))
                except TimeoutError:  # nothing more came: it was no placeholder
                    data, held = held, b""
                    writer.write(data)
                    await writer.drain()
                    continue
                if not data:
                    writer.write(held)
                    break
                buf = held + data
                buf, held = self._swap(buf) if rewrite else (buf, b"")
                writer.write(buf)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _swap(self, buf: bytes) -> tuple[bytes, bytes]:
        """`buf` with its placeholders replaced, and the tail to hold (a placeholder's start)."""
        out, i = bytearray(), 0
        while (j := buf.find(RAW_MARK, i)) >= 0:
            out += buf[i:j]
            if len(buf) - j < RAW_HEAD:  # cut short: wait for the rest
                return bytes(out), buf[j:]
            placeholder, value = self.values.get(buf[j : j + RAW_HEAD], (b"", b""))
            if placeholder and buf[j : j + len(placeholder)] == placeholder:
                out += value
                i = j + len(placeholder)
            elif placeholder and placeholder.startswith(buf[j:]):
                return bytes(out), buf[j:]
            else:  # not one of ours
                out += RAW_MARK
                i = j + len(RAW_MARK)
        tail = buf[i:]
        cut = next((k for k in range(max(0, len(tail) - len(RAW_MARK) + 1), len(tail)) if RAW_MARK.startswith(tail[k:])), len(tail))
        return bytes(out + tail[:cut]), tail[cut:]


def check_status(method: str, out: Outcome, may_wait: bool) -> bool:
    """The status properties of one answer; True when it broke one in a known way (a bug listed
    in KNOWN_BUGS: counted, not failed, unless PARAMSERVER_FUZZ_STRICT=1)."""
    problem = status_problem(method, out, may_wait)
    if problem is None:
        return False
    bug = next((b for b in KNOWN_BUGS if b.match(method, out)), None)
    if bug is None or STRICT:
        raise AssertionError(problem)
    TOLERATED[bug.id] += 1
    return True


def status_problem(method: str, out: Outcome, may_wait: bool) -> str | None:
    """What is wrong with an answer's status, if anything."""
    if out.ok:
        return None
    if out.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return f"{method}: {out.code.name} (a server bug): {out}"
    if "received metadata size exceeds" in out.message:  # gRPC replaced the server's status (its code at least)
        return f"{method}: the answer's trailing metadata is over gRPC's limit: {out}"
    if out.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        if not may_wait:
            return f"{method}: a call that has nothing to wait for ran out of time: {out}"
        if not out.has_status:  # the client's own deadline fired first: no ErrorInfo to check
            return None
    if not out.has_status:
        return f"{method}: an error without google.rpc.Status details: {out}"
    if not out.reason or out.domain != DOMAIN or out.reason != out.reason.upper():
        return f"{method}: an error without an UPPER_SNAKE ErrorInfo reason in domain {DOMAIN!r}: {out}"
    return None


def assert_same(before: Mapping[str, Any], after: Mapping[str, Any], what: str) -> None:
    """Equal observations, naming what changed."""
    if before == after:
        return
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    detail = {k: (_short(before.get(k)), _short(after.get(k))) for k in changed}
    raise AssertionError(f"a rejected (or read-only) call changed the state: {what}; changed: {detail}")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) < 400 else s[:400] + "..."


def summary(job: jpb.Job) -> dict[str, Any]:
    """A job as GetJob shows it, without what time changes (idle_s, memory counters)."""
    return {
        "state": job.state,
        "state_reason": job.state_reason,
        "version": job.version,
        "generation": job.generation,
        "workers": list(job.workers),
        "members": [(m.worker_id, m.name, m.lease, m.lost) for m in job.members],
        "shards": [(s.index, s.address, s.version, s.initialized, [(r.start, r.length) for r in s.ranges]) for s in job.shards],
        "spec": job.spec.SerializeToString(deterministic=True),
        "skipped": dict(job.skipped_steps),
        "recoveries": job.recoveries,
    }


def chunks_of(shard: jpb.ShardInfo, values: np.ndarray, size: int = 64) -> list[bytes]:
    """Chunk messages of `values` (the whole flat space) covering one shard's ranges."""
    out = []
    for r in shard.ranges:
        for a in range(r.start, r.start + r.length, size):
            n = min(size, r.start + r.length - a)
            out.append(encode_chunk_message(a, n, FLOAT32, values[a : a + n].astype("<f4").tobytes()))
    return out


def decode_chunks(responses: Sequence[bytes]) -> np.ndarray:
    """The fp32 values of a pull's chunk messages."""
    out = []
    for raw in responses:
        msg = spb.PullParametersResponse.FromString(raw)
        if msg.WhichOneof("kind") == "chunk":
            out.append(np.frombuffer(msg.chunk.data, dtype="<f4"))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def pull_request(job: jpb.Job, worker_id: int, lease: int) -> bytes:
    """A member's pull of a job's current version."""
    return spb.PullParametersRequest(
        job_id=job.job_id, min_version=job.version, worker_id=worker_id, lease=lease, generation=job.generation
    ).SerializeToString()


def method_path(method: MethodDescriptor) -> str:
    """The gRPC path of a method ("/paramserver.v1.JobService/GetJob")."""
    return f"/{method.containing_service.full_name}/{method.name}"


# ---- fixtures and the session summary ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzService]:
    """The module's service, started once; at the end it must still train."""
    env = FuzzService(tmp_path_factory.mktemp("fuzz"))
    try:
        env.run(env.start())
        yield env
        env.run(env.still_trains())
    finally:
        try:
            env.run(env.close(), timeout=60)
        finally:
            env.loop.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Cases per method and the statuses seen (also in a file, one line per kind of case)."""
    if not CASES:
        return
    tr = terminalreporter
    tr.write_sep("=", f"paramserver fuzz: {sum(CASES.values())} cases (PARAMSERVER_FUZZ_EXAMPLES={EXAMPLES})")
    by_status: dict[str, Counter[str]] = {}
    for (method, _, code, reason, _), n in OUTCOMES.items():
        by_status.setdefault(method, Counter())[f"{code} {reason}".strip()] += n
    for method in sorted(CASES):
        statuses = ", ".join(f"{s} {n}" for s, n in by_status[method].most_common())
        tr.write_line(f"{method:36s} {CASES[method]:6d}  {statuses}")
    for bug, n in sorted(TOLERATED.items()):
        known = next(b for b in KNOWN_BUGS if b.id == bug)
        tr.write_line(f"KNOWN BUG tolerated in {n} cases: {bug}: {known.description}")
    report = Path(tempfile.gettempdir()) / f"paramserver-fuzz-{os.getpid()}-{int(time.time())}.tsv"
    lines = ["method\tkind\tstatus\treason\tfield\tcases\tfirst message"]
    lines += ["\t".join([*key, str(n), FIRST_MESSAGE.get(key, "")]) for key, n in sorted(OUTCOMES.items())]
    report.write_text("\n".join(lines) + "\n")
    tr.write_line(f"every method / kind / status / reason / field: {report}")
