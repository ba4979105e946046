"""A network link of a given bandwidth between this process and the service, emulated on loopback.

On one machine the worker reaches the shards over loopback, where bytes cost only CPU; a real
worker sits behind a NIC. :class:`Link` puts a TCP proxy in front of each shard port the worker
dials, and every byte through them shares one uplink (worker -> service) and one downlink
(service -> worker) of `mbps` megabits per second each, as the worker's network card would.
:class:`LinkedCredentials` makes a client dial the shards through the link (the front door
directly: its calls are small). Benchmarks only; loopback only.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from paramserver_client.credentials import Credentials

#: Bytes relayed per read: the pacing's granularity (2 ms at 1 Gbit/s).
PIECE = 256 << 10


class _Pacer:
    """One direction of the link: bytes leave at `rate` bytes per second, in arrival order."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = 0.0

    def wait(self, n: int) -> None:
        """Block until `n` more bytes may leave."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + n / self.rate
        done = start + n / self.rate
        if done > now:
            time.sleep(done - now)


class Link:
    """Paced loopback proxies, one per shard address, created when first dialled."""

    def __init__(self, mbps: float) -> None:
        if mbps <= 0:
            raise ValueError("mbps must be > 0")
        self.mbps = mbps
        self.up, self.down = _Pacer(mbps * 1e6 / 8), _Pacer(mbps * 1e6 / 8)
        self._routes: dict[str, str] = {}
        self._listeners: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def route(self, address: str) -> str:
        """The proxy address that reaches `address` through the link."""
        with self._lock:
            if address not in self._routes:
                host, port = address.rsplit(":", 1)
                if host not in ("127.0.0.1", "localhost"):
                    raise ValueError(f"{address}: the emulated link reaches loopback only")
                listener = socket.create_server(("127.0.0.1", 0))
                self._listeners.append(listener)
                threading.Thread(target=self._accept, args=(listener, (host, int(port))), daemon=True).start()
                self._routes[address] = f"127.0.0.1:{listener.getsockname()[1]}"
            return self._routes[address]

    def _accept(self, listener: socket.socket, target: tuple[str, int]) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(target)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._relay, args=(client, server, self.up), daemon=True).start()
            threading.Thread(target=self._relay, args=(server, client, self.down), daemon=True).start()

    @staticmethod
    def _relay(src: socket.socket, dst: socket.socket, pacer: _Pacer) -> None:
        buf = bytearray(PIECE)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    break
                pacer.wait(n)
                dst.sendall(view[:n])
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting (open connections end with their peers)."""
        self._closed = True
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()


@dataclass(frozen=True)
class LinkedCredentials(Credentials):
    """Credentials whose channels to the shards go through `link` (the front door's do not)."""

    link: Link | None = field(default=None, compare=False, repr=False)
    front_door: str = ""

    def channel(self, address: str, options: Sequence[tuple[str, Any]]) -> aio.Channel:
        if self.link is not None and address != self.front_door:
            address = self.link.route(address)
        return super().channel(address, options)
