"""A bad push stream is refused with a status naming the field, changes nothing, and burns nothing."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc import aio

from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client import Reason, ServiceError
from paramserver_client.codec import FLOAT32, INT4_BLOCK, INT8_BLOCK, TOPK, encode_chunk_message
from paramserver_client.errors import from_rpc_error
from tests.service.harness import InProcessService, assert_same_tensors, torch_adamw

SHAPES = [("w", (10, 13)), ("b", (13,))]
TOTAL = 143
HYPER = {"lr": 0.01}
CHUNK = 32

Chunks = list[tuple[int, int, int, bytes]]  # (offset, count, dtype, data)


def grad(step: int, worker: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(100 * step + worker)
    return rng.standard_normal(TOTAL).astype(np.float32), 1 + worker


def ones(n: int) -> bytes:
    return np.ones(n, dtype="<f4").tobytes()


def packed(*parts: object) -> bytes:
    """Little-endian bytes of ("f", value) float32s, ("b", value) int8s, ("I", value) uint32s, ("B", raw) bytes."""
    out = b""
    for kind, value in parts:  # type: ignore[misc]
        out += value if kind == "B" else np.array([value], dtype={"f": "<f4", "b": "i1", "I": "<u4"}[kind]).tobytes()
    return out


def valid(start: int, length: int) -> Chunks:
    """Chunks of ones covering [start, start + length) exactly once."""
    return [(a, min(CHUNK, start + length - a), FLOAT32, ones(min(CHUNK, start + length - a))) for a in range(start, start + length, CHUNK)]


# name -> (how the valid stream of shard 0 over [start, start + length) is spoiled, code, reason, field)
CASES: dict[str, tuple[Callable[[int, int], Chunks], grpc.StatusCode, str, str]] = {
    "offset-in-the-next-shard": (lambda a, n: [*valid(a, n), (a + n, 4, FLOAT32, ones(4))], grpc.StatusCode.INVALID_ARGUMENT,
                                 Reason.CHUNK_OUT_OF_RANGE, "chunk.offset"),
    "offset-past-the-end": (lambda a, n: [*valid(a, n - 2), (a + n - 2, 4, FLOAT32, ones(4))], grpc.StatusCode.INVALID_ARGUMENT,
                            Reason.CHUNK_OUT_OF_RANGE, "chunk.offset"),
    "length": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 4, FLOAT32, ones(3))], grpc.StatusCode.INVALID_ARGUMENT,
               Reason.LENGTH_MISMATCH, "chunk.data"),
    "dtype": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 4, 99, ones(4))], grpc.StatusCode.INVALID_ARGUMENT,
              Reason.DTYPE_UNSUPPORTED, "chunk.dtype"),
    # compressed chunks (pushes only) whose data does not decode: tensor.proto's refusals
    "int8-length": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 4, INT8_BLOCK, packed(("f", 1.0), ("B", b"\1\1\1")))],
                    grpc.StatusCode.INVALID_ARGUMENT, Reason.ENCODING_INVALID, "chunk.data"),
    "int8-nan-scale": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 4, INT8_BLOCK, packed(("f", float("nan")), ("B", b"\1\1\1\1")))],
                       grpc.StatusCode.INVALID_ARGUMENT, Reason.ENCODING_INVALID, "chunk.data"),
    "int8-minus-128": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 4, INT8_BLOCK, packed(("f", 1.0), ("B", b"\x80\1\1\1")))],
                       grpc.StatusCode.INVALID_ARGUMENT, Reason.ENCODING_INVALID, "chunk.data"),
    "int4-nibble-8": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 4, INT4_BLOCK, packed(("f", 1.0), ("B", b"\x08\x11")))],
                      grpc.StatusCode.INVALID_ARGUMENT, Reason.ENCODING_INVALID, "chunk.data"),
    "topk-unsorted": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 4, TOPK, packed(("I", 2), ("I", 1), ("f", 1.0), ("f", 1.0)))],
                      grpc.StatusCode.INVALID_ARGUMENT, Reason.ENCODING_INVALID, "chunk.data"),
    "topk-index": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 4, TOPK, packed(("I", 4), ("f", 1.0)))],
                   grpc.StatusCode.INVALID_ARGUMENT, Reason.ENCODING_INVALID, "chunk.data"),
    "topk-inf": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 4, TOPK, packed(("I", 0), ("f", float("inf"))))],
                 grpc.StatusCode.INVALID_ARGUMENT, Reason.ENCODING_INVALID, "chunk.data"),
    "topk-count-huge": (lambda a, n: [*valid(a, n - 4), (a + n - 4, 2**23, TOPK, b"")], grpc.StatusCode.RESOURCE_EXHAUSTED,
                        Reason.MESSAGE_TOO_LARGE, "chunk.count"),
    "count": (lambda a, n: [*valid(a, n), (a, 0, FLOAT32, b"")], grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "chunk.count"),
    "gap": (lambda a, n: valid(a, n)[:-1], grpc.StatusCode.INVALID_ARGUMENT, Reason.LAYOUT_MISMATCH, "chunks"),
    "overlap": (lambda a, n: [*valid(a, n), valid(a, n)[0]], grpc.StatusCode.INVALID_ARGUMENT, Reason.LAYOUT_MISMATCH, "chunks"),
}  # fmt: skip


async def push_raw(address: str, header: spb.PushHeader, chunks: Chunks) -> ServiceError:
    """Push a hand-made stream to one shard; the error it must answer."""
    messages = [spb.PushGradientsRequest(header=header).SerializeToString()]
    messages += [encode_chunk_message(off, n, dtype, data) for off, n, dtype, data in chunks]
    async with aio.insecure_channel(address) as channel:
        call = channel.stream_unary("/paramserver.v1.ShardService/PushGradients", request_serializer=None,
                                    response_deserializer=spb.PushGradientsResponse.FromString)  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            await call(iter(messages), timeout=15)
    return from_rpc_error(err.value)


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(CASES))
async def test_a_bad_chunk_is_refused_naming_its_field_and_changes_nothing(svc: InProcessService, case: str) -> None:
    spoil, code, reason, field = CASES[case]
    job = await svc.create(SHAPES, "bad", optimizer="adamw", hyperparameters=HYPER, num_workers=2, num_shards=2)
    w0, w1 = await svc.join("bad", 2)
    init = np.linspace(-1, 1, TOTAL, dtype=np.float32)
    await w0.upload(init)
    for w in (w0, w1):  # some optimizer state to protect
        await w.push(0, *grad(0, w.worker_id))
    before = await svc.tensors("bad")

    shard = job.shards[0]
    start, length = int(shard.ranges[0].start), int(shard.ranges[0].length)
    header = spb.PushHeader(job_id="bad", worker_id=0, step=1, request_id="r-1", loss_terms=grad(1, 0)[1], lease=w0.lease)
    err = await push_raw(shard.address, header, spoil(start, length))
    assert (err.code, err.reason, err.metadata.get("field")) == (code, reason, field), err
    if field == "chunk.offset":
        assert int(err.metadata["offset"]) >= start + length - 2

    assert_same_tensors(before, await svc.tensors("bad"))
    assert (await svc.jobs().get_job("bad")).version == 1
    # nothing was recorded: the same worker (and request id) contributes step 1 once, normally
    assert (await w0.push(1, *grad(1, 0), request_id="r-1")).outcome == spb.STEP_OUTCOME_PENDING
    assert (await w1.push(1, *grad(1, 1))).outcome == spb.STEP_OUTCOME_APPLIED
    _, final, _ = await w1.pull(2)
    assert np.array_equal(final, torch_adamw(SHAPES, init, HYPER, [[grad(s, 0), grad(s, 1)] for s in range(2)]))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("case", "code", "reason", "field"),
    [
        (spb.PushHeader(job_id="other", worker_id=0, step=0, request_id="h", loss_terms=1), grpc.StatusCode.NOT_FOUND,
         Reason.JOB_NOT_FOUND, None),
        (spb.PushHeader(job_id="hdr", worker_id=2, step=0, request_id="h", loss_terms=1), grpc.StatusCode.INVALID_ARGUMENT,
         Reason.INVALID_FIELD, "header.worker_id"),
        (spb.PushHeader(job_id="hdr", worker_id=0, step=0, request_id="", loss_terms=1), grpc.StatusCode.INVALID_ARGUMENT,
         Reason.INVALID_FIELD, "header.request_id"),
        (spb.PushHeader(job_id="hdr", worker_id=0, step=0, request_id="no-lease", loss_terms=1), grpc.StatusCode.INVALID_ARGUMENT,
         Reason.INVALID_FIELD, "header.lease"),
        (spb.PushHeader(job_id="hdr", worker_id=0, step=0, request_id="h", loss_terms=1, lease=99), grpc.StatusCode.ABORTED,
         Reason.LEASE_EXPIRED, None),
        (spb.PushHeader(job_id="hdr", worker_id=1, step=0, request_id="h", loss_terms=1), grpc.StatusCode.ABORTED,
         Reason.LEASE_EXPIRED, None),
        (spb.PushHeader(job_id="hdr", worker_id=0, step=0, request_id="h", loss_terms=1, generation=1),
         grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "header.generation"),
        (spb.PushHeader(job_id="hdr", worker_id=0, step=0, request_id="h", loss_terms=1, group_lrs=[0.1, 0.1]),
         grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "header.group_lrs"),
        (spb.PushHeader(job_id="hdr", worker_id=0, step=0, request_id="h", loss_terms=1, group_lrs=[float("nan")]),
         grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "header.group_lrs"),
        (spb.PushHeader(job_id="hdr", worker_id=0, step=0, request_id="h", loss_terms=1, group_lrs=[float("inf")]),
         grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "header.group_lrs"),
        (spb.PushHeader(job_id="hdr", worker_id=0, step=0, request_id="h", loss_terms=1, group_lrs=[-0.5]),
         grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD, "header.group_lrs"),
    ],
    ids=["job", "worker-id", "request-id", "no-lease", "unknown-lease", "not-a-member", "future-generation", "lrs-count",
         "lr-nan", "lr-inf", "lr-negative"],
)  # fmt: skip
async def test_a_bad_push_header_is_refused_before_any_chunk(
    svc: InProcessService, case: spb.PushHeader, code: grpc.StatusCode, reason: str, field: str | None
) -> None:
    job = await svc.create(SHAPES, "hdr", optimizer="sgd", hyperparameters=HYPER, num_workers=2, num_shards=2)
    (w0,) = await svc.join("hdr", 1)
    await w0.upload(np.zeros(TOTAL, dtype=np.float32))
    shard = job.shards[0]
    header = spb.PushHeader()
    header.CopyFrom(case)
    if header.lease == 0 and header.request_id != "no-lease":
        header.lease = w0.lease
    if header.lease == 99:  # a lease nobody holds
        header.lease = w0.lease + 1
    err = await push_raw(shard.address, header, valid(int(shard.ranges[0].start), int(shard.ranges[0].length)))
    assert (err.code, err.reason, err.metadata.get("field")) == (code, reason, field), err
    pushed = await w0.push(0, np.ones(TOTAL, dtype=np.float32), 1, request_id="h")  # nothing was recorded
    assert pushed.outcome == spb.STEP_OUTCOME_PENDING and pushed.version == 0


@pytest.mark.asyncio
async def test_an_asyncio_client_still_writing_gets_the_refusal_not_internal(svc: InProcessService) -> None:
    """A stream refused while the client is still writing a large chunk: the shard reads the rest
    before answering, so a grpc.aio client sees the status (it used to see INTERNAL "Internal
    error from Core" most of the time, grpc/grpc#36066)."""
    job = await svc.create(SHAPES, "drain", optimizer="sgd", hyperparameters=HYPER, num_workers=1, num_shards=1)
    big = encode_chunk_message(0, 1 << 20, FLOAT32, ones(1 << 20))  # 4 MiB: refused, the stream has no header
    small = encode_chunk_message(0, 4, FLOAT32, ones(4))
    async with aio.insecure_channel(job.shards[0].address) as channel:
        call = channel.stream_unary("/paramserver.v1.ShardService/PushGradients")
        for _ in range(10):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(iter([small, big, small]), timeout=10)
            err = from_rpc_error(info.value)
            assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD), err
