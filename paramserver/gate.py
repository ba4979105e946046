"""Who may make a call: the front door's authentication and authorization, and the shard ports'
token check (a gRPC server interceptor).

The front door authenticates the "authorization: Bearer TOKEN" metadata (a tenant's admin token,
or a job's worker token, whose hashes the coordinator keeps), then authorizes the call: admin-only
methods, the job a worker token is for, the tenant a job belongs to. The caller is left in
:data:`CALLER` for the servicer (ListJobs lists the caller's tenant's jobs).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from paramserver.access import OPEN, AuthConfig, Caller, Tokens, accepts, bearer, denied, job_of_token, unauthenticated
from paramserver.errors import ParamServerError, Reason
from paramserver.membership import Roster
from paramserver.rpc import drain
from paramserver_client.errors import status_proto

#: JobService methods only an admin token may call.
ADMIN_ONLY = frozenset({"CreateJob", "DeleteJob", "RollbackJob", "RotateJobToken", "ListJobs"})
#: Seconds the front door trusts its copy of a job's tokens (a token retired by RotateJobToken
#: through another front door is refused at most this late).
TOKEN_CACHE_S = 2.0

#: What every unknown, forged, retired or mistyped token is told (one message: no probing).
UNKNOWN_TOKEN = "the token is not one this service accepts (unknown, or retired by RotateJobToken)"

#: The caller of the JobService call being served.
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("paramserver_caller", default=OPEN)

Lookup = Callable[[str], Awaitable[tuple[str, Tokens]]]

log = logging.getLogger(__name__)


class FrontDoorGate:
    """Authenticates and authorizes JobService calls (everything passes when `auth` is None)."""

    def __init__(self, auth: AuthConfig | None, lookup: Lookup) -> None:
        self.auth = auth
        self.lookup = lookup
        self._cache: dict[str, tuple[float, str, Tokens]] = {}

    @property
    def secured(self) -> bool:
        """Whether calls need credentials."""
        return self.auth is not None

    def forget(self, job_id: str) -> None:
        """Drop the cached tokens of a job (after this front door changed them)."""
        self._cache.pop(job_id, None)

    async def _access(self, job_id: str, fresh: bool = False) -> tuple[str, Tokens]:
        hit = self._cache.get(job_id)
        now = time.monotonic()
        if hit is not None and not fresh and now - hit[0] < TOKEN_CACHE_S:
            return hit[1], hit[2]
        tenant, tokens = await self.lookup(job_id)
        self._cache[job_id] = (now, tenant, tokens)
        if len(self._cache) > 10000:
            self._cache.pop(next(iter(self._cache)))
        return tenant, tokens

    async def authenticate(self, metadata: Any) -> Caller:
        """The caller a call's metadata names; UNAUTHENTICATED when it names none."""
        if self.auth is None:
            return OPEN
        token = bearer(metadata)
        if token is None:
            raise unauthenticated("this service requires credentials: send the metadata 'authorization: Bearer TOKEN'")
        tenant = self.auth.admin(token)
        if tenant is not None:
            return Caller("admin", tenant.name)
        job_id = job_of_token(token)
        if job_id is None:
            raise unauthenticated(UNKNOWN_TOKEN)
        try:
            owner, tokens = await self._access(job_id)
            if not accepts(tokens, token):
                owner, tokens = await self._access(job_id, fresh=True)  # rotated meanwhile?
        except ParamServerError as err:
            if err.code == "NOT_FOUND":
                raise unauthenticated(UNKNOWN_TOKEN) from None
            raise
        if not accepts(tokens, token):
            raise unauthenticated(UNKNOWN_TOKEN)
        return Caller("worker", owner, job_id)

    async def guard(self, method: str, request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        """rpc.Guard: check the call and leave its caller in CALLER for the servicer. A bug in the
        check refuses the call (INTERNAL, reason INTERNAL_ERROR) without quoting the exception,
        whose text might hold the token."""
        try:
            caller = await self.check(method, request, context.invocation_metadata())
        except ParamServerError:
            raise
        except Exception as exc:  # noqa: BLE001 - refused, never passed
            raise _check_failed(exc, "the front door") from None
        CALLER.set(caller)

    async def check(self, method: str, request: Any, metadata: Any) -> Caller:
        """Authenticate, then authorize `method` on the job `request` names; the caller."""
        caller = await self.authenticate(metadata)
        if caller.kind == "open":
            return caller
        job_id = str(getattr(request, "job_id", "") or "")
        if caller.kind == "worker":
            if method in ADMIN_ONLY:
                raise denied(f"{method} needs an admin token; a worker token only reaches its own job's worker calls", job_id=job_id)
            if job_id and job_id != caller.job_id:
                raise denied(f"this worker token is for job {caller.job_id!r}, not {job_id!r}", job_id=job_id)
            return caller
        if job_id and method != "CreateJob":  # an admin reaches its own tenant's jobs
            try:
                owner, _ = await self._access(job_id)
            except ParamServerError as err:
                if err.code == "NOT_FOUND":
                    return caller  # the call itself answers NOT_FOUND
                raise
            if owner != caller.tenant:
                raise denied(f"job {job_id!r} belongs to another tenant", job_id=job_id)
        return caller


class ShardGate(aio.ServerInterceptor):  # type: ignore[type-arg]
    """A shard port's token check: when the job's roster is secured, every ShardService call must
    carry one of its worker tokens (UNAUTHENTICATED otherwise; PERMISSION_DENIED for a worker token
    of another job). Health and reflection pass."""

    def __init__(self, job_id: str, roster: Callable[[], Roster], service: str) -> None:
        self.job_id = job_id
        self.roster = roster
        self.service = service

    def refusal(self, metadata: Any) -> ParamServerError | None:
        """Why a call with `metadata` is refused, or None."""
        roster = self.roster()
        if not roster.secured:
            return None
        token = bearer(metadata)
        if token is None:
            return unauthenticated("this shard requires the job's worker token: metadata 'authorization: Bearer TOKEN'")
        if accepts(roster.tokens, token):
            return None
        named = job_of_token(token)
        if named is not None and named != self.job_id:
            return denied(f"this shard serves job {self.job_id!r}; the token is for job {named!r}", job_id=self.job_id)
        return unauthenticated(f"the worker token for job {self.job_id!r} is not valid (unknown, or retired by RotateJobToken)")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Refuse before the handler runs; pass health and reflection."""
        if not details.method.startswith(f"/{self.service}/"):
            return await continuation(details)
        try:
            err = self.refusal(details.invocation_metadata)
        except Exception as exc:  # noqa: BLE001 - a bug here refuses (INTERNAL with a reason), never passes
            err = _check_failed(exc, f"a shard of job {self.job_id!r}")
        handler = await continuation(details)
        if err is None or handler is None:
            return handler
        return refusing(handler, err)


def _check_failed(exc: BaseException, where: str) -> ParamServerError:
    """The refusal of a call whose credentials could not be checked (a bug): logged by the
    exception's type only (its text might quote the token), answered INTERNAL with a reason."""
    log.error("the credentials check of %s failed with %s", where, type(exc).__name__)
    return ParamServerError("INTERNAL", Reason.INTERNAL_ERROR, "the service could not check the call's credentials")


def refusing(handler: grpc.RpcMethodHandler[Any, Any], err: ParamServerError) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that answers `err` without reading the request."""
    code = getattr(grpc.StatusCode, err.code, grpc.StatusCode.UNKNOWN)
    status = status_proto(code, err.reason, err.message, err.metadata)

    async def unary_out(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await drain(request)
        await context.abort_with_status(status)  # type: ignore[attr-defined]

    async def stream_out(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await drain(request)
        await context.abort_with_status(status)  # type: ignore[attr-defined]
        yield b""  # pragma: no cover - abort raises

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_out)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_out)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_out)
    return grpc.unary_unary_rpc_method_handler(unary_out)


__all__ = ["ADMIN_ONLY", "CALLER", "FrontDoorGate", "ShardGate", "refusing"]
