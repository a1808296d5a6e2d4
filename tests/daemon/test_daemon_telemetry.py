"""Telemetry keeps bounded memory however long it runs without a reader."""

from __future__ import annotations

import time

import numpy as np
from kafka import TopicPartition

from streamlstm.daemon.telemetry import LIVE_SAMPLES, LiveStats, Telemetry
from streamlstm.io import Ticket
from streamlstm.metrics import Metrics

POLLS = 10_000
EVENTS = 2_048


def _retained(live: LiveStats) -> int:
    """Numbers held by the live figures: array elements, also inside lists."""
    total = 0
    for value in vars(live).values():
        if isinstance(value, np.ndarray):
            total += value.size
        elif isinstance(value, list | tuple):
            total += sum(v.size if isinstance(v, np.ndarray) else 1 for v in value)
    return total


def test_live_figures_stay_bounded_over_many_polls() -> None:
    telemetry = Telemetry(Metrics(), anomaly_threshold=10.0, model_version=0)
    tp = TopicPartition("in", 0)
    rng = np.random.default_rng(1)
    for poll in range(POLLS):
        # Events 0..1 s old when acknowledged (uniform): the median latency is 0.5 s.
        ts = time.time() - rng.random(EVENTS)
        ticket = Ticket({tp: poll + 1}, polled_at=0.0, event_ts=ts, predictions=EVENTS)
        telemetry.acknowledged([ticket])
    # Each kept latency with its poll-to-acknowledgement share: two arrays of the bound.
    assert _retained(telemetry.live) <= 2 * LIVE_SAMPLES + 16

    window = telemetry.live.take()
    assert window.predictions == POLLS * EVENTS
    assert window.latency_count == POLLS * EVENTS
    assert len(window.latencies) == LIVE_SAMPLES
    # A uniform sample of the whole window, not of its start or its end.
    assert abs(float(np.median(window.latencies)) - 0.5) < 0.02
    assert 0.99 < window.latency_max < 1.1
    assert abs(float(np.percentile(window.latencies, 99)) - 0.99) < 0.02
    assert _retained(telemetry.live) <= 2 * LIVE_SAMPLES + 16


def test_a_small_window_keeps_every_latency() -> None:
    live = LiveStats(samples=8)
    live.add(3, 0, 0, np.array([0.1, 0.2, 0.3]), in_daemon=0.01)
    live.add(2, 0, 0, np.array([0.4, 0.5]), in_daemon=0.02)
    window = live.take()
    assert window.latencies.tolist() == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert window.in_daemon.tolist() == [0.01, 0.01, 0.01, 0.02, 0.02]
    assert (window.latency_count, window.latency_max) == (5, 0.5)
    assert live.take().latency_count == 0


def test_a_sampled_latency_keeps_its_own_tickets_share() -> None:
    """Past the reservoir's size each kept latency still sits beside the poll-to-ack time
    of the ticket it came from (ticket i: latencies i, share i / 10)."""
    live = LiveStats(samples=64)
    for i in range(1, 200):
        live.add(5, 0, 0, np.full(5, float(i)), in_daemon=i / 10)
    window = live.take()
    assert len(window.latencies) == 64 and window.latency_count == 995
    assert window.latencies.max() > 64  # later tickets replaced earlier samples
    np.testing.assert_allclose(window.in_daemon, window.latencies / 10)


def test_acknowledged_reports_the_time_since_the_poll() -> None:
    telemetry = Telemetry(Metrics(), anomaly_threshold=10.0, model_version=0)
    now = time.time()
    ticket = Ticket(
        {TopicPartition("in", 0): 1},
        polled_at=now - 0.25,
        event_ts=np.full(3, now - 1.0),
        predictions=3,
    )
    telemetry.acknowledged([ticket])
    window = telemetry.live.take()
    assert window.in_daemon.shape == (3,)
    assert np.all((window.in_daemon >= 0.25) & (window.in_daemon < 0.5))
    assert np.all(window.latencies >= 1.0)
