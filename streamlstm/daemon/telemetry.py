"""What the daemon tells about itself: per-batch metrics, gauges, the status log, live figures.

One owner per metric: everything a processed batch or an acknowledged ticket says is
counted here, whether or not training is enabled (drift detections, the serving model's
version and when it changed included). The loop, the delivery side and the rebalance
callbacks report to :class:`Telemetry`; none of them touches a series of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamlstm.drift import DETECTORS
from streamlstm.engine import BatchOutput, Engine
from streamlstm.events import REASONS
from streamlstm.io import Ticket
from streamlstm.metrics import Metrics, observe_many
from streamlstm.state import EVICTION_CAUSES, RESET_CAUSES

log = logging.getLogger(__name__)


LIVE_SAMPLES = 65_536  # latencies kept per live window (512 KiB); a uniform sample beyond


@dataclass
class LiveWindow:
    """Figures since the last :meth:`LiveStats.take` (for the demo's live line)."""

    seconds: float
    events: int
    predictions: int
    anomalies: int
    dead_letters: int
    # Event latency of acknowledged predictions, seconds: all of them up to LIVE_SAMPLES,
    # else a uniform sample of that many (percentiles stay unbiased).
    latencies: np.ndarray
    # Of each of those, the time from its poll to the acknowledgement: the daemon's own
    # share (the rest is the producer, the broker and the fetch wait before the poll).
    in_daemon: np.ndarray
    latency_count: int = 0  # latencies observed in the window (sampled or not)
    latency_max: float = math.nan  # the largest of them, seconds
    # The clock's readings at the window's first and last acknowledged prediction (None:
    # none): how long the daemon took to answer the window's events, queueing aside.
    acks: tuple[float, float] | None = None


class LiveStats:
    """Counters and recent latencies, shared between the loop and a reporter thread.

    Memory is fixed: a window keeps at most ``samples`` latencies (reservoir sampling),
    however long nobody calls :meth:`take`.
    """

    def __init__(
        self,
        samples: int = LIVE_SAMPLES,
        seed: int = 0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.events = 0
        self.predictions = 0
        self.anomalies = 0
        self.dead_letters = 0
        self.first_event_at: float | None = None  # clock (perf_counter) at the first decoded event
        self.last_ack_at: float | None = (
            None  # clock (perf_counter) at the last acknowledged output
        )
        self._samples = np.empty(samples, dtype=np.float64)
        self._in_daemon = np.empty(samples, dtype=np.float64)  # aligned with _samples
        self._seen = 0  # latencies offered in this window
        self._max = math.nan
        self._rng = np.random.default_rng(seed)
        self._since = time.monotonic()
        self._marks = (0, 0, 0, 0)
        self._acks: tuple[float, float] | None = None
        self._clock = clock
        self._lock = threading.Lock()

    def add(
        self,
        predictions: int,
        anomalies: int,
        dead: int,
        latencies: np.ndarray,
        in_daemon: float = math.nan,
    ) -> None:
        """One acknowledged ticket: its counts, its events' latencies, and the seconds from
        its poll to now (``in_daemon``, the same for all its events)."""
        with self._lock:
            self.last_ack_at = now = self._clock()
            if predictions:
                self._acks = (self._acks[0] if self._acks else now, now)
            self.predictions += predictions
            self.anomalies += anomalies
            self.dead_letters += dead
            if len(latencies):
                self._keep(np.asarray(latencies, dtype=np.float64), in_daemon)

    def _keep(self, latencies: np.ndarray, in_daemon: float) -> None:
        """Reservoir sampling (algorithm R), vectorised over one ticket's latencies."""
        size, seen = len(self._samples), self._seen
        biggest = float(latencies.max())
        if not self._max >= biggest:  # also when NaN: nothing seen yet in this window
            self._max = biggest
        free = max(0, size - seen)
        head = latencies[:free]
        self._samples[seen : seen + len(head)] = head
        self._in_daemon[seen : seen + len(head)] = in_daemon
        rest = latencies[free:]
        if len(rest):
            index = seen + len(head) + np.arange(len(rest))
            accept = self._rng.random(len(rest)) * (index + 1) < size
            slots = self._rng.integers(0, size, int(accept.sum()))
            self._samples[slots] = rest[accept]
            self._in_daemon[slots] = in_daemon
        self._seen = seen + len(latencies)

    def add_events(self, n: int) -> None:
        with self._lock:
            if self.first_event_at is None:
                self.first_event_at = self._clock()
            self.events += n

    def take(self) -> LiveWindow:
        """The window since the previous call; starts a new one."""
        with self._lock:
            now = time.monotonic()
            marks = (self.events, self.predictions, self.anomalies, self.dead_letters)
            events, predictions, anomalies, dead = (
                a - b for a, b in zip(marks, self._marks, strict=True)
            )
            n = min(self._seen, len(self._samples))
            kept, inside = self._samples[:n].copy(), self._in_daemon[:n].copy()
            window = LiveWindow(
                *(now - self._since, events, predictions, anomalies, dead, kept, inside),
                *(self._seen, self._max, self._acks),
            )
            self._seen, self._max, self._since, self._marks = 0, math.nan, now, marks
            self._acks = None
            return window


class Telemetry:
    """The daemon's metrics and live figures, fed by the loop, delivery and rebalances."""

    def __init__(self, metrics: Metrics, anomaly_threshold: float, model_version: int) -> None:
        self.metrics = metrics
        self.live = LiveStats()
        self.anomaly_threshold = anomaly_threshold
        self._model_version = model_version
        self._seen: dict[tuple[str, str], int] = {}  # store totals already counted
        self._status_mark = (0, time.monotonic())
        m = metrics
        m.ready.set(0)
        m.model_version.set(model_version)
        # Labelled series exist at 0 from the start, so alerts on increase() see the first.
        for reason in REASONS:
            m.events_rejected.labels(reason)
            m.dead_letters.labels(reason)
        for cause in EVICTION_CAUSES:
            m.state_evictions.labels(cause)
        for cause in RESET_CAUSES:
            m.state_resets.labels(cause)
        for detector in DETECTORS:
            m.drift.labels(detector)

    def batch(self, topic: str, output: BatchOutput, seconds: float) -> int:
        """Count a processed batch; returns its anomalies (counted once acknowledged)."""
        m, n = self.metrics, len(output)
        m.inference_seconds.observe(seconds)
        m.events.labels(topic).inc(n)
        m.batch_size.observe(n)
        self.live.add_events(n)
        for detector, hits in output.detections.items():
            if hits:
                m.drift.labels(detector).inc(hits)
        if output.model_version != self._model_version:
            self._model_version = output.model_version
            m.model_version.set(output.model_version)
            m.last_model_update.set(time.time())
        return int(np.count_nonzero(output.anomaly_score >= self.anomaly_threshold))

    def key_mismatches(self, n: int) -> None:
        if n:
            self.metrics.key_partition_mismatch.inc(n)

    def rejected(self, reasons: list[str]) -> None:
        for reason in reasons:
            self.metrics.events_rejected.labels(reason).inc()

    def acknowledged(self, finished: list[Ticket]) -> None:
        """Count the outputs of tickets whose every record the broker acknowledged."""
        now = time.time()
        m = self.metrics
        for t in finished:
            latencies = now - t.event_ts
            observe_many(m.event_latency_seconds, latencies)
            if t.predictions:
                observe_many(
                    m.processing_latency_seconds, np.full(t.predictions, now - t.polled_at)
                )
                m.predictions.inc(t.predictions)
                m.anomalies.inc(t.anomalies)
            for reason in t.dead_letter_reasons:
                m.dead_letters.labels(reason).inc()
            dead = len(t.dead_letter_reasons)
            self.live.add(t.predictions, t.anomalies, dead, latencies, now - t.polled_at)

    def gauges(self, engine: Engine, lag: dict[int, int], ready: bool) -> None:
        """Refresh the gauges (and the eviction and reset counters, which the store keeps
        as totals)."""
        m, store = self.metrics, engine.store
        for forecaster, share in engine.leader_shares().items():
            m.forecaster_lead_share.labels(forecaster).set(share)
        m.keys.set(len(store))
        m.state_bytes.set(len(store) * store.bytes_per_key() if len(store) else 0)
        for kind, totals, counter in (
            ("eviction", store.evictions, m.state_evictions),
            ("reset", store.resets, m.state_resets),
        ):
            for cause, count in totals.items():
                seen = self._seen.get((kind, cause), 0)
                if count > seen:
                    counter.labels(cause).inc(count - seen)
                    self._seen[kind, cause] = count
        moves = store.partition_moves - self._seen.get(("moves", ""), 0)
        if moves > 0:
            m.key_partition_mismatch.inc(moves)
            self._seen["moves", ""] = store.partition_moves
        for partition, records in lag.items():
            m.consumer_lag.labels(str(partition)).set(records)
        m.ready.set(1 if ready else 0)

    def forget_partition(self, partition: int) -> None:
        """Drop a partition's lag series: another member reports it now."""
        with contextlib.suppress(KeyError):
            self.metrics.consumer_lag.remove(str(partition))

    def log_status(self, now: float, keys: int, awaiting: int) -> None:
        """One line with the totals and the event rate since the previous line."""
        events, since = self._status_mark
        live = self.live
        rate = (live.events - events) / max(1e-9, now - since)
        log.info(
            "status: %d events (%.0f/s), %d predictions, %d dead letters, %d keys, "
            "%d records awaiting acknowledgement",
            live.events,
            rate,
            live.predictions,
            live.dead_letters,
            keys,
            awaiting,
        )
        self._status_mark = (live.events, now)
