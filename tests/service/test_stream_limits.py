"""A shard's data plane is not exhaustible by many streams or by streams that never end: concurrent
streams are limited per shard and per worker (RESOURCE_EXHAUSTED TOO_MANY_STREAMS), a client stream
that stalls or never ends is cut (DEADLINE_EXCEEDED LIMIT_EXCEEDED), a pull without a deadline
waits within a cap, an endless stream of bad chunks is refused as it arrives, and none of these
changes what the step computes."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import numpy as np
import pytest
from grpc import aio

from paramserver import stream_gate
from paramserver.shard_service import ShardServicer
from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import Reason, ServiceError
from paramserver_client.aio import AsyncWorker
from paramserver_client.codec import FLOAT32, encode_chunk_message
from paramserver_client.errors import from_rpc_error
from tests.service.harness import TIMEOUT_S, InProcessService, torch_adamw

SHAPES = [("w", (10, 13)), ("b", (13,))]
TOTAL = 143
HYPER = {"lr": 0.01}
P0 = np.linspace(-1, 1, TOTAL, dtype=np.float32)
SERVICE = "/paramserver.v1.ShardService"


def grad(step: int, worker: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(100 * step + worker)
    return rng.standard_normal(TOTAL).astype(np.float32), 1 + worker


def chunk(offset: int, values: np.ndarray) -> bytes:
    return encode_chunk_message(offset, values.size, FLOAT32, values.astype("<f4").tobytes())


def shard_chunks(shard: jpb.ShardInfo, values: np.ndarray, size: int = 32) -> list[bytes]:
    """Chunk messages of `values` (the whole model) over the shard's ranges."""
    out = []
    for r in shard.ranges:
        start, length = int(r.start), int(r.length)
        out += [chunk(a, values[a : min(a + size, start + length)]) for a in range(start, start + length, size)]
    return out


def push_header(job_id: str, w: AsyncWorker, step: int, request_id: str, terms: int = 1) -> bytes:
    header = spb.PushHeader(job_id=job_id, worker_id=w.worker_id, step=step, request_id=request_id, loss_terms=terms, lease=w.lease)
    return bytes(spb.PushGradientsRequest(header=header).SerializeToString())


def upload_header(job_id: str, request_id: str) -> bytes:
    return bytes(spb.UploadParametersRequest(header=spb.UploadHeader(job_id=job_id, request_id=request_id)).SerializeToString())


def pull_request(job_id: str, w: AsyncWorker, min_version: int) -> spb.PullParametersRequest:
    return spb.PullParametersRequest(job_id=job_id, min_version=min_version, worker_id=w.worker_id, lease=w.lease)


def servicer(svc: InProcessService, job_id: str, index: int) -> ShardServicer:
    """The servicer of the job's serving shard `index`."""
    host = next(h for h in svc.launcher.hosts if h.job_id == job_id and h.index == index and h._server is not None)
    assert host._servicer is not None  # no public accessor on ShardHost
    return host._servicer


