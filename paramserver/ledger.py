"""The exactly-once ledger: request id -> (fingerprint, first answer), bounded.

A call repeated with the same request id gets the first answer; the same id
with a different fingerprint (another call) is refused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from paramserver.errors import ParamServerError, Reason

T = TypeVar("T")

DEFAULT_CAPACITY = 65536


class Ledger(Generic[T]):
    """A bounded map from request id to the first answer (oldest evicted first)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._entries: OrderedDict[str, tuple[Hashable, T]] = OrderedDict()
        self._capacity = capacity

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, request_id: str, fingerprint: Hashable) -> T | None:
        """The first answer for request_id, or None; REQUEST_ID_REUSED if the call differs."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        if entry[0] != fingerprint:
            raise ParamServerError.invalid("request_id", f"request id {request_id!r} was used for another call", Reason.REQUEST_ID_REUSED)
        return entry[1]

    def peek(self, request_id: str) -> tuple[Hashable, T] | None:
        """(fingerprint, first answer) for request_id, or None (the caller compares)."""
        return self._entries.get(request_id)

    def record(self, request_id: str, fingerprint: Hashable, answer: T) -> None:
        """Remember the answer for request_id."""
        self._entries[request_id] = (fingerprint, answer)
        self._entries.move_to_end(request_id)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def forget(self, request_id: str) -> None:
        """Drop an entry (a call that failed and may be retried)."""
        self._entries.pop(request_id, None)

    def items(self) -> list[tuple[str, Hashable, T]]:
        """Every entry, oldest first (for snapshots)."""
        return [(k, fp, a) for k, (fp, a) in self._entries.items()]
