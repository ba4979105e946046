"""TcpProxy against a threaded echo server and a gRPC health server (no Ray).

Timing assertions are lower bounds only; every wait has a generous timeout so a slow machine
fails nothing but the test that actually hangs.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.faults.proxy import TcpProxy

#: Socket timeout for reads that are expected to answer.
_IO_TIMEOUT_S = 5.0
#: Socket timeout for reads that are expected to hang.
_HANG_TIMEOUT_S = 0.5


class EchoServer:
    """A threaded TCP echo server on 127.0.0.1; ``received`` gets, per closed connection, how many bytes it read."""

    def __init__(self) -> None:
        """Listen on a free loopback port and start accepting."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.received: queue.Queue[int] = queue.Queue()
        self._stopping = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="echo-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        """Accept connections until stopped, one thread each."""
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="echo-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        """Echo until end-of-stream or a reset; keep reading (and counting) after a failed echo."""
        total, echoing = 0, True
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                total += len(data)
                if echoing:
                    try:
                        conn.sendall(data)
                    except OSError:
                        echoing = False
        self.received.put(total)

    def stop(self) -> None:
        """Stop accepting and shut every connection down."""
        self._stopping.set()
        self._thread.join(timeout=_IO_TIMEOUT_S)
        self._listener.close()
        with self._lock:
            for conn in self._conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    """A running echo server."""
    server = EchoServer()
    yield server
    server.stop()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    """A proxy in front of the echo server."""
    with TcpProxy(echo.address) as p:
        yield p


def _connect(address: str, timeout: float = _IO_TIMEOUT_S) -> socket.socket:
    """A client socket connected to *address* with the given timeout."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly *n* bytes (fails on an early end-of-stream)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"end-of-stream after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def _round_trip(address: str, payload: bytes = b"hello through the proxy") -> None:
    """Send *payload* on a fresh connection to *address* and check that it comes back."""
    with _connect(address) as sock:
        sock.sendall(payload)
        assert _recv_exactly(sock, len(payload)) == payload


def _read_until_closed(sock: socket.socket) -> bytes:
    """Read until end-of-stream or a connection error; what was read before."""
    buf = bytearray()
    try:
        while chunk := sock.recv(65536):
            buf += chunk
    except ConnectionError:
        pass
    return bytes(buf)


# ---------------------------------------------------------------------------- plain TCP


def test_round_trip(proxy: TcpProxy) -> None:
    payload = bytes(range(256)) * 1000
    with _connect(proxy.address) as sock:
        sock.sendall(payload)
        assert _recv_exactly(sock, len(payload)) == payload
    stats = proxy.stats
    assert stats.connections_accepted == 1
    assert stats.bytes_client_to_server == len(payload)
    assert stats.bytes_server_to_client == len(payload)
    assert stats.connections_dropped == 0


def test_rejects_non_loopback_targets() -> None:
    for target in ("10.0.0.1:80", "example.com:80", "0.0.0.0:80", "[::1]:80", "127.0.0.1", "127.0.0.1:0"):
        with pytest.raises(ValueError):
            TcpProxy(target)
    TcpProxy("localhost:80")
    TcpProxy("127.1.2.3:80")


def test_delay_slows_a_round_trip(proxy: TcpProxy) -> None:
    delay = 0.2
    proxy.set_delay(delay)
    with _connect(proxy.address) as sock:
        start = time.monotonic()
        sock.sendall(b"ping")
        assert _recv_exactly(sock, 4) == b"ping"
        assert time.monotonic() - start >= delay


def test_drop_connections_resets_live_connections(proxy: TcpProxy) -> None:
    with _connect(proxy.address) as sock:
        sock.sendall(b"before")
        assert _recv_exactly(sock, 6) == b"before"
        proxy.drop_connections()
        assert _read_until_closed(sock) == b""
    assert proxy.stats.connections_dropped == 1
    _round_trip(proxy.address)
    assert proxy.stats.connections_accepted == 2