async def until(check: Callable[[], bool], what: str) -> None:
    """Wait (at most ~15 s) until `check()` holds."""
    for _ in range(1500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


class Stream:
    """A raw client stream to one shard: `messages` are sent, then it stays open until `finish`
    (or `cancel`); `gen` (when given) replaces the messages with any async generator."""

    def __init__(self, address: str, method: str, messages: Sequence[bytes] = (), gen: AsyncIterator[bytes] | None = None,
                 timeout: float | None = TIMEOUT_S) -> None:  # fmt: skip
        self.done = asyncio.Event()
        self.channel = aio.insecure_channel(address)
        response = spb.UploadParametersResponse if method == "UploadParameters" else spb.PushGradientsResponse
        call = self.channel.stream_unary(f"{SERVICE}/{method}", request_serializer=None, response_deserializer=response.FromString)
        self.call = call(gen if gen is not None else self._requests(messages), timeout=timeout)

    async def _requests(self, messages: Sequence[bytes]) -> AsyncIterator[bytes]:
        for m in messages:
            yield m
        await self.done.wait()

    async def error(self) -> ServiceError:
        """The error the stream ended with."""
        with pytest.raises(grpc.RpcError) as err:
            await self.call
        return from_rpc_error(err.value)

    async def cancel(self) -> None:
        self.call.cancel()
        await self.channel.close(None)

    async def close(self) -> None:
        await self.channel.close(None)


class Pull:
    """A raw pull of one shard, read in the background."""

    def __init__(self, address: str, request: spb.PullParametersRequest, timeout: float | None = TIMEOUT_S) -> None:
        self.channel = aio.insecure_channel(address)
        call = self.channel.unary_stream(f"{SERVICE}/PullParameters", request_serializer=spb.PullParametersRequest.SerializeToString,
                                         response_deserializer=None)  # fmt: skip
        self.call = call(request, timeout=timeout)
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> int:
        return len([m async for m in self.call])

    async def error(self) -> ServiceError:
        """The error the pull ended with (its channel closed)."""
        try:
            with pytest.raises(grpc.RpcError) as err:
                await self.task
        finally:
            await self.channel.close(None)
        return from_rpc_error(err.value)

    async def cancel(self) -> None:
        self.call.cancel()
        with pytest.raises((asyncio.CancelledError, grpc.RpcError)):
            await self.task
        await self.channel.close(None)


async def setup(svc: InProcessService, job_id: str, workers: int, upload: bool = True) -> tuple[jpb.Job, list[AsyncWorker]]:
    job = await svc.create(SHAPES, job_id, optimizer="adamw", hyperparameters=HYPER, num_workers=workers, num_shards=2)
    ws = await svc.join(job_id, workers)
    if upload:
        await ws[0].upload(P0)
    return job, ws


async def set_max_streams(s: ShardServicer, max_streams: int) -> None:
    """The shard adopts a newer roster with `max_streams` (as a tenant quota would set it)."""
    r = s.runtime.roster
    await s.runtime.set_roster(dataclasses.replace(r, epoch=r.epoch + 1, max_streams=max_streams))


async def train_and_check(ws: Sequence[AsyncWorker], steps: Sequence[int], request_ids: dict[int, str] | None = None) -> None:
    """Every worker pushes each of `steps` in turn and pulls the result, which must equal torch's
    AdamW stepped on the full-batch gradients of every step from 0 to the last."""
    for s in steps:
        for w in ws:
            rid = (request_ids or {}).get(w.worker_id) if s == steps[0] else None
            await w.push(s, *grad(s, w.worker_id), request_id=rid)
        for w in ws:
            version, _, _ = await w.pull(s + 1)
            assert version == s + 1
    _, final, _ = await ws[0].pull(steps[-1] + 1)
    expected = torch_adamw(SHAPES, P0, HYPER, [[grad(s, w.worker_id) for w in ws] for s in range(steps[-1] + 1)])
    assert np.array_equal(final, expected)


def refused(err: ServiceError, scope: str, limit: int, kind: str) -> None:
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.TOO_MANY_STREAMS), err
    assert (err.metadata.get("scope"), err.metadata.get("limit"), err.metadata.get("kind")) == (scope, str(limit), kind), err


def timed_out(err: ServiceError, field: str) -> None:
    assert (err.code, err.reason, err.metadata.get("field")) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.LIMIT_EXCEEDED, field), err


