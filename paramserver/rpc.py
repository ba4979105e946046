"""gRPC plumbing shared by the servicers: error translation and server options."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio

from paramserver.errors import ParamServerError, Reason
from paramserver_client.codec import MAX_MESSAGE_BYTES
from paramserver_client.errors import status_proto

log = logging.getLogger(__name__)

#: Options of every server and channel of the service.
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
G = TypeVar("G", bound=Callable[..., AsyncIterator[Any]])


async def abort(context: aio.ServicerContext[Any, Any], err: ParamServerError) -> None:
    """Abort the call with err's status code, message and ErrorInfo."""
    code = getattr(grpc.StatusCode, err.code, grpc.StatusCode.UNKNOWN)
    await context.abort_with_status(status_proto(code, err.reason, err.message, err.metadata))  # type: ignore[attr-defined]


def _internal(exc: BaseException) -> ParamServerError:
    log.exception("internal error", exc_info=exc)
    return ParamServerError("INTERNAL", Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")


def unary(fn: F) -> F:
    """Wrap a unary or client-stream handler: ParamServerError -> its status; bugs -> INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        start, code = time.perf_counter(), "OK"
        try:
            return await fn(self, request, context)
        except ParamServerError as err:
            code = err.code
            await abort(context, err)
        except (aio.AbortError, aio.UsageError):
            got = context.code()
            code = got.name if isinstance(got, grpc.StatusCode) else "UNKNOWN"
            raise
        except Exception as exc:  # noqa: BLE001 - turned into INTERNAL with a reason
            code = "INTERNAL"
            await abort(context, _internal(exc))
        finally:
            observe: Observer | None = getattr(self, "observe", None)
            if observe is not None:
                observe(fn.__name__, code, time.perf_counter() - start)

    return wrapper  # type: ignore[return-value]


#: What a servicer's ``observe`` attribute is called with after each call `unary` wraps: the
#: method's name, the status code's name and the seconds it took (the front door's metrics).
Observer = Callable[[str, str, float], None]


#: How much of a refused call's request stream is read (and dropped) before the refusal is sent.
DRAIN_S, DRAIN_BYTES = 5.0, 64 << 20


async def drain(request: Any) -> None:
    """Read what is left of a refused request stream (at most DRAIN_S seconds and DRAIN_BYTES),
    dropping it: a grpc.aio client still writing when the call ends reports INTERNAL "Internal
    error from Core" instead of the status (grpc/grpc#36066). Anything but a stream: nothing."""
    if not hasattr(request, "__aiter__"):
        return
    seen = 0
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DRAIN_S):
            async for message in request:
                seen += len(message) if isinstance(message, bytes | bytearray | memoryview) else 0
                if seen > DRAIN_BYTES:
                    return


def decode(message_class: Any, raw: bytes, field: str = "request") -> Any:
    """Parse a request; bytes that do not decode are INVALID_ARGUMENT naming `field`."""
    try:
        return message_class.FromString(raw)
    except Exception:  # noqa: BLE001 - any decode failure is the caller's
        raise ParamServerError.invalid(field, f"{len(raw)} bytes that do not decode as {message_class.DESCRIPTOR.full_name}") from None


#: Runs before a method with its name, its parsed request and its context; raises to refuse.
Guard = Callable[[str, Any, Any], Awaitable[None]]


def add_unary_service(servicer: Any, service: ServiceDescriptor, server: aio.Server, guard: Guard | None = None) -> None:
    """Register a service of unary (and server-streaming) methods like the generated
    ``add_*Servicer_to_server``, except that requests arrive as bytes and are parsed here:
    undecodable bytes are INVALID_ARGUMENT (gRPC's own deserialization would answer UNKNOWN).
    `guard` (authentication) runs after parsing and before the method; for bytes that do not
    decode it runs first on an empty request, so an unauthenticated caller is UNAUTHENTICATED."""

    def handler(method: Any) -> grpc.RpcMethodHandler[Any, Any]:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        call = getattr(servicer, method.name)

        async def admit(raw: bytes, context: aio.ServicerContext[Any, Any]) -> Any:
            try:
                try:
                    request = decode(request_class, raw)
                except ParamServerError as undecodable:
                    if guard is not None:  # who is calling comes first: an unknown caller learns nothing of the request
                        try:
                            await guard(method.name, request_class(), context)
                        except ParamServerError as refused:
                            if refused.code == "UNAUTHENTICATED":
                                raise
                    raise undecodable
                if guard is not None:
                    await guard(method.name, request, context)
            except ParamServerError as err:
                await abort(context, err)
            except Exception as exc:  # noqa: BLE001 - a guard's bug is INTERNAL, never a pass
                await abort(context, _internal(exc))
            return request

        async def parse_then_call(raw: bytes, context: aio.ServicerContext[Any, Any]) -> Any:
            request = await admit(raw, context)
            return await call(request, context)

        async def parse_then_stream(raw: bytes, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            request = await admit(raw, context)
            async for item in call(request, context):
                yield item

        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(
                parse_then_stream, request_deserializer=None, response_serializer=response_class.SerializeToString
            )
        return grpc.unary_unary_rpc_method_handler(
            parse_then_call, request_deserializer=None, response_serializer=response_class.SerializeToString
        )

    handlers = {m.name: handler(m) for m in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def streaming(fn: G) -> G:
    """Wrap a server-stream handler (an async generator) like :func:`unary`."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except ParamServerError as err:
            await abort(context, err)
        except (aio.AbortError, aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001
            await abort(context, _internal(exc))

    return wrapper  # type: ignore[return-value]
