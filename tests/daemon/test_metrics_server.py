"""The metrics endpoint drops idle connections (each one holds a thread)."""

from __future__ import annotations

import socket
import time

from conftest import http_get

from streamlstm.metrics import Metrics, MetricsServer


def test_an_idle_connection_is_closed_by_the_server() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0, idle_timeout=0.2).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""  # EOF: the server hung up (a timeout would raise)
            assert time.monotonic() - started < 4
        # Other clients are served as usual, before and after.
        assert http_get(f"http://127.0.0.1:{server.port}/healthz") == (200, b"ok\n")
    finally:
        server.stop()


def test_a_stalled_request_is_dropped_too() -> None:
    server = MetricsServer(Metrics(), "127.0.0.1", 0, idle_timeout=0.2).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # headers never end
            assert slow.recv(1) == b""
    finally:
        server.stop()
