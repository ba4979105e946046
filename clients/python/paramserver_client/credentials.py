"""How a client proves who it is and reaches a TLS port: a bearer token and TLS files.

Arguments win over the environment:

* ``PARAMSERVER_TOKEN``: an admin token (tenant) or a job's worker token, sent on every call as
  the metadata ``authorization: Bearer TOKEN`` (front door and shards).
* ``PARAMSERVER_TLS_CA``: PEM file of the CA that signed the service's certificates (turns TLS on).
* ``PARAMSERVER_TLS_CERT`` / ``PARAMSERVER_TLS_KEY``: PEM files of this client's certificate and
  key, for services that require client certificates (mutual TLS).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

TOKEN_ENV = "PARAMSERVER_TOKEN"
TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV = "PARAMSERVER_TLS_CA", "PARAMSERVER_TLS_CERT", "PARAMSERVER_TLS_KEY"


@dataclass(frozen=True)
class Credentials:
    """A token and TLS files (all optional). Build with :meth:`resolve`."""

    token: str = field(default="", repr=False)
    tls_ca: str = ""
    """PEM file of the CA to trust; set (or tls_cert set) = connect with TLS."""
    tls_cert: str = ""
    tls_key: str = ""

    @classmethod
    def resolve(
        cls,
        credentials: Credentials | None = None,
        *,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> Credentials:
        """`credentials` (else the environment), with any argument given replacing its field."""
        base = credentials or cls(
            os.environ.get(TOKEN_ENV, ""), os.environ.get(TLS_CA_ENV, ""), os.environ.get(TLS_CERT_ENV, ""), os.environ.get(TLS_KEY_ENV, "")
        )
        given = {"token": token, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
        out = dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})
        if bool(out.tls_cert) != bool(out.tls_key):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        return out

    def with_token(self, token: str) -> Credentials:
        """The same TLS settings with another token."""
        return dataclasses.replace(self, token=token)

    @property
    def tls(self) -> bool:
        """Whether channels use TLS."""
        return bool(self.tls_ca or self.tls_cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying the token (none without one)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: Sequence[tuple[str, Any]]) -> aio.Channel:
        """An asyncio channel to `address` with TLS if configured and the token on every call."""
        extra = self.metadata()
        interceptors: Any = [c(extra) for c in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)] if extra else None
        if not self.tls:
            return aio.insecure_channel(address, options=list(options), interceptors=interceptors)
        ssl = grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca),
            private_key=_read(self.tls_key),
            certificate_chain=_read(self.tls_cert),
        )
        return aio.secure_channel(address, ssl, options=list(options), interceptors=interceptors)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


class _AddMetadata:
    """Adds fixed metadata to a call's details."""

    def __init__(self, extra: tuple[tuple[str, str], ...]) -> None:
        self.extra = extra

    def _details(self, d: aio.ClientCallDetails) -> aio.ClientCallDetails:
        metadata = aio.Metadata(*(tuple(d.metadata or ()) + self.extra))
        return aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)


# grpc.aio files each interceptor under one call shape only: one class per shape.
class _UnaryUnary(_AddMetadata, aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_AddMetadata, aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, client_call_details: aio.ClientCallDetails, request: Any) -> Any:
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_AddMetadata, aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(self, continuation: Any, client_call_details: aio.ClientCallDetails, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_AddMetadata, aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(self, continuation: Any, client_call_details: aio.ClientCallDetails, request_iterator: Any) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)
