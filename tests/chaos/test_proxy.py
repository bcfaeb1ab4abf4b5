"""The TCP proxy against a tiny echo server: forwards, delays, cuts, restores."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.fixtures.proxy import TcpProxy

SOCKET_TIMEOUT_SECONDS = 5
DELAY_SECONDS = 0.3


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(echo_port) -> Iterator[TcpProxy]:
    with TcpProxy(target_port=echo_port) as started:
        yield started


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECONDS)


def echo(connection: socket.socket, payload: bytes) -> bytes:
    connection.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = connection.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def test_forwards_both_ways(proxy):
    payload = bytes(range(256)) * 1000  # several chunks
    with connect(proxy.port) as connection:
        assert echo(connection, payload) == payload


def test_delay_applies_to_each_direction_then_ends(proxy):
    with connect(proxy.port) as connection:
        proxy.delay(DELAY_SECONDS)
        started = time.monotonic()
        assert echo(connection, b"slow") == b"slow"
        # Out and back: two delayed chunks.
        assert time.monotonic() - started >= 2 * DELAY_SECONDS * 0.9
        proxy.delay(0)
        started = time.monotonic()
        assert echo(connection, b"fast") == b"fast"
        assert time.monotonic() - started < DELAY_SECONDS


def test_cut_closes_open_connections_and_refuses_new_ones_until_restored(proxy):
    with connect(proxy.port) as connection:
        assert echo(connection, b"before") == b"before"
        proxy.cut()
        with _closed_or_reset():
            assert echo(connection, b"after") == b""
    with pytest.raises(ConnectionRefusedError):
        connect(proxy.port)
    proxy.restore()
    with connect(proxy.port) as connection:
        assert echo(connection, b"again") == b"again"


class _closed_or_reset:
    """A cut connection either reads as closed or raises a reset, depending on timing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        return kind is None or issubclass(kind, (ConnectionResetError, BrokenPipeError))


def test_delay_is_bounded(proxy):
    with pytest.raises(ValueError):
        proxy.delay(3600)
