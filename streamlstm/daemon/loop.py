"""The daemon: Kafka in, engine, Kafka out, metrics, commits, graceful shutdown.

One main thread runs the loop; kafka-python's I/O threads move the bytes, and the
producer runs in a child process (``streamlstm.io.producer``)::

    poll -> decode -> engine -> encode -> ticket -> one frame to the producer (no waiting)
    ... next turns ...
    producer reports the frame acknowledged -> metrics (latency, counts)
        -> offsets committable -> commit

The engine never waits for the network, nor for the producer's per-record work: outputs
of batch k are produced in the child while batch k+1 is polled, decoded and predicted.
An offset is committed only when every output of every record before it was
acknowledged (``streamlstm.io.offsets``): at-least-once.

Robustness: the broker may be down at start or go away; the daemon retries with
backoff, says so in the log and on ``/readyz``, and carries on when it is back. On
SIGTERM/SIGINT it stops polling, finishes the batch at hand, flushes, commits and exits
0, within :data:`SHUTDOWN_SECONDS`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np
from kafka import TopicPartition

from streamlstm.config import ConfigError, Settings
from streamlstm.engine import Engine
from streamlstm.events import REASONS, Decoder
from streamlstm.io import OffsetTracker, Polled, Sink, Source, Ticket, dead_letters, ensure_topics
from streamlstm.io.sink import SinkError, prediction_group, send_groups
from streamlstm.metrics import Metrics, MetricsServer, observe_many
from streamlstm.state import EVICTION_CAUSES

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 8.0  # budget for flush + commit + leaving the group (SIGTERM to exit < 10 s)
MAX_BACKOFF_SECONDS = 5.0
GAUGE_SECONDS = 1.0  # how often lag, keys, evictions and readiness are refreshed
STATUS_SECONDS = 60.0  # how often a one-line status goes to the log
SEND_ATTEMPTS = 5  # a record refused this often for good stops the daemon (no commit past it)


@dataclass
class LiveWindow:
    """Figures since the last :meth:`LiveStats.take` (for the demo's live line)."""

    seconds: float
    events: int
    predictions: int
    anomalies: int
    dead_letters: int
    latencies: np.ndarray  # event latency of each acknowledged prediction, seconds


@dataclass
class LiveStats:
    """Counters and recent latencies, shared between the loop and a reporter thread."""

    events: int = 0
    predictions: int = 0
    anomalies: int = 0
    dead_letters: int = 0
    first_event_at: float | None = None  # perf_counter of the first decoded event
    last_ack_at: float | None = None  # perf_counter of the last acknowledged output
    _window: list[np.ndarray] = field(default_factory=list)
    _since: float = field(default_factory=time.monotonic)
    _marks: tuple[int, int, int, int] = (0, 0, 0, 0)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, predictions: int, anomalies: int, dead: int, latencies: np.ndarray) -> None:
        with self._lock:
            self.last_ack_at = time.perf_counter()
            self.predictions += predictions
            self.anomalies += anomalies
            self.dead_letters += dead
            if len(latencies):
                self._window.append(latencies)
                if len(self._window) > 10_000:  # nobody is taking: keep memory bounded
                    del self._window[:5_000]

    def add_events(self, n: int) -> None:
        with self._lock:
            if self.first_event_at is None:
                self.first_event_at = time.perf_counter()
            self.events += n

    def take(self) -> LiveWindow:
        """The window since the previous call; starts a new one."""
        with self._lock:
            now = time.monotonic()
            marks = (self.events, self.predictions, self.anomalies, self.dead_letters)
            deltas = [a - b for a, b in zip(marks, self._marks, strict=True)]
            latencies = np.concatenate(self._window) if self._window else np.zeros(0)
            window = LiveWindow(now - self._since, *deltas, latencies)
            self._window, self._since, self._marks = [], now, marks
            return window


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    text = text if text.startswith(name) else f"{name}: {text}"
    return text if len(text) < 200 else text[:197] + "..."


