"""A loopback TCP proxy that injects network faults, for tests.

:class:`TcpProxy` listens on ``127.0.0.1`` on a free port and forwards every accepted connection
to a target ``host:port`` on the loopback interface. It runs its own asyncio event loop on a
daemon thread, so a synchronous test drives it with plain method calls; each fault setter runs
on the proxy's loop and returns once the change is in effect.

Faults:

* :meth:`TcpProxy.set_delay`: every forwarded read, in both directions, waits before it is written on.
* :meth:`TcpProxy.drop_connections`: every live connection is aborted now (the peers see a reset).
* :meth:`TcpProxy.set_blackhole`: connections are accepted and read, but nothing is forwarded (a hung peer).
* :meth:`TcpProxy.set_refuse`: new connections are reset right after accept.
* :meth:`TcpProxy.drop_after_bytes`: a one-shot abort after exactly *n* client->server bytes of a connection.

Only loopback addresses are ever bound or connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import ipaddress
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

__all__ = ["ProxyStats", "TcpProxy"]

_T = TypeVar("_T")

#: Bytes read per forwarded chunk.
_CHUNK = 65536
#: How long a call from the test thread waits for the proxy's loop.
_CALL_TIMEOUT_S = 10.0
#: How long an abort after ``drop_after_bytes`` waits for the forwarded bytes to leave the proxy.
_FLUSH_TIMEOUT_S = 1.0
#: SO_LINGER on, timeout 0: close() sends a TCP reset instead of a FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclasses.dataclass(slots=True)
class ProxyStats:
    """Counters of a :class:`TcpProxy` (``TcpProxy.stats`` returns a copy)."""

    #: TCP connections accepted, refused ones included.
    connections_accepted: int = 0
    #: Connections reset right after accept because of :meth:`TcpProxy.set_refuse`.
    connections_refused: int = 0
    #: Connections aborted by :meth:`TcpProxy.drop_connections` or :meth:`TcpProxy.drop_after_bytes`.
    connections_dropped: int = 0
    #: Bytes written to the target (bytes swallowed by a blackhole are not counted).
    bytes_client_to_server: int = 0
    #: Bytes written back to the clients.
    bytes_server_to_client: int = 0


@dataclasses.dataclass(eq=False)
class _Connection:
    """One proxied connection: the accepted client side and, once connected, the target side."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    #: Bytes forwarded client->server on this connection so far.
    sent: int = 0


