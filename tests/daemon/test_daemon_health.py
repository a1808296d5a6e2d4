"""/healthz over real HTTP: 200 while the loop turns, 503 once it is stuck."""

from __future__ import annotations

import threading
import time

import numpy as np
import orjson
from conftest import http_get, unit_daemon_settings, wait_for
from kafka import TopicPartition

from streamlstm.daemon import Daemon
from streamlstm.io import Polled, Ticket

WINDOW = 0.3  # seconds without a turn before /healthz fails (metrics.liveness_seconds in tests)


class FakeSource:
    """Nothing to read until ``feed`` is set; then one good event per poll."""

    def __init__(self) -> None:
        self.assigned: set[TopicPartition] = set()
        self.feed = threading.Event()
        self.polls = 0
        self.first_poll: float | None = None
        self.offset = 0

    def poll(self, timeout_ms: int) -> Polled | None:
        self.polls += 1
        if self.first_poll is None:
            self.first_poll = time.monotonic()
        if not self.feed.wait(timeout_ms / 1000):
            return None
        value = orjson.dumps({"key": "a", "ts": 1000.0 + self.offset, "values": [1, 2]})
        record = type("R", (), {"key": b"a", "value": value, "headers": [], "partition": 0})()
        record.offset = self.offset
        self.offset += 1
        return Polled(
            "in",
            [record],
            [value],
            np.zeros(1, np.int64),
            np.array([record.offset], np.int64),
            {TopicPartition("in", 0): self.offset},
            time.time(),
        )

    def stable(self) -> bool:
        return True

    def last_heartbeat(self) -> float | None:
        return time.monotonic()

    def highwater(self, partition: int) -> int | None:
        return None

    def lag(self) -> dict[int, int]:
        return {}

    def close(self, timeout_ms: int = 0) -> None:
        pass


class BlockingSink:
    """A producer whose pipe is full: ``send`` blocks until ``release`` is set."""

    output_topic = "out"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def send(self, ticket: Ticket, groups: list) -> None:
        self.entered.set()
        self.release.wait(30)

    def poll_acks(self) -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return True

    def close(self, timeout_s: float = 0.0) -> None:
        pass


class FakeDaemon(Daemon):
    def _connect(self) -> bool:
        self.source = self.fake_source  # type: ignore[assignment]
        self.delivery.sink = self.fake_sink  # type: ignore[assignment]
        self._broker_ok = True
        return True


def test_healthz_fails_when_the_loop_stops_turning() -> None:
    settings = unit_daemon_settings(
        "in",
        **{
            "model.input_size": "2",
            "metrics.enabled": "true",
            "metrics.host": "127.0.0.1",
            "metrics.port": "0",
            "kafka.poll_timeout_ms": "20",
            "metrics.liveness_seconds": str(WINDOW),
        },
    )
    daemon = FakeDaemon(settings)
    source, sink = FakeSource(), BlockingSink()
    daemon.fake_source, daemon.fake_sink = source, sink  # type: ignore[attr-defined]
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: daemon.metrics_port, 10, interval=0.01, what="the metrics server")
        url = f"http://127.0.0.1:{daemon.metrics_port}/healthz"
        # A loop that turns (idle polls) stays healthy for longer than the window.
        wait_for(
            lambda: source.first_poll and time.monotonic() - source.first_poll > 3 * WINDOW,
            10,
            interval=0.01,
            what="the loop to turn for a few windows",
        )
        assert http_get(url) == (200, b"ok\n")
        # The producer's pipe is full: the loop blocks in send and stops turning.
        source.feed.set()
        assert sink.entered.wait(10)
        _, body = wait_for(
            lambda: (r := http_get(url))[0] == 503 and r, 10, interval=0.02, what="503"
        )
        assert body.startswith(b"unhealthy: the loop has not turned for")
        # Unblocked, it turns again and is healthy again.
        sink.release.set()
        polls = source.polls
        wait_for(lambda: source.polls > polls + 2, 10, interval=0.01, what="turns")
        assert http_get(url)[0] == 200
    finally:
        sink.release.set()
        daemon.request_stop()
        thread.join(timeout=15)
    assert not thread.is_alive() and daemon.exit_code == 0