class Daemon:
    """Consume, predict, produce, dead-letter, commit; serve metrics. ``run()`` blocks."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, engine: Engine | None = None
    ) -> None:
        if settings.model.input_size is None:
            raise ConfigError("model.input_size: must be set for the daemon (width of `values`)")
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.engine = engine or Engine.from_settings(settings)
        self.decoder = Decoder(settings.model.input_size, settings.engine.max_message_bytes)
        self.tracker = OffsetTracker()
        self.live = LiveStats()
        self.source: Source | None = None
        self.sink: Sink | None = None
        self.server: MetricsServer | None = None
        self.trainer: Any = None
        self.exit_code = 0
        self._stop = threading.Event()
        self._deadline: float | None = None  # monotonic end of the shutdown budget
        self._paused = False
        self._broker_ok = False
        self._last_contact = 0.0  # monotonic time the broker last answered something
        k = settings.kafka
        self._contact_window = k.session_timeout_ms / 1000  # as the group coordinator judges
        self._last_commit = 0.0
        self._last_gauges = 0.0
        self._last_status = time.monotonic()
        self._status_mark = (0, time.monotonic())
        self._evictions_seen: dict[str, int] = {}
        self._owned_partitions: set[int] = set()
        self._connected_at: float | None = None
        self.metrics.ready.set(0)
        self.metrics.model_version.set(self.engine.model_version)
        # Labelled series exist at 0 from the start, so alerts on increase() see the first.
        for reason in REASONS:
            self.metrics.events_rejected.labels(reason)
            self.metrics.dead_letters.labels(reason)
        for cause in EVICTION_CAUSES:
            self.metrics.state_evictions.labels(cause)

    # -- control ---------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the loop to stop after the batch at hand (safe from signal handlers)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def ready(self) -> bool:
        """Partitions assigned and the broker reachable (``/readyz``)."""
        source = self.source
        if source is None or self._stop.is_set() or not self._broker_ok:
            return False
        try:
            return source.stable()
        except Exception:
            return False

    @property
    def metrics_port(self) -> int | None:
        return self.server.port if self.server else None

    def start_metrics(self) -> None:
        """Serve /metrics, /healthz, /readyz (idempotent; ``run`` calls it)."""
        m = self.settings.metrics
        if m.enabled and self.server is None:
            self.server = MetricsServer(self.metrics, m.host, m.port, ready=self.ready).start()
            log.info("metrics on http://%s:%d/metrics", m.host, self.server.port)

    def run(self) -> int:
        """Run until :meth:`request_stop`; returns the exit code (0 after a clean stop)."""
        self.start_metrics()
        try:
            if self._connect():
                self._start_trainer()
                while not self._stop.is_set():
                    self._turn()
        except _Fatal as exc:
            log.critical("stopping: %s", exc.__cause__ or exc, exc_info=exc.__cause__)
            self.exit_code = 1
        finally:
            self._shutdown()
        return self.exit_code

    # -- connecting ------------------------------------------------------------------

    def _connect(self) -> bool:
        """Create topics, producer and consumer, retrying with backoff until stopped."""
        k = self.settings.kafka
        delay = 0.5
        while not self._stop.is_set():
            try:
                if k.create_topics:
                    ensure_topics(k)
                self.sink = Sink(self.settings)
                self.source = Source(
                    self.settings,
                    on_revoke=self._on_revoke,
                    on_lost=self._on_lost,
                    on_committed=self._on_committed_offsets,
                )
            except Exception as exc:
                self._close_clients()
                self.metrics.broker_errors.labels("connect").inc()
                log.warning(
                    "cannot reach Kafka at %s (%s); retrying in %.1fs",
                    k.bootstrap_servers,
                    _short(exc),
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                continue
            self._broker_ok = True
            self._last_contact = self._connected_at = time.monotonic()
            log.info(
                "connected to Kafka at %s: %s -> %s (dead letters: %s), group %s",
                k.bootstrap_servers,
                k.input_topic,
                k.output_topic,
                k.dead_letter_topic,
                k.group_id,
            )
            return True
        return False

    def _start_trainer(self) -> None:
        if not self.settings.training.enabled:
            return
        try:
            from streamlstm.learning.background import BackgroundTrainer
        except ImportError as exc:
            log.warning("training.enabled, but no trainer is available (%s): not fine-tuning", exc)
            return
        self.trainer = BackgroundTrainer(self.engine, self.settings, self.metrics)
        self.trainer.start()

    # -- the loop --------------------------------------------------------------------

    def _turn(self) -> None:
        assert self.source is not None and self.sink is not None
        try:
            self._check_acks()
        except SinkError as exc:
            raise _Fatal("the producer process failed") from exc
        self._apply_backpressure()
        busy = len(self.tracker) > 0
        timeout = self.settings.kafka.poll_timeout_ms
        if busy:  # acknowledgements are noticed between polls: keep turns short
            timeout = min(timeout, 5)
        try:
            polled = self.source.poll(timeout)
        except Exception as exc:
            self._broker_trouble("poll", exc)
            return
        if polled is not None:
            self._last_contact = time.monotonic()
            try:
                self._process(polled)
            except Exception as exc:  # a bug, not bad data: never commit past this batch
                raise _Fatal("processing a batch failed") from exc
        now = time.monotonic()
        if now - self._last_commit >= self.settings.kafka.commit_interval_ms / 1000:
            self._commit_async()
            self._last_commit = now
        if now - self._last_gauges >= GAUGE_SECONDS:
            self._update_gauges()
            self._last_gauges = now
        if now - self._last_status >= STATUS_SECONDS:
            self._log_status(now)

    def _broker_trouble(self, operation: str, exc: BaseException) -> None:
        self.metrics.broker_errors.labels(operation).inc()
        log.warning("Kafka %s failed (%s); retrying", operation, _short(exc))
        self._stop.wait(0.5)

    def _check_contact(self) -> None:
        """Broker reachable = it answered a heartbeat, fetch or produce lately."""
        assert self.source is not None
        now = time.monotonic()
        last = max(self._last_contact, self.source.last_heartbeat() or 0.0)
        ok = now - last < self._contact_window
        if ok and not self._broker_ok:
            log.info("Kafka at %s answers again", self.settings.kafka.bootstrap_servers)
        elif not ok and self._broker_ok:
            log.warning(
                "Kafka at %s has not answered for %.0fs: not ready; kafka-python reconnects "
                "with backoff, outputs wait in the producer",
                self.settings.kafka.bootstrap_servers,
                now - last,
            )
        self._broker_ok = ok

    def _process(self, polled: Polled) -> None:
        """Decode, predict, send; everything this poll sent becomes one ticket."""
        assert self.sink is not None
        m = self.metrics
        batch, rejections = self.decoder.decode(polled.payloads)
        ticket = Ticket(ends=polled.ends, polled_at=polled.polled_at, event_ts=batch.ts)
        groups = []
        if len(batch):
            rows = batch.source
            started = time.perf_counter()
            output = self.engine.process(
                batch, partition=polled.partition[rows], offset=polled.offset[rows]
            )
            m.inference_seconds.observe(time.perf_counter() - started)
            if self.trainer is not None:
                self.trainer.notify(output)
            groups.append(prediction_group(self.sink.output_topic, output))
            scores = output.anomaly_score
            ticket.predictions = len(batch)
            ticket.anomalies = int(
                np.count_nonzero(scores >= self.settings.engine.anomaly_threshold)
            )
            m.events.labels(polled.topic).inc(len(batch))
            m.batch_size.observe(len(batch))
            self.live.add_events(len(batch))
        if rejections:
            dl_sends, reasons = dead_letters(
                polled.topic, self.settings.kafka.dead_letter_topic, polled.records, rejections
            )
            groups.extend(send_groups(dl_sends))
            ticket.dead_letter_reasons = reasons
            for reason in reasons:
                m.events_rejected.labels(reason).inc()
        self.tracker.add(ticket)
        self.sink.send(ticket, groups)

    def _check_acks(self) -> None:
        """Account finished tickets; resend what failed at the head."""
        if self.sink is not None:
            self.sink.poll_acks()
        finished = self.tracker.collect()
        if finished:
            self._last_contact = time.monotonic()
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
                self.live.add(t.predictions, t.anomalies, len(t.dead_letter_reasons), latencies)
        failed = self.tracker.failed_head()
        if failed is not None:
            self._resend(failed)

    def _resend(self, ticket: Ticket) -> None:
        """Send a ticket's failed records again (the producer gave up on them).

        Retriable failures (the broker away, timeouts) are repeated with backoff for as
        long as it takes. A record refused SEND_ATTEMPTS times for good stops the daemon
        (exit 1) before anything at or after its input offset is committed: nothing is
        lost, and the restart tries again with a fresh producer.
        """
        assert self.sink is not None
        now = time.monotonic()
        if now < ticket.retry_at:
            return
        attempts = ticket.attempts + 1
        shown = "; ".join(sorted(set(ticket.errors))[:3])
        self.metrics.broker_errors.labels("produce").inc()
        if not ticket.retriable and attempts >= SEND_ATTEMPTS:
            raise _Fatal(
                f"{len(ticket.failed)} records were refused {attempts} times ({shown}); "
                "stopping without committing past them, so a restart produces them again"
            )
        sends, _, _ = ticket.take_failed()
        ticket.attempts = attempts
        ticket.retry_at = now + min(0.5 * attempts, MAX_BACKOFF_SECONDS)
        log.warning(
            "%d records were not acknowledged (%s); sending them again (attempt %d)",
            len(sends),
            shown,
            attempts + 1,
        )
        self.sink.send_records(ticket, sends)

    def _apply_backpressure(self) -> None:
        """Stop fetching while too many records wait for acknowledgement (broker slow/away)."""
        assert self.source is not None
        limit = max(50_000, 8 * self.settings.engine.max_batch)
        pending = self.tracker.pending_sends
        if not self._paused and pending > limit:
            self.source.pause()
            self._paused = True
            log.warning("%d records await acknowledgement: pausing consumption", pending)
        elif self._paused and pending <= limit // 2:
            self.source.resume()
            self._paused = False
            log.info("acknowledgements caught up: resuming consumption")

    # -- commits ---------------------------------------------------------------------

    def _commit_async(self) -> None:
        assert self.source is not None
        offsets = self.tracker.uncommitted(self.source.assigned)
        if offsets:
            self.source.commit_async(offsets, self._on_commit_done)

    def _on_commit_done(self, offsets: dict[TopicPartition, Any], result: Any) -> None:
        if isinstance(result, BaseException):
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s); will retry", _short(result))
            return
        self._on_committed_offsets({tp: om.offset for tp, om in offsets.items()})

    def _on_committed_offsets(self, offsets: dict[TopicPartition, int]) -> None:
        self.tracker.mark_committed(offsets)
        self.metrics.commits.inc()

    def _on_revoke(self, revoked: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Rebalance listener (kafka's I/O thread; the main loop waits in poll/close).

        Outputs still in flight are flushed, so the offsets handed to the listener to
        commit cover everything this member did with the revoked partitions.
        """
        if self.sink is not None:
            budget = 5.0
            if self._deadline is not None:
                budget = max(0.0, min(budget, self._deadline - time.monotonic()))
            self.sink.flush(budget)
        self._check_acks_quietly()
        offsets = self.tracker.uncommitted(revoked)
        self.tracker.forget(revoked)
        return offsets

    def _on_lost(self, lost: set[TopicPartition]) -> None:
        self.tracker.forget(lost)

    def _check_acks_quietly(self) -> None:
        try:
            if self.sink is not None:
                self.sink.poll_acks()
            finished = self.tracker.collect()
            for t in finished:
                self.metrics.predictions.inc(t.predictions)
                for reason in t.dead_letter_reasons:
                    self.metrics.dead_letters.labels(reason).inc()
                self.live.add(t.predictions, t.anomalies, len(t.dead_letter_reasons), np.zeros(0))
        except Exception:
            log.exception("accounting acknowledgements during a rebalance")

    # -- gauges and status -----------------------------------------------------------

    def _update_gauges(self) -> None:
        m = self.metrics
        store = self.engine.store
        m.keys.set(len(store))
        m.state_bytes.set(len(store) * store.bytes_per_key() if len(store) else 0)
        for cause, count in store.evictions.items():
            seen = self._evictions_seen.get(cause, 0)
            if count > seen:
                m.state_evictions.labels(cause).inc(count - seen)
                self._evictions_seen[cause] = count
        m.model_version.set(self.engine.model_version)
        if self.source is not None:
            self._forget_moved_partitions()
            try:
                for partition, lag in self.source.lag().items():
                    m.consumer_lag.labels(str(partition)).set(lag)
            except Exception as exc:
                log.debug("lag: %s", exc)
            self._check_contact()
        m.ready.set(1 if self.ready() else 0)

    def _forget_moved_partitions(self) -> None:
        """Drop the key state and lag series of partitions another member now owns.

        Checked on the loop, after polls: a partition revoked and given straight back in
        the same rebalance keeps its keys; one that moved on would otherwise keep stale
        state here (its new owner starts those keys afresh).
        """
        assert self.source is not None
        try:
            owned = {tp.partition for tp in set(self.source.assigned)}
        except RuntimeError:  # the heartbeat thread changed the set meanwhile: next second
            return
        for partition in self._owned_partitions - owned:
            dropped = self.engine.store.drop_partition(partition)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(str(partition))
            log.info("partition %d moved away: forgot %d keys", partition, len(dropped))
        self._owned_partitions = owned

    def _log_status(self, now: float) -> None:
        events, since = self._status_mark
        rate = (self.live.events - events) / max(1e-9, now - since)
        log.info(
            "status: %d events (%.0f/s), %d predictions, %d dead letters, %d keys, "
            "%d records awaiting acknowledgement",
            self.live.events,
            rate,
            self.live.predictions,
            self.live.dead_letters,
            len(self.engine.store),
            self.tracker.pending_sends,
        )
        self._status_mark = (self.live.events, now)
        self._last_status = now

    # -- shutdown --------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Flush, account, commit, leave the group, close; within the shutdown budget."""
        self._stop.set()
        self._deadline = time.monotonic() + SHUTDOWN_SECONDS

        def left(cap: float) -> float:
            assert self._deadline is not None
            return max(0.0, min(cap, self._deadline - time.monotonic()))

        if self.trainer is not None:
            try:
                self.trainer.stop(timeout=left(2.0))
            except Exception:
                log.exception("stopping the trainer")
        if self.sink is not None and self.source is not None:
            log.info("stopping: flushing %d in-flight records", self.tracker.pending_sends)
            self.sink.flush(left(4.0))
            try:
                self._check_acks()
            except (SinkError, _Fatal) as exc:
                log.warning("producer: %s", exc)
            offsets = self.tracker.uncommitted(self.source.assigned)
            if offsets:
                try:
                    self.source.commit(offsets, timeout_ms=int(left(1.5) * 1000) or 1)
                    self._on_committed_offsets(offsets)
                    log.info("committed offsets %s", _fmt_offsets(offsets))
                except Exception as exc:
                    self.metrics.commit_failures.inc()
                    log.warning("final commit failed (%s): those records will be re-read", exc)
            if self.tracker.pending_sends:
                log.warning(
                    "%d records were not acknowledged before exit; their input offsets are "
                    "not committed, so they will be predicted again on restart",
                    self.tracker.pending_sends,
                )
        self._close_clients(left)
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.metrics.ready.set(0)
        log.info("stopped")

    def _close_clients(self, left: Any = None) -> None:
        budget = left or (lambda cap: cap)
        if self.source is not None:
            try:
                self.source.close(timeout_ms=max(1, int(budget(1.5) * 1000)))
            except Exception as exc:
                log.warning("consumer close: %s", exc)
            self.source = None
        if self.sink is not None:
            self.sink.close(timeout_s=budget(1.0))
            self.sink = None


class _Fatal(Exception):
    """An internal error that must stop the daemon (without committing past it)."""


def _fmt_offsets(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{off}" for tp, off in sorted(offsets.items()))


def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM and SIGINT ask the daemon to stop; a second SIGINT interrupts at once."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if daemon.stopping and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("received %s: stopping after the batch at hand", signal.Signals(signum).name)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
