"""TLS for the service's ports: certificates from files, reloaded when the files change.

Every port (the front door and every shard) serves with the same certificate files (on a
cluster: the same paths on every node). With a client CA the ports require client certificates
signed by it (mutual TLS). The files are read again for new connections once any of them
changes (a rotated certificate is served without a restart; connections already open keep theirs).
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """PEM files of a port's TLS: its certificate chain and key, and (mTLS) the clients' CA."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""
    """Set: clients must present a certificate signed by this CA (mutual TLS)."""

    def __post_init__(self) -> None:
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"TLS {name}: no file {path!r}")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials that re-read the files when they change."""
        return _Reloading(self).credentials()


class _Reloading:
    """The certificate configuration, and a fetcher gRPC calls at each new handshake."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._stamp = self._stat()

    def _files(self) -> list[str]:
        return [f for f in (self.config.cert_file, self.config.key_file, self.config.client_ca_file) if f]

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for f in self._files():
            try:
                st = os.stat(f)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0))
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        c = self.config
        pair = (Path(c.key_file).read_bytes(), Path(c.cert_file).read_bytes())
        ca = Path(c.client_ca_file).read_bytes() if c.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when a file changed since the last load, else None (keep)."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            try:
                ssl.create_default_context().load_cert_chain(self.config.cert_file, self.config.key_file)  # a matching pair?
                loaded = self._load()
            except (OSError, ssl.SSLError) as exc:  # half-written, or cert and key not both replaced yet
                log.warning("TLS files changed but are not a usable pair yet (%s); keeping the previous certificate", exc)
                return None
            self._stamp = stamp
            log.info("TLS certificate files changed: serving the new certificate to new connections")
            return loaded

    def credentials(self) -> grpc.ServerCredentials:
        fetch: Any = self.fetch  # grpc's stubs want a configuration always; None means "keep"
        return grpc.dynamic_ssl_server_credentials(self._load(), fetch, require_client_authentication=bool(self.config.client_ca_file))