@pytest.mark.asyncio
async def test_a_stream_over_the_shard_limit_is_refused_and_changes_nothing(svc: InProcessService) -> None:
    job, (w0, w1, w2) = await setup(svc, "shard-limit", 3)
    assert (await w0.push(0, *grad(0, w0.worker_id))).outcome == spb.STEP_OUTCOME_PENDING
    shard = job.shards[0]
    s0 = servicer(svc, "shard-limit", 0)
    await set_max_streams(s0, 2)  # read live from the roster at each admission

    first = shard_chunks(shard, grad(0, w1.worker_id)[0])[:1]
    held_push = Stream(shard.address, "PushGradients", [push_header("shard-limit", w1, 0, "held"), *first])
    held_pull = Pull(shard.address, pull_request("shard-limit", w0, 5))
    await until(lambda: s0.gate.open == 2, "both streams admitted")

    # a complete, valid push of worker 2 is refused as a whole, and so is a pull
    g2, t2 = grad(0, w2.worker_id)
    rejected = Stream(shard.address, "PushGradients", [push_header("shard-limit", w2, 0, "w2-step0", t2), *shard_chunks(shard, g2)])
    rejected.done.set()
    refused(await rejected.error(), "shard", 2, "push")
    await rejected.close()
    refused(await Pull(shard.address, pull_request("shard-limit", w2, 0)).error(), "shard", 2, "pull")
    assert s0.gate.open == 2

    await held_push.cancel()
    await held_pull.cancel()
    await until(lambda: s0.gate.open == 0, "the held streams released")
    await set_max_streams(s0, 0)  # back to the default

    # nothing was recorded: the step completes with every worker's gradient (worker 2's under the
    # request id of its refused push), and w1's half-sent push left no trace
    await w1.push(0, *grad(0, w1.worker_id))
    assert (await w2.push(0, g2, t2, request_id="w2-step0")).outcome == spb.STEP_OUTCOME_APPLIED
    await train_and_check([w0, w1, w2], [1])


@pytest.mark.asyncio
async def test_a_worker_over_its_stream_limits_is_refused_and_others_are_not(svc: InProcessService) -> None:
    job, (w0, w1) = await setup(svc, "worker-limit", 2)
    shard = job.shards[0]
    s0 = servicer(svc, "worker-limit", 0)
    limits = s0.gate.limits

    pulls = [Pull(shard.address, pull_request("worker-limit", w0, 9)) for _ in range(limits.per_worker)]
    await until(lambda: s0.gate.open_for(w0.worker_id) == limits.per_worker, "worker 0's pulls admitted")
    refused(await Pull(shard.address, pull_request("worker-limit", w0, 0)).error(), "worker", limits.per_worker, "pull")
    version, _, _ = await w1.pull(0)  # another worker is served
    assert version == 0
    for p in pulls:
        await p.cancel()
    await until(lambda: s0.gate.open == 0, "worker 0's pulls released")

    # pushes: each holds a shard-sized buffer, so a worker has room for a push and one retry
    held = [Stream(shard.address, "PushGradients", [push_header("worker-limit", w0, 0, f"held-{k}")])
            for k in range(limits.pushes_per_worker)]  # fmt: skip
    await until(lambda: s0.gate.open_for(w0.worker_id) == limits.pushes_per_worker, "worker 0's pushes admitted")
    g0 = grad(0, w0.worker_id)[0]
    extra = Stream(shard.address, "PushGradients", [push_header("worker-limit", w0, 0, "extra"), *shard_chunks(shard, g0)])
    extra.done.set()
    refused(await extra.error(), "worker", limits.pushes_per_worker, "push")
    await extra.close()
    for h in held:
        await h.cancel()
    await until(lambda: s0.gate.open == 0, "worker 0's pushes released")

    await train_and_check([w0, w1], [0, 1])


@pytest.mark.asyncio
async def test_uploads_over_their_limit_are_refused(svc: InProcessService) -> None:
    job, ws = await setup(svc, "uploads", 1, upload=False)
    shard = job.shards[0]
    s0 = servicer(svc, "uploads", 0)
    n = s0.gate.limits.uploads
    held = [Stream(shard.address, "UploadParameters", [upload_header("uploads", f"held-{k}")]) for k in range(n)]
    await until(lambda: s0.gate.uploads == n, "the uploads admitted")
    extra = Stream(shard.address, "UploadParameters", [upload_header("uploads", "extra"), *shard_chunks(shard, P0)])
    extra.done.set()
    refused(await extra.error(), "shard", n, "upload")
    await extra.close()
    for h in held:
        await h.cancel()
    await until(lambda: s0.gate.open == 0, "the uploads released")
    await ws[0].upload(P0)
    await train_and_check(ws, [0])


