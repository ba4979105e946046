"""The data-plane gRPC servicer of one shard: parse requests, call the runtime, encode answers.

Every stream is admitted by the servicer's :class:`~paramserver.stream_gate.StreamGate` once its
header is parsed (RESOURCE_EXHAUSTED, TOO_MANY_STREAMS over a limit) and released when it ends;
client streams are read under an idle and a total time limit (DEADLINE_EXCEEDED, LIMIT_EXCEEDED)
and pulls wait within a cap (see stream_gate.py). The gate lives on the servicer, so it survives
:meth:`ShardHost.reset` swapping :attr:`ShardServicer.runtime`; the per-shard limit is read from the
current runtime's roster at each admission.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from grpc import aio

from paramserver.errors import ParamServerError, Reason
from paramserver.placement import Span
from paramserver.rpc import decode, drain, unary
from paramserver.shard_runtime import Chunk, PushHeader, PushResult, ShardRuntime, iterate_in_thread
from paramserver.steps import StepReport
from paramserver.stream_gate import StreamGate, StreamLimits, stream_time_error
from paramserver.telemetry import Telemetry
from paramserver.v1 import shard_service_pb2 as pb
from paramserver_client.codec import FLOAT32, TRAIN, parse_chunk_message

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
        workers=list(r.workers),
        missing_workers=list(r.missing_workers),
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

    def __init__(
        self, job_id: str, runtime: ShardRuntime, *, limits: StreamLimits | None = None, telemetry: Telemetry | None = None
    ) -> None:
        self.job_id = job_id
        self.runtime = runtime
        self.telemetry = telemetry or runtime.telemetry
        self.gate = StreamGate(limits)
        """Counts this shard's open streams (kept across a reset, which swaps `runtime`)."""

    def _check_job(self, job_id: str) -> None:
        if job_id != self.job_id:
            raise ParamServerError.not_found(Reason.JOB_NOT_FOUND, f"no job {job_id!r} on this shard", job_id=job_id)

    async def _header(self, it: AsyncIterator[bytes], message: Any, what: str) -> Any:
        """The stream's first message, which must be its header (parsed once, here)."""
        async for raw in it:
            msg = None if _chunk_of(raw) is not None else _parse(message, raw, what)
            if msg is None or msg.WhichOneof("kind") != "header":
                raise ParamServerError.invalid("header", f"the first message of a {what} must be its header")
            self._check_job(msg.header.job_id)
            return msg.header
        raise ParamServerError.invalid("header", f"empty {what} stream")

    async def _timed(self, it: AsyncIterator[bytes], what: str) -> AsyncGenerator[bytes, None]:
        """The messages of a client stream, each of which must arrive within the idle limit, and
        all of them within the total limit (else DEADLINE_EXCEEDED, LIMIT_EXCEEDED)."""
        limits = self.gate.limits
        loop = asyncio.get_running_loop()
        end = loop.time() + limits.max_stream_s
        source = aiter(it)
        while True:
            left = end - loop.time()
            wait = min(limits.idle_s, left)
            try:
                if wait <= 0:
                    raise TimeoutError
                async with asyncio.timeout(wait):
                    raw = await anext(source)
            except StopAsyncIteration:
                return
            except TimeoutError:
                if wait < limits.idle_s:
                    raise stream_time_error(
                        f"the {what} stream was still arriving {limits.max_stream_s:g} s after it began (this shard's limit); "
                        "nothing of it was kept",
                        "stream.duration_s",
                        limits.max_stream_s,
                    ) from None
                raise stream_time_error(
                    f"no message of the {what} stream arrived for {limits.idle_s:g} s (this shard's idle limit); nothing of it was kept",
                    "stream.idle_s",
                    limits.idle_s,
                ) from None
            self.telemetry.inc(RECEIVED, len(raw))
            yield raw

    def _pull_wait(self, remaining: float | None) -> float:
        """How long a pull waits for its version: within the call's deadline (less a margin), at
        most the stream limit; without a deadline, the pull-wait limit."""
        limits = self.gate.limits
        if remaining is None:
            return limits.max_pull_wait_s
        return min(max(0.0, remaining - deadline_margin(remaining)), limits.max_stream_s)

    @staticmethod
    async def _chunks(it: AsyncIterator[bytes]) -> AsyncIterator[Chunk]:
        """The rest of the stream as parsed chunks (their data a view of the message)."""
        index = 0
        async for raw in it:
            chunk = _chunk_of(raw)
            if chunk is None:
                raise ParamServerError.invalid("chunk", f"message {index + 1} must be a chunk (one header per stream)")
            offset, count, dtype, start, length = chunk
            yield Chunk(offset, count, dtype, memoryview(raw)[start : start + length], index)
            index += 1

    @unary
    async def UploadParameters(self, request_iterator: AsyncIterator[bytes], context: Ctx) -> pb.UploadParametersResponse:
        """Initial parameters of this shard's ranges."""
        runtime = self.runtime
        async with contextlib.aclosing(self._timed(request_iterator, "upload")) as messages:
            try:
                header = await self._header(messages, pb.UploadParametersRequest, "upload")
                with self.gate.admit("upload", None, runtime.roster.max_streams):
                    elements = await runtime.upload(header.request_id, self._chunks(messages))
            except ParamServerError as err:
                await _drain(messages, err)
                raise
        return pb.UploadParametersResponse(elements=elements)

    @unary
    async def PushGradients(self, request_iterator: AsyncIterator[bytes], context: Ctx) -> pb.PushGradientsResponse:
        """One worker's gradient for one step."""
        runtime = self.runtime
        async with contextlib.aclosing(self._timed(request_iterator, "push")) as messages:
            try:
                h = await self._header(messages, pb.PushGradientsRequest, "push")
                header = PushHeader(h.worker_id, h.step, h.request_id, h.loss_terms, h.lease, h.generation, tuple(h.group_lrs))
                with self.gate.admit("push", header.worker_id, runtime.roster.max_streams):
                    result = await runtime.push(header, self._chunks(messages))
            except ParamServerError as err:
                await _drain(messages, err)
                raise
        return _push_pb(result)

    @unary
    async def PullParameters(self, raw: bytes, context: Ctx) -> None:
        """This shard's parameters once min_version is published. The answer is written here
        (not yielded) so that sending it runs under this shard's stream limit: a client that
        stops reading does not hold its slot for ever."""
        request: pb.PullParametersRequest = decode(pb.PullParametersRequest, raw)
        self._check_job(request.job_id)
        ranges = [Span(r.start, r.length) for r in request.ranges]
        runtime = self.runtime
        with self.gate.admit("pull", request.worker_id, runtime.roster.max_streams):
            pull = await runtime.pull(
                request.min_version,
                request.dtype or FLOAT32,
                ranges,
                request.point or TRAIN,
                worker_id=request.worker_id,
                lease=request.lease,
                generation=request.generation,
                timeout=self._pull_wait(context.time_remaining()),
                base_version=request.base_version if request.HasField("base_version") else None,
            )
            header = pb.PullParametersResponse(
                header=pb.PullHeader(
                    version=pull.version, elements=pull.elements, last_step=report_pb(pull.report), frozen_parameters=pull.frozen
                )
            )
            limit = self.gate.limits.max_stream_s
            sent = 0
            try:
                with self.telemetry.time(PHASE, phase="pull"):
                    async with asyncio.timeout(limit):
                        await context.write(header)
                        if isinstance(pull.messages, list):  # encoded once per version
                            for message in pull.messages:
                                await context.write(message)  # already a serialised PullParametersResponse (see add_shard_service)
                                sent += len(message)
                        else:
                            async for message in iterate_in_thread(pull.messages):  # read and encoded as it goes
                                await context.write(message)
                                sent += len(message)
            except TimeoutError:
                raise stream_time_error(
                    f"the pull's answer was not taken within {limit:g} s (this shard's limit)", "stream.duration_s", limit
                ) from None
            finally:
                self.telemetry.inc(SENT, sent)


