"""Daemon pieces that need no broker: settings, live figures, JSON logs, resends."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
from kafka import TopicPartition

from streamlstm.config import ConfigError, load_settings
from streamlstm.daemon import Daemon
from streamlstm.daemon.delivery import SEND_ATTEMPTS, Fatal
from streamlstm.daemon.telemetry import LiveStats
from streamlstm.devtools.demo import live_line
from streamlstm.io import Ticket
from streamlstm.logs import setup_logging


def test_daemon_needs_the_input_width() -> None:
    with pytest.raises(ConfigError, match=r"model\.input_size"):
        Daemon(load_settings(overrides={"training.enabled": "false"}))


def test_live_stats_windows() -> None:
    stats = LiveStats()
    stats.take()
    stats.add_events(10)
    stats.add(8, 1, 2, np.array([0.01, 0.03]))
    window = stats.take()
    assert (window.events, window.predictions, window.anomalies, window.dead_letters) == (
        10,
        8,
        1,
        2,
    )
    assert window.latencies.tolist() == [0.01, 0.03]
    assert stats.take().predictions == 0 and stats.predictions == 8
    line = live_line(5.0, window, keys=3, model_version=2)
    assert "keys 3" in line and "dead letters 2" in line and "p50    20 ms" in line


def test_live_window_acks_span_its_acknowledged_predictions_only() -> None:
    now = [1.0]
    stats = LiveStats(clock=lambda: now[0])
    stats.add(4, 0, 0, np.full(4, 0.01))
    assert stats.take().acks == (1.0, 1.0)
    now[0] = 2.0
    stats.add(0, 0, 1, np.full(1, 0.01))  # a dead letter only: no prediction answered
    assert stats.take().acks is None
    for t in (3.0, 5.0):
        now[0] = t
        stats.add(2, 0, 0, np.full(2, 0.01))
    now[0] = 6.0
    stats.add(0, 0, 1, np.full(1, 0.01))
    assert stats.take().acks == (3.0, 5.0)


def test_json_logs_and_quiet_kafka() -> None:
    stream = io.StringIO()
    setup_logging("INFO", json_format=True, stream=stream)
    try:
        logging.getLogger("streamlstm.daemon").warning("cannot reach %s", "x", extra={"n": 1})
        logging.getLogger("kafka.conn").error("connection refused")  # kafka's noise is muted
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        doc = orjson.loads(lines[0])
        assert (doc["level"], doc["message"], doc["n"]) == ("WARNING", "cannot reach x", 1)
        setup_logging("INFO", json_format=False, stream=stream)
        logging.getLogger("streamlstm.daemon").info("hello")
        assert stream.getvalue().splitlines()[-1].endswith("INFO  daemon: hello")
    finally:
        setup_logging("WARNING")


def test_a_record_refused_for_good_stops_the_daemon_before_its_offset_is_committed() -> None:
    settings = load_settings(
        overrides={"model.input_size": "2", "model.hidden_size": "4", "training.enabled": "false"}
    )
    delivery = Daemon(settings).delivery
    resent: list[list] = []
    sink = SimpleNamespace(send_records=lambda ticket, sends: resent.append(sends))
    delivery.sink = sink  # type: ignore[assignment]
    ticket = Ticket(ends={TopicPartition("in", 0): 10}, polled_at=0.0)
    delivery.tracker.add(ticket)

    def refused() -> None:
        ticket.failed = [("out", b"k", b"v", None)]
        ticket.errors = ["MessageSizeTooLargeError"]
        ticket.retriable = False
        ticket.retry_at = 0.0

    for _ in range(SEND_ATTEMPTS - 1):
        refused()
        delivery.resend(ticket)
    assert len(resent) == SEND_ATTEMPTS - 1
    refused()
    with pytest.raises(Fatal, match="without committing past them"):
        delivery.resend(ticket)
    assert delivery.tracker.collect() == []  # the ticket still blocks its offsets
    assert delivery.tracker.uncommitted() == {}