@pytest.mark.asyncio
async def test_a_cancelled_stream_gives_its_slot_back(svc: InProcessService) -> None:
    job, (w0, w1) = await setup(svc, "cancel", 2)
    shard = job.shards[0]
    s0 = servicer(svc, "cancel", 0)
    await set_max_streams(s0, 1)

    for hold in (
        lambda: Stream(shard.address, "PushGradients", [push_header("cancel", w0, 0, "held"), *shard_chunks(shard, P0, 16)[:2]]),
        lambda: Pull(shard.address, pull_request("cancel", w0, 3)),
    ):
        held = hold()
        await until(lambda: s0.gate.open == 1, "the stream admitted")
        refused(await Pull(shard.address, pull_request("cancel", w1, 0)).error(), "shard", 1, "pull")
        await held.cancel()
        await until(lambda: s0.gate.open == 0, "the cancelled stream released")
        version, _, _ = await w1.pull(0)  # its slot is free again
        assert version == 0

    await set_max_streams(s0, 0)
    await train_and_check([w0, w1], [0])


@pytest.mark.asyncio
async def test_a_stalled_stream_is_ended_after_the_idle_limit_and_the_shard_trains_on(
    svc: InProcessService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream_gate, "DEFAULT_STREAM_IDLE_S", 1.5)  # read when the job's shards start
    job, (w0, w1) = await setup(svc, "idle", 2, upload=False)
    shard = job.shards[0]
    s0 = servicer(svc, "idle", 0)
    assert s0.gate.limits.idle_s == 1.5

    # an upload that stops half way, then a push that sends only its header, then one that stops half way
    upload = Stream(shard.address, "UploadParameters", [upload_header("idle", "u"), *shard_chunks(shard, P0)[:1]])
    timed_out(await upload.error(), "stream.idle_s")
    await upload.close()
    await w0.upload(P0, request_id="u")  # the same request id: nothing of the stalled one was kept

    half = shard_chunks(shard, grad(0, w0.worker_id)[0], 16)[:2]
    for messages in ([push_header("idle", w0, 0, "p")], [push_header("idle", w0, 0, "p"), *half]):
        stalled = Stream(shard.address, "PushGradients", messages)
        timed_out(await stalled.error(), "stream.idle_s")
        await stalled.close()
    assert s0.gate.open == 0
    assert s0.runtime.waiting_for() == [w0.worker_id, w1.worker_id]  # no contribution was recorded

    await train_and_check([w0, w1], [0, 1], request_ids={w0.worker_id: "p"})


@pytest.mark.asyncio
async def test_a_stream_that_keeps_trickling_is_cut_at_the_duration_limit(svc: InProcessService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_gate, "DEFAULT_MAX_STREAM_S", 2.0)
    job, (w0, w1) = await setup(svc, "trickle", 2)
    shard = job.shards[0]
    s0 = servicer(svc, "trickle", 0)
    assert s0.gate.limits.max_stream_s == 2.0
    g0 = grad(0, w0.worker_id)[0]
    start, length = int(shard.ranges[0].start), int(shard.ranges[0].length)

    async def trickle() -> AsyncIterator[bytes]:
        yield push_header("trickle", w0, 0, "slow")
        for a in range(start, start + length):  # one element every 0.25 s: well past the limit
            yield chunk(a, g0[a : a + 1])
            await asyncio.sleep(0.25)

    slow = Stream(shard.address, "PushGradients", gen=trickle(), timeout=60)
    timed_out(await slow.error(), "stream.duration_s")
    await slow.close()
    assert s0.gate.open == 0
    assert s0.runtime.waiting_for() == [w0.worker_id, w1.worker_id]
    await train_and_check([w0, w1], [0], request_ids={w0.worker_id: "slow"})


