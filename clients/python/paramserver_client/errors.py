"""Error reasons shared by the service and its clients, and typed client exceptions.

Every error the service sends is a ``google.rpc.Status`` whose details hold
one ``google.rpc.ErrorInfo`` with ``domain == DOMAIN`` and an UPPER_SNAKE
``reason`` (the names of ``paramserver.v1.ErrorReason``). The client turns
it back into a :class:`ServiceError` so that callers branch on
``err.reason``, never on message text.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from paramserver_client.reasons import DOMAIN, Reason

__all__ = ["DOMAIN", "JobRolledBack", "Reason", "ServiceError", "from_rpc_error", "status_proto"]


class ServiceError(Exception):
    """An error answered by the service (or by gRPC itself).

    Attributes:
        code: the gRPC status code.
        reason: the ErrorInfo reason, or "" when the answer carried none
            (e.g. a transport error such as UNAVAILABLE or DEADLINE_EXCEEDED).
        metadata: the ErrorInfo metadata (e.g. ``field``, ``current_version``).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name} {reason}: {message}" if reason else f"{code.name}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class JobRolledBack(ServiceError):
    """The job lost a shard and was restored to an earlier version (ABORTED, JOB_ROLLED_BACK).

    The worker has already reconnected to the new shards; pull `resume_version` and continue the
    training loop from that step (rewind the data to it, if the loop can).
    """

    def __init__(self, resume_version: int, generation: int, message: str = "") -> None:
        super().__init__(
            grpc.StatusCode.ABORTED,
            Reason.JOB_ROLLED_BACK,
            message or f"the job was restored to version {resume_version} after losing a shard; resume from that step",
            {"resume_version": str(resume_version), "generation": str(generation)},
        )
        self.resume_version = resume_version
        self.generation = generation


#: Longest error message and ErrorInfo metadata value an answer carries (UTF-8 bytes): an error
#: that quotes a request's field must stay well below gRPC's 8 KiB limit on trailing metadata
#: (the message travels twice, once percent-encoded), or the client would get RESOURCE_EXHAUSTED
#: from its transport instead of the error.
MAX_ERROR_MESSAGE_BYTES, MAX_ERROR_METADATA_BYTES = 600, 160


def _bounded(text: str, limit: int) -> str:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[: limit - 32].decode("utf-8", "ignore") + f"...({len(raw) - limit + 32} more bytes)"


def status_proto(code: grpc.StatusCode, reason: str, message: str, metadata: Mapping[str, str] | None = None) -> grpc.Status:
    """Build the grpc.Status (with a google.rpc.Status/ErrorInfo detail) for an error; the message
    and metadata values are cut to MAX_ERROR_MESSAGE_BYTES / MAX_ERROR_METADATA_BYTES."""
    from google.protobuf import any_pb2
    from google.rpc import status_pb2

    bounded = {_bounded(str(k), 64): _bounded(str(v), MAX_ERROR_METADATA_BYTES) for k, v in (metadata or {}).items()}
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=bounded)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=_bounded(message, MAX_ERROR_MESSAGE_BYTES), details=[detail])
    return rpc_status.to_status(status)


def from_rpc_error(err: grpc.RpcError) -> ServiceError:
    """Turn a grpc.RpcError (sync or aio) into a ServiceError with its reason."""
    code: grpc.StatusCode = err.code()
    details: str = err.details() or ""
    reason = ""
    metadata: dict[str, str] = {}
    status = None
    try:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ValueError, AttributeError):  # pragma: no cover - malformed trailers
        status = None
    if status is None:
        for key, value in _trailing(err):
            if key == "grpc-status-details-bin" and isinstance(value, bytes):
                from google.rpc import status_pb2

                status = status_pb2.Status.FromString(value)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                metadata = dict(info.metadata)
                break
    return ServiceError(code, reason, details, metadata)


def _trailing(err: grpc.RpcError) -> list[tuple[str, str | bytes]]:
    trailing = getattr(err, "trailing_metadata", None)
    if trailing is None:
        return []
    try:
        md = trailing()
    except Exception:  # noqa: BLE001  # pragma: no cover - defensive
        return []
    return [(str(k), v) for k, v in (md or ())]