def _parse_target(target: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(ip, port)``; the host must be ``localhost`` or in 127.0.0.0/8."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"target must be 'host:port', got {target!r}")
    if host == "localhost":
        return "127.0.0.1", int(port_text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"target host must be 'localhost' or an IPv4 loopback address, got {host!r}") from None
    if ip not in ipaddress.ip_network("127.0.0.0/8"):
        raise ValueError(f"target host must be in 127.0.0.0/8, got {host!r}")
    return str(ip), int(port_text)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close *writer*'s socket abruptly: pending bytes are discarded and the peer sees a reset."""
    if writer is None:
        return
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def _unsent_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes *writer* has not yet handed to its peer: asyncio's buffer plus, on Linux, the kernel's
    send queue (sent but not yet acknowledged)."""
    pending = writer.transport.get_write_buffer_size()
    sock = writer.transport.get_extra_info("socket")
    if sys.platform == "linux" and sock is not None:
        with contextlib.suppress(OSError):
            pending += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0)))[0]
    return pending


class TcpProxy:
    """A TCP proxy on ``127.0.0.1`` that forwards to *target* and injects faults on demand.

    Every public method may be called from any thread other than the proxy's own; the fault
    setters take effect before they return::

        with TcpProxy(server_address) as proxy:
            channel = grpc.insecure_channel(proxy.address)
            proxy.set_blackhole(True)
            ...
    """

    def __init__(self, target: str) -> None:
        """Prepare a proxy to *target* (``"host:port"``, host ``localhost`` or in 127.0.0.0/8); :meth:`start` starts it."""
        self._target = target
        self._host, self._port = _parse_target(target)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._listen_port = 0
        self._connections: set[_Connection] = set()
        self._stats = ProxyStats()
        self._delay = 0.0
        self._refuse = False
        self._blackhole = False
        self._unblocked: asyncio.Event | None = None
        self._drop_after: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> TcpProxy:
        """Start the proxy's loop thread and listen on a free loopback port; returns ``self``."""
        if self._loop is not None:
            raise RuntimeError("TcpProxy already started")
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, args=(loop,), name=f"TcpProxy->{self._target}", daemon=True)
        self._loop = loop
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(), loop).result(timeout=_CALL_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop listening, abort every live connection (not counted as dropped) and end the loop thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or loop.is_closed():
            return
        try:
            if thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=_CALL_TIMEOUT_S)
        finally:
            if thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=_CALL_TIMEOUT_S)

    def __enter__(self) -> TcpProxy:
        """Start the proxy (see :meth:`start`)."""
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Stop the proxy (see :meth:`stop`)."""
        self.stop()

    @property
    def address(self) -> str:
        """The proxy's listening address, ``"127.0.0.1:PORT"`` (only once started)."""
        if not self._listen_port:
            raise RuntimeError("TcpProxy not started")
        return f"127.0.0.1:{self._listen_port}"

    @property
    def target(self) -> str:
        """The ``host:port`` connections are forwarded to, as given."""
        return self._target

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the proxy's counters."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive() or loop.is_closed():
            return dataclasses.replace(self._stats)
        return self._call(lambda: dataclasses.replace(self._stats))

    # ------------------------------------------------------------------ faults

    def set_delay(self, seconds: float) -> None:
        """Delay every forwarded read, in both directions, by *seconds* before it is written on
        (0 turns the delay off). Chunks of one direction stay in order, so the delay also slows the stream."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, got {seconds}")
        self._call(lambda: setattr(self, "_delay", float(seconds)))

    def drop_connections(self) -> None:
        """Abort every live connection now: both its sockets are closed with SO_LINGER 0, so the client
        and the target see a reset (or EOF) and bytes in flight inside the proxy are lost. New connections
        are still accepted and forwarded."""
        self._call(self._drop_all)

    def set_blackhole(self, on: bool) -> None:
        """While *on*, keep accepting connections (and connecting them to the target) and keep reading
        from both sides, but forward nothing in either direction, end-of-stream included: a hung peer.

        Bytes read while the blackhole is on are dropped for good; turning it off forwards only what is
        read afterwards (and any end-of-stream held back). A connection that lost bytes this way usually
        carries a broken stream for a framed protocol such as HTTP/2; call :meth:`drop_connections` after
        turning the blackhole off so that clients reconnect on fresh connections.
        """
        self._call(lambda: self._set_blackhole(on))

    def set_refuse(self, on: bool) -> None:
        """While *on*, reset every new connection right after accept (live connections are untouched)."""
        self._call(lambda: setattr(self, "_refuse", bool(on)))

    def drop_after_bytes(self, n: int) -> None:
        """Arm a one-shot fault: the first connection to forward its *n*-th client->server byte (counted
        from the start of that connection) is aborted right there, after exactly *n* of its bytes have been
        forwarded to the target, as if the client died in the middle of a stream. A connection that has
        already forwarded *n* bytes or more when this is armed is not affected. Arming again replaces a
        fault that has not fired yet."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self._call(lambda: setattr(self, "_drop_after", int(n)))

    # ------------------------------------------------------------------ loop side

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        """The proxy thread: run *loop* until stopped, then close it."""
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run *fn* on the proxy's loop and return its result (directly when already on the loop thread)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            raise RuntimeError("TcpProxy not running")
        if threading.get_ident() == thread.ident:
            return fn()

        async def run() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=_CALL_TIMEOUT_S)

    async def _listen(self) -> None:
        """Open the listening socket on 127.0.0.1 and a free port."""
        self._unblocked = asyncio.Event()
        self._unblocked.set()
        self._server = await asyncio.start_server(self._accepted, host="127.0.0.1", port=0)
        self._listen_port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        """Stop listening and abort and reap every connection."""
        if self._server is not None:
            self._server.close()
        tasks = [c.task for c in self._connections if c.task is not None]
        for conn in list(self._connections):
            self._abort_connection(conn)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _set_blackhole(self, on: bool) -> None:
        """Loop side of :meth:`set_blackhole`."""
        self._blackhole = bool(on)
        assert self._unblocked is not None
        if self._blackhole:
            self._unblocked.clear()
        else:
            self._unblocked.set()

    def _drop_all(self) -> None:
        """Loop side of :meth:`drop_connections`."""
        for conn in list(self._connections):
            self._abort_connection(conn)
            self._stats.connections_dropped += 1

    def _abort_connection(self, conn: _Connection) -> None:
        """Reset both sides of *conn* and cancel its task (idempotent)."""
        self._connections.discard(conn)
        _abort(conn.client)
        _abort(conn.server)
        if conn.task is not None:
            conn.task.cancel()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's accept callback: count the connection and hand it to its own task."""
        self._stats.connections_accepted += 1
        if self._refuse:
            self._stats.connections_refused += 1
            _abort(writer)
            return
        conn = _Connection(client=writer)
        self._connections.add(conn)
        conn.task = asyncio.get_running_loop().create_task(self._serve(conn, reader))

    async def _serve(self, conn: _Connection, client_reader: asyncio.StreamReader) -> None:
        """Connect *conn* to the target and pump bytes both ways until both directions end."""
        try:
            try:
                server_reader, conn.server = await asyncio.open_connection(self._host, self._port)
            except OSError:
                self._abort_connection(conn)
                return
            if conn not in self._connections:  # dropped while connecting
                _abort(conn.server)
                return
            await asyncio.gather(
                self._pump(conn, client_reader, conn.server, to_server=True),
                self._pump(conn, server_reader, conn.client, to_server=False),
            )
        finally:
            self._connections.discard(conn)
            for writer in (conn.client, conn.server):
                if writer is not None and not writer.transport.is_closing():
                    writer.transport.close()

    async def _pump(self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_server: bool) -> None:
        """Forward one direction of *conn*, applying the faults, until end-of-stream or an error."""
        try:
            while data := await reader.read(_CHUNK):
                if self._delay > 0:
                    await asyncio.sleep(self._delay)
                if self._blackhole:
                    continue
                if to_server and self._drop_after is not None and conn.sent < self._drop_after <= conn.sent + len(data):
                    cut = self._drop_after - conn.sent
                    self._drop_after = None
                    await self._forward(conn, writer, data[:cut], to_server=True)
                    await self._flush(writer)
                    self._abort_connection(conn)
                    self._stats.connections_dropped += 1
                    return
                await self._forward(conn, writer, data, to_server=to_server)
            assert self._unblocked is not None
            await self._unblocked.wait()  # a blackhole swallows end-of-stream too, until it is lifted
            if writer.can_write_eof() and not writer.transport.is_closing():
                writer.write_eof()
        except OSError:  # a reset or a write to a closed peer: pass the failure on to the other side
            self._abort_connection(conn)

    async def _forward(self, conn: _Connection, writer: asyncio.StreamWriter, data: bytes, *, to_server: bool) -> None:
        """Write *data* on *writer*, wait for buffer room and count it."""
        writer.write(data)
        if to_server:
            conn.sent += len(data)
            self._stats.bytes_client_to_server += len(data)
        else:
            self._stats.bytes_server_to_client += len(data)
        await writer.drain()

    @staticmethod
    async def _flush(writer: asyncio.StreamWriter) -> None:
        """Wait (up to a second) until everything written on *writer* has reached its peer, so that an
        abort right after does not discard forwarded bytes."""
        deadline = time.monotonic() + _FLUSH_TIMEOUT_S
        while _unsent_bytes(writer) > 0 and time.monotonic() < deadline and not writer.transport.is_closing():
            await asyncio.sleep(0.001)