@pytest.mark.asyncio
async def test_a_pull_without_a_deadline_waits_at_most_the_cap(svc: InProcessService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_gate, "DEFAULT_MAX_PULL_WAIT_S", 0.5)
    job, (w0, w1) = await setup(svc, "pull-cap", 2)
    await w0.push(0, *grad(0, w0.worker_id))
    pull = Pull(job.shards[0].address, pull_request("pull-cap", w0, 1), timeout=None)
    err = await asyncio.wait_for(pull.error(), 60)  # the test fails rather than hangs
    assert (err.code, err.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.STEP_WAITING_FOR_WORKERS), err
    assert err.metadata["waiting_for"] == str(w1.worker_id)
    await w1.push(0, *grad(0, w1.worker_id))
    version, _, _ = await w0.pull(1)
    assert version == 1


BAD_FOREVER: dict[str, tuple[Callable[[jpb.ShardInfo], bytes], str, str]] = {
    # the same valid chunk again and again: refused at its first repeat
    "duplicate": (lambda s: chunk(int(s.ranges[0].start), np.ones(16, np.float32)), Reason.LAYOUT_MISMATCH, "chunks"),
    # elements of the next shard, again and again: refused at the first
    "out-of-range": (lambda s: chunk(int(s.ranges[-1].start) + int(s.ranges[-1].length), np.ones(16, np.float32)),
                     Reason.CHUNK_OUT_OF_RANGE, "chunk.offset"),
}  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(BAD_FOREVER))
async def test_an_endless_stream_of_bad_chunks_is_refused_as_it_arrives(svc: InProcessService, case: str) -> None:
    make, reason, field = BAD_FOREVER[case]
    job, (w0, w1) = await setup(svc, "endless", 2)
    shard = job.shards[0]
    message = make(shard)

    async def forever() -> AsyncIterator[bytes]:
        yield push_header("endless", w0, 0, "forever")
        for _ in range(2000):  # far more than the refusal needs (it comes at the first bad chunk)
            yield message
            await asyncio.sleep(0)
        # then the stream stays open without another message: never half-closed, so the answer can
        # only come while the stream is still arriving. (A client still writing when the call ends
        # may see gRPC core's INTERNAL "Internal error from Core" instead of the status,
        # grpc/grpc#36066: the shard reads a refused stream for a while first, but a client writing
        # without end can outlast that.)
        await asyncio.Event().wait()

    stream = Stream(shard.address, "PushGradients", gen=forever())
    err = await stream.error()
    assert (err.code, err.reason, err.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, reason, field), err
    assert err.metadata.get("chunk_index") == ("1" if case == "duplicate" else "0")
    await stream.close()
    assert servicer(svc, "endless", 0).runtime.waiting_for() == [w0.worker_id, w1.worker_id]
    await train_and_check([w0, w1], [0])


@pytest.mark.asyncio
async def test_a_pull_whose_client_stops_reading_is_ended_and_frees_its_slot(svc: InProcessService) -> None:
    n = 8_000_000  # 32 MB: more than the transport buffers for a client that does not read
    job = await svc.create([("w", (n,))], "unread", optimizer="sgd", hyperparameters=HYPER, num_workers=1, num_shards=1)
    (w,) = await svc.join("unread", 1)
    await w.upload(np.zeros(n, np.float32))
    s0 = servicer(svc, "unread", 0)
    s0.gate.limits = dataclasses.replace(s0.gate.limits, max_stream_s=2.0)

    async with aio.insecure_channel(job.shards[0].address) as channel:
        call = channel.unary_stream(f"{SERVICE}/PullParameters", request_serializer=spb.PullParametersRequest.SerializeToString,
                                    response_deserializer=None)(pull_request("unread", w, 0), timeout=None)  # fmt: skip
        messages = aiter(call)
        await anext(messages)  # the header; then the client stops reading
        await until(lambda: s0.gate.open == 0, "the unread pull ended by the shard")
        with pytest.raises(grpc.RpcError) as exc:
            async for _ in messages:  # what the transport buffered, then the status
                pass
    timed_out(from_rpc_error(exc.value), "stream.duration_s")
    version, values, _ = await w.pull(0)  # a pull that reads is served as before
    assert version == 0 and values.size == n