def test_blackhole_hangs_and_lifting_it_lets_new_connections_work(proxy: TcpProxy, echo: EchoServer) -> None:
    with _connect(proxy.address, timeout=_HANG_TIMEOUT_S) as live:
        live.sendall(b"warm")
        assert _recv_exactly(live, 4) == b"warm"
        before = proxy.stats
        proxy.set_blackhole(True)
        with _connect(proxy.address, timeout=_HANG_TIMEOUT_S) as fresh:
            for sock in (live, fresh):
                sock.sendall(b"anyone there?")
                with pytest.raises(TimeoutError):
                    sock.recv(1)
        after = proxy.stats
        assert after.bytes_client_to_server == before.bytes_client_to_server
        assert after.bytes_server_to_client == before.bytes_server_to_client
        proxy.set_blackhole(False)
        _round_trip(proxy.address)
        # The live connection lost its swallowed bytes but forwards again.
        live.settimeout(_IO_TIMEOUT_S)
        live.sendall(b"again")
        assert _recv_exactly(live, 5) == b"again"


def test_refuse_closes_new_connections(proxy: TcpProxy) -> None:
    proxy.set_refuse(True)
    received = b""
    try:  # the reset may already surface in connect(), else in send() or recv()
        with _connect(proxy.address) as sock:
            sock.sendall(b"hello?")
            received = _read_until_closed(sock)
    except ConnectionError:
        pass
    assert received == b""
    assert proxy.stats.connections_refused == 1
    assert proxy.stats.bytes_client_to_server == 0
    proxy.set_refuse(False)
    _round_trip(proxy.address)


def test_drop_after_bytes_cuts_the_stream_after_exactly_n_bytes(proxy: TcpProxy, echo: EchoServer) -> None:
    n = 100
    proxy.drop_after_bytes(n)
    with _connect(proxy.address) as sock:
        try:
            for _ in range(4):  # 4 x 60 bytes: the cut falls inside the second chunk
                sock.sendall(b"x" * 60)
                time.sleep(0.02)
        except ConnectionError:
            pass
        echoed = _read_until_closed(sock)
    assert echo.received.get(timeout=_IO_TIMEOUT_S) == n
    assert len(echoed) <= n
    stats = proxy.stats
    assert stats.bytes_client_to_server == n
    assert stats.connections_dropped == 1
    # One shot: the next connection streams through untouched.
    _round_trip(proxy.address, b"y" * (3 * n))
    assert echo.received.get(timeout=_IO_TIMEOUT_S) == 3 * n
    assert proxy.stats.connections_dropped == 1


def test_stop_is_idempotent_and_stats_survive(echo: EchoServer) -> None:
    proxy = TcpProxy(echo.address).start()
    _round_trip(proxy.address)
    proxy.stop()
    proxy.stop()
    assert proxy.stats.connections_accepted == 1


# ---------------------------------------------------------------------------- gRPC

_CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 200),
]


@pytest.fixture
def health_server() -> Iterator[str]:
    """A gRPC server on a free loopback port serving grpc.health.v1 with status SERVING; its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def _check(stub: health_pb2_grpc.HealthStub, timeout: float = _IO_TIMEOUT_S) -> None:
    """One Health.Check call that must answer SERVING."""
    response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def _check_with_retries(stub: health_pb2_grpc.HealthStub, attempts: int = 5) -> list[grpc.StatusCode]:
    """Health.Check until it succeeds, at most *attempts* times; the codes of the failed attempts."""
    failures: list[grpc.StatusCode] = []
    for _ in range(attempts):
        try:
            _check(stub, timeout=2.0)
            return failures
        except grpc.RpcError as err:
            failures.append(err.code())
            time.sleep(0.1)
    raise AssertionError(f"Health.Check failed {attempts} times: {failures}")


def test_grpc_through_the_proxy(health_server: str) -> None:
    with TcpProxy(health_server) as proxy, grpc.insecure_channel(proxy.address, options=_CHANNEL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        _check(stub)
        assert proxy.stats.connections_accepted == 1

        # A dropped connection: the next call fails UNAVAILABLE or already rides a new connection.
        proxy.drop_connections()
        failures = _check_with_retries(stub)
        assert set(failures) <= {grpc.StatusCode.UNAVAILABLE}
        assert proxy.stats.connections_accepted >= 2

        # A blackhole: the call hangs until its deadline.
        proxy.set_blackhole(True)
        with pytest.raises(grpc.RpcError) as info:
            _check(stub, timeout=_HANG_TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        # Lifted, and the half-swallowed connection dropped: calls work again on a new connection.
        proxy.set_blackhole(False)
        proxy.drop_connections()
        _check_with_retries(stub)
