"""gRPC plumbing shared by the servicers: error translation and server options."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
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
        try:
            return await fn(self, request, context)
        except ParamServerError as err:
            await abort(context, err)
        except (aio.AbortError, aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - turned into INTERNAL with a reason
            await abort(context, _internal(exc))

    return wrapper  # type: ignore[return-value]


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
