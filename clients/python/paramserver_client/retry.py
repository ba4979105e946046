"""Deadlines and retries: every call has a deadline; only UNAVAILABLE is retried."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from paramserver_client.errors import ServiceError, from_rpc_error

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE answers (the request id makes retries safe)."""

    attempts: int = 6
    """Tries in all (1 = no retry)."""
    initial_backoff_s: float = 0.1
    """Wait before the first retry."""
    max_backoff_s: float = 2.0
    """Longest wait between tries."""
    multiplier: float = 2.0
    """Growth of the wait."""


async def call_with_retry(
    fn: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    what: str,
    give_up: Callable[[ServiceError], Awaitable[bool]] | None = None,
) -> T:
    """Run fn, retrying UNAVAILABLE with jittered exponential backoff; raise ServiceError.
    `give_up(err)`, when given, is asked after an UNAVAILABLE whether retrying is pointless (e.g.
    the job is being restored elsewhere): then the error is raised at once."""
    backoff = policy.initial_backoff_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return await fn()
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
            if err.code != grpc.StatusCode.UNAVAILABLE or attempt == policy.attempts:
                raise err from None
            if give_up is not None and await give_up(err):
                raise err from None
            log.info("%s: UNAVAILABLE (%s); retry %d in %.2fs", what, err.message, attempt, backoff)
        await asyncio.sleep(backoff * (0.5 + random.random() / 2))
        backoff = min(policy.max_backoff_s, backoff * policy.multiplier)
    raise ServiceError(grpc.StatusCode.UNAVAILABLE, "", f"{what}: out of retries")  # pragma: no cover