async def _drain(messages: AsyncIterator[bytes], err: ParamServerError) -> None:
    """Read (and drop) what is left of a refused client stream before answering `err` (see
    rpc.drain); a stream cut by its time limits is not drained."""
    if err.code != "DEADLINE_EXCEEDED":
        await drain(messages)


def deadline_margin(remaining: float) -> float:
    """How long before a call's deadline a waiting pull gives up, so that its answer (which
    names the workers the step waits for) reaches the caller before the caller's own timeout."""
    return min(1.0, 0.1 * remaining)


def _parse(message: Any, raw: bytes, what: str) -> Any:
    try:
        return message.FromString(raw)
    except Exception:  # noqa: BLE001 - any decode failure is the client's
        raise ParamServerError.invalid("header", f"the first message of the {what} does not decode") from None


def _chunk_of(raw: bytes) -> tuple[int, int, int, int, int] | None:
    try:
        return parse_chunk_message(raw)
    except ValueError as exc:
        raise ParamServerError.invalid("chunk", f"malformed message: {exc}") from None


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


def add_shard_service(servicer: ShardServicer, server: aio.Server) -> None:
    """Register ShardService like the generated ``add_ShardServiceServicer_to_server``, except
    that the streams' messages arrive raw (chunks are parsed without a copy) and PullParameters
    may write pre-serialised messages (bytes pass straight through)."""
    handlers = {
        "UploadParameters": grpc.stream_unary_rpc_method_handler(
            servicer.UploadParameters,
            request_deserializer=None,
            response_serializer=_serialize,
        ),
        "PushGradients": grpc.stream_unary_rpc_method_handler(
            servicer.PushGradients,
            request_deserializer=None,
            response_serializer=_serialize,
        ),
        "PullParameters": grpc.unary_stream_rpc_method_handler(
            servicer.PullParameters,
            request_deserializer=None,  # parsed in the servicer: undecodable bytes are INVALID_ARGUMENT
            response_serializer=_serialize,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ShardService"].full_name
RECEIVED, SENT, PHASE = "paramserver_shard_received_bytes", "paramserver_shard_sent_bytes", "paramserver_step_phase_seconds"
