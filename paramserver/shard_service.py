"""The data-plane gRPC servicer of one shard: decode requests, call the runtime, encode answers."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from paramserver.errors import ParamServerError, Reason
from paramserver.placement import Span
from paramserver.rpc import streaming, unary
from paramserver.shard import Staging
from paramserver.shard_runtime import PushHeader, PushResult, ShardRuntime
from paramserver.steps import StepReport
from paramserver.v1 import shard_service_pb2 as pb
from paramserver_client.codec import EVAL, FLOAT32, ITEMSIZE, TRAIN, parse_chunk_message

Ctx = aio.ServicerContext[Any, Any]


def report_pb(r: StepReport | None) -> pb.StepReport | None:
    """A StepReport as its proto."""
    if r is None:
        return None
    return pb.StepReport(
        step=r.step,
        outcome=r.outcome.value,  # type: ignore[arg-type]
        skip_reason=r.skip_reason,
        grad_norm=r.grad_norm,
        clip_coef=r.clip_coef,
        lr=r.lr,
        loss_terms=r.loss_terms,
    )


def _push_pb(r: PushResult) -> pb.PushGradientsResponse:
    return pb.PushGradientsResponse(
        outcome=r.outcome.value,  # type: ignore[arg-type]
        version=r.version,
        contributions=r.contributions,
        expected=r.expected,
        report=report_pb(r.report),
    )


class ShardServicer:
    """ShardService for one job's shard."""

    def __init__(self, job_id: str, runtime: ShardRuntime) -> None:
        self.job_id = job_id
        self.runtime = runtime

    def _check_job(self, job_id: str) -> None:
        if job_id != self.job_id:
            raise ParamServerError.not_found(Reason.JOB_NOT_FOUND, f"no job {job_id!r} on this shard", job_id=job_id)

    async def _first(self, it: AsyncIterator[bytes], message: Any, what: str) -> Any:
        async for raw in it:
            msg = None if _chunk_of(raw) is not None else message.FromString(raw)
            if msg is None or msg.WhichOneof("kind") != "header":
                raise ParamServerError.invalid("header", f"the first message of a {what} must be its header")
            return msg.header
        raise ParamServerError.invalid("header", f"empty {what} stream")

    async def _stage(self, it: AsyncIterator[bytes]) -> Staging:
        """Check each chunk as it arrives and decode it into a scratch buffer."""
        state = self.runtime.state
        staging = state.stage()
        try:
            async for raw in it:
                index = len(staging.pieces)
                chunk = _chunk_of(raw)
                if chunk is None:
                    raise ParamServerError.invalid("chunk", f"message {index + 1} must be a chunk (one header per stream)")
                offset, count, dtype, start, length = chunk
                local = state.check_chunk(offset, count, dtype, length, index)
                state.write(staging, local, count, dtype, memoryview(raw)[start : start + length])
        except BaseException:
            state.release(staging.buffer)
            raise
        return staging

    @unary
    async def UploadParameters(self, request_iterator: AsyncIterator[bytes], context: Ctx) -> pb.UploadParametersResponse:
        """Initial parameters of this shard's ranges."""
        header = await self._first(request_iterator, pb.UploadParametersRequest, "upload")
        self._check_job(header.job_id)
        done = self.runtime.check_upload_header(header.request_id)
        if done is not None:
            return pb.UploadParametersResponse(elements=done)
        staging = await self._stage(request_iterator)
        return pb.UploadParametersResponse(elements=await self.runtime.upload(header.request_id, staging))

    @unary
    async def PushGradients(self, request_iterator: AsyncIterator[bytes], context: Ctx) -> pb.PushGradientsResponse:
        """One worker's gradient for one step."""
        h = await self._first(request_iterator, pb.PushGradientsRequest, "push")
        self._check_job(h.job_id)
        header = PushHeader(h.worker_id, h.step, h.request_id, h.loss_terms)
        first = self.runtime.check_push_header(header)
        if first is not None:
            return _push_pb(await first)
        staging = await self._stage(request_iterator)
        return _push_pb(await self.runtime.push(header, staging))

    @streaming
    async def PullParameters(self, request: pb.PullParametersRequest, context: Ctx) -> AsyncIterator[pb.PullParametersResponse | bytes]:
        """This shard's parameters once min_version is published."""
        self._check_job(request.job_id)
        dtype = request.dtype or FLOAT32
        if dtype not in ITEMSIZE:
            raise ParamServerError.invalid("dtype", f"unsupported wire dtype {dtype}", Reason.DTYPE_UNSUPPORTED)
        point = request.point or TRAIN
        if point not in (TRAIN, EVAL):
            raise ParamServerError.invalid("point", f"unknown parameter point {point}")
        ranges = [Span(r.start, r.length) for r in request.ranges]
        await self.runtime.wait_version(request.min_version)
        pub = await self.runtime.publication(dtype, ranges, point)
        yield pb.PullParametersResponse(
            header=pb.PullHeader(version=pub.version, elements=pub.elements, last_step=report_pb(pub.report), frozen_parameters=pub.frozen)
        )
        if isinstance(pub.chunks, list):  # in memory: encoded once per version
            for _, _, message in pub.chunks:
                yield message  # already a serialised PullParametersResponse (see add_shard_service)
            return
        chunks = iter(pub.chunks)  # a spilled shard reads its publication file as it goes
        while batch := await asyncio.to_thread(lambda: list(itertools.islice(chunks, 2))):
            for _, _, message in batch:
                yield message


def _chunk_of(raw: bytes) -> tuple[int, int, int, int, int] | None:
    try:
        return parse_chunk_message(raw)
    except ValueError as exc:
        raise ParamServerError.invalid("chunk", f"malformed message: {exc}") from None


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


def add_shard_service(servicer: ShardServicer, server: aio.Server) -> None:
    """Register ShardService like the generated ``add_ShardServiceServicer_to_server``, except
    that PullParameters may yield pre-serialised messages (bytes pass straight through)."""
    handlers = {
        "UploadParameters": grpc.stream_unary_rpc_method_handler(
            servicer.UploadParameters,
            request_deserializer=None,  # raw: chunks are parsed by _stage without a copy
            response_serializer=_serialize,
        ),
        "PushGradients": grpc.stream_unary_rpc_method_handler(
            servicer.PushGradients,
            request_deserializer=None,
            response_serializer=_serialize,
        ),
        "PullParameters": grpc.unary_stream_rpc_method_handler(
            servicer.PullParameters,
            request_deserializer=pb.PullParametersRequest.FromString,
            response_serializer=_serialize,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ShardService"].full_name
