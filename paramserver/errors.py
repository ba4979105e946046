"""The service's error type: a status code name, a machine-readable reason, metadata.

Pure: no gRPC import. The gRPC layer maps :attr:`ParamServerError.code` to a
``grpc.StatusCode`` and the reason to a ``google.rpc.ErrorInfo``.
"""

from __future__ import annotations

from collections.abc import Mapping

from paramserver_client.reasons import Reason

__all__ = ["ConfigError", "ParamServerError", "Reason"]


class ParamServerError(Exception):
    """An error with a gRPC status code name (e.g. "INVALID_ARGUMENT") and a reason."""

    def __init__(
        self,
        code: str,
        reason: str,
        message: str,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = {k: str(v) for k, v in (metadata or {}).items()}

    def __reduce__(self) -> tuple[object, ...]:
        # Crosses Ray process boundaries intact.
        return (type(self), (self.code, self.reason, self.message, self.metadata))

    @classmethod
    def invalid(cls, field: str, message: str, reason: str = Reason.INVALID_FIELD, **metadata: object) -> ParamServerError:
        """INVALID_ARGUMENT naming `field`."""
        return cls("INVALID_ARGUMENT", reason, f"{field}: {message}", {"field": field, **metadata})

    @classmethod
    def not_found(cls, reason: str, message: str, **metadata: object) -> ParamServerError:
        """NOT_FOUND."""
        return cls("NOT_FOUND", reason, message, metadata)

    @classmethod
    def precondition(cls, reason: str, message: str, **metadata: object) -> ParamServerError:
        """FAILED_PRECONDITION."""
        return cls("FAILED_PRECONDITION", reason, message, metadata)


class ConfigError(ParamServerError):
    """A bad job description, optimizer or schedule setting (INVALID_ARGUMENT naming the field)."""

    def __init__(self, field: str, message: str, reason: str = Reason.INVALID_FIELD) -> None:
        super().__init__("INVALID_ARGUMENT", reason, f"{field}: {message}", {"field": field})
        self.field = field

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.field, self.message.split(": ", 1)[-1], self.reason))
