"""The daemon's lifecycle: connect, turn the loop, hand partitions over, shut down.

One main thread runs the loop; the Kafka client's threads move the bytes (kafka-python's
or librdkafka's, ``kafka.client``), and the producer runs in a child process
(``streamlstm.io.producer``)::

    poll -> decode -> engine -> encode -> ticket -> one frame to the producer (no waiting)
    ... next turns ...
    producer reports the frame acknowledged -> metrics (latency, counts)
        -> offsets committable -> commit

The engine never waits for the network, nor for the producer's per-record work: outputs
of batch k are produced in the child while batch k+1 is polled, decoded and predicted.
After the send (acknowledgements, resends, backpressure, commits) is
:mod:`streamlstm.daemon.delivery`; what the daemon counts and logs, :mod:`.telemetry`;
which member trains and how its weights reach every member, :mod:`.modelsync`.

The broker may be down at start or go away: the daemon retries with backoff, says so on
``/readyz``, and carries on. On SIGTERM it finishes the batch at hand, flushes, commits
and exits 0 within :data:`SHUTDOWN_SECONDS`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from streamlstm.config import ConfigError, Settings
from streamlstm.daemon.delivery import MAX_BACKOFF_SECONDS, Delivery, Fatal, short
from streamlstm.daemon.guard import EngineGuard, merged
from streamlstm.daemon.heap import settled
from streamlstm.daemon.modelsync import ModelSync
from streamlstm.daemon.partitions import Partitions
from streamlstm.daemon.telemetry import Telemetry
from streamlstm.engine import Engine
from streamlstm.events import Decoder, EventBatch
from streamlstm.io import Polled, Sink, Source, Ticket, dead_letters, ensure_topics
from streamlstm.io.client import TopicPartition, make_source
from streamlstm.io.producer import Group
from streamlstm.io.sink import encode_predictions, per_message, send_groups
from streamlstm.learning.device import require_training_device
from streamlstm.metrics import Metrics, MetricsServer

if TYPE_CHECKING:
    from streamlstm.learning.background import BackgroundTrainer

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 8.0  # budget for flush + commit + leaving the group (SIGTERM to exit < 10 s)
GAUGE_SECONDS = 1.0  # how often lag, keys, evictions and readiness are refreshed
STATUS_SECONDS = 60.0  # how often a one-line status goes to the log

Budget = Callable[[float], float]  # seconds left to spend, at most the argument


class Daemon:
    """Consume, predict, produce, dead-letter, commit; serve metrics. ``run()`` blocks."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, engine: Engine | None = None
    ) -> None:
        if settings.model.input_size is None:
            raise ConfigError("model.input_size: must be set for the daemon (width of `values`)")
        require_training_device(settings)  # before connecting: a bad device is exit 2 at once
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.engine = engine or Engine.from_settings(settings)
        self.decoder = Decoder.from_settings(settings)
        self.telemetry = Telemetry(
            self.metrics, settings.engine.anomaly_threshold, self.engine.model_version
        )
        self.live = self.telemetry.live
        self.delivery = Delivery(self.telemetry, settings.engine.max_batch)
        self.guard = EngineGuard()  # a batch failing in the engine goes event by event
        self.partitions = Partitions(settings, self.engine.store, self.delivery, self.telemetry)
        self.partitions.beat = lambda: setattr(self, "_heartbeat", time.monotonic())
        self.source: Source | None = None
        self.server: MetricsServer | None = None
        self.models = ModelSync(self.engine, settings, self.metrics)  # trainer role, weights
        self.exit_code = 0
        self._stop = threading.Event()
        self._deadline: float | None = None  # monotonic end of the shutdown budget
        self._broker_ok = False
        self._last_contact = 0.0  # monotonic time the broker last answered something
        self._contact_window = settings.kafka.session_timeout_ms / 1000  # as the group judges
        self._last_commit = 0.0
        self._last_gauges = 0.0
        self._last_status = time.monotonic()
        # /healthz fails once the loop has not turned this long (stuck in the engine, on a
        # full pipe to a hung producer, in a shutdown that hangs).
        self.liveness_seconds = settings.metrics.liveness_seconds
        self._heartbeat = time.monotonic()  # the loop's last turn (or connection attempt)

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

    def unhealthy(self) -> str | None:
        """Why ``/healthz`` fails: the loop has not turned for ``liveness_seconds``."""
        stale = time.monotonic() - self._heartbeat
        if stale > self.liveness_seconds:
            return f"the loop has not turned for {stale:.0f}s"
        return None

    @property
    def trainer(self) -> BackgroundTrainer | None:
        """The fine-tuning trainer while this member holds the trainer role."""
        return self.models.trainer

    @property
    def metrics_port(self) -> int | None:
        return self.server.port if self.server else None

    def start_metrics(self) -> None:
        """Serve /metrics, /healthz, /readyz (idempotent; ``run`` calls it)."""
        m = self.settings.metrics
        if m.enabled and self.server is None:
            self.server = MetricsServer(
                self.metrics, m.host, m.port, ready=self.ready, unhealthy=self.unhealthy
            ).start()
            log.info("metrics on http://%s:%d/metrics", m.host, self.server.port)

    def run(self) -> int:
        """Run until :meth:`request_stop`; returns the exit code (0 after a clean stop)."""
        self._heartbeat = time.monotonic()
        self.start_metrics()
        try:
            if self._connect():
                with settled():  # start-up objects out of the collector's way (GC pauses)
                    while not self._stop.is_set():
                        self._turn()
        except Fatal as exc:
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
            self._heartbeat = time.monotonic()
            try:
                if k.create_topics:
                    ensure_topics(k, changelog_topic=self.settings.changelog_topic)
                self.delivery.sink = Sink(self.settings)
                self.source = make_source(
                    self.settings,
                    on_revoke=self._on_revoke,
                    on_assigned=self._on_assigned,
                    on_lost=self._on_lost,
                    on_committed=self.delivery.committed,
                )
            except Exception as exc:
                self._close_clients()
                self.metrics.broker_errors.labels("connect").inc()
                log.warning(
                    "cannot reach Kafka at %s (%s); retrying in %.1fs",
                    k.bootstrap_servers,
                    short(exc),
                    delay,
                )
                self._stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)
                continue
            self._broker_ok = True
            self._last_contact = time.monotonic()
            self.models.start(self._stop)  # the newest published weights, before any batch
            topics = (k.input_topic, k.output_topic, k.dead_letter_topic)
            log.info(
                "connected to Kafka at %s: %s -> %s (dead letters: %s), group %s",
                *(k.bootstrap_servers, *topics, k.group_id),
            )
            return True
        return False

    # -- the loop --------------------------------------------------------------------

    def _turn(self) -> None:
        assert self.source is not None
        self._heartbeat = time.monotonic()
        if self.delivery.check_acks():
            self._last_contact = time.monotonic()
        self.delivery.apply_backpressure(self.source)
        timeout = self.settings.kafka.poll_timeout_ms
        if len(self.delivery.tracker):  # acknowledgements are noticed between polls
            timeout = min(timeout, 5)
        try:
            polled = self.source.poll(timeout)
        except Exception as exc:
            self._broker_trouble("poll", exc)
            return
        self.partitions.restore(self.source)  # new partitions' keys, before their records
        if polled is not None:
            self._last_contact = time.monotonic()
            try:
                self._process(polled)
            except Exception as exc:  # not the engine (guarded): the producer, or a bug
                raise Fatal("processing a batch failed") from exc
        now = time.monotonic()
        self.models.turn(now)
        due = now - self._last_commit >= self.settings.kafka.commit_interval_ms / 1000
        if due:
            self._last_commit = now
        statelog = self.partitions.statelog
        if statelog is not None:  # rows to the changelog first, offsets after them
            statelog.advance(self.source, due)
        elif due:
            self.delivery.commit_async(self.source)
        if now - self._last_gauges >= GAUGE_SECONDS:
            self._check_contact(now)
            self.telemetry.gauges(self.engine, self._lag(), self.ready())
            self._last_gauges = now
        if now - self._last_status >= STATUS_SECONDS:
            pending = self.delivery.tracker.pending_sends
            self.telemetry.log_status(now, len(self.engine.store), pending)
            self._last_status = now

    def _process(self, polled: Polled) -> None:
        """Decode, predict, send; everything this poll sent becomes one ticket."""
        assert self.delivery.sink is not None
        batch, rejections = self.decoder.decode(polled.payloads)
        at, source = batch.source, self.source
        ends = source.highwater if source is not None else lambda partition: None
        applied = self.partitions.skip(batch.keys, polled.partition[at], polled.offset[at], ends)
        if applied is not None:  # re-read events the restored state already reflects
            batch = batch.take(np.flatnonzero(~applied))
        ticket = Ticket(ends=polled.ends, polled_at=polled.polled_at, event_ts=batch.ts)
        groups: list[Group] = []
        if len(batch):
            rows = batch.source
            keys: list[bytes | None] = [key.encode() for key in batch.keys]
            self.telemetry.key_mismatches(polled.key_mismatches(rows, keys))
            guarded = self.guard.process(
                partial(self._predict, polled.topic),
                batch,
                polled.partition[rows],
                polled.offset[rows],
                polled.payloads,
                rejections,
            )
            if guarded.failures:  # the rare path: some events failed in the engine alone
                rejections = merged(rejections, guarded.failures)
                batch = batch.take(guarded.rows)
                ticket.event_ts = batch.ts
                keys = [keys[i] for i in guarded.rows.tolist()]
            values = guarded.values
            if self.settings.kafka.output_per_message:  # one JSON array per input message
                keys, values = per_message(batch.source.tolist(), keys, values, polled.records)
            groups.append((self.delivery.sink.output_topic, keys, values, None))
            ticket.predictions = len(batch)
            ticket.anomalies = guarded.anomalies
        if rejections:
            dl_sends, reasons = dead_letters(
                polled.topic, self.settings.kafka.dead_letter_topic, polled.records, rejections
            )
            groups.extend(send_groups(dl_sends))
            ticket.dead_letter_reasons = reasons
            self.telemetry.rejected(reasons)
        self.delivery.send(ticket, groups)

    def _predict(
        self, topic: str, batch: EventBatch, partition: np.ndarray, offset: np.ndarray
    ) -> tuple[list[bytes], int]:
        """Engine, encoding, then what may not be repeated (trainer, metrics)."""
        started = time.perf_counter()
        output = self.engine.process(batch, partition=partition, offset=offset)
        seconds = time.perf_counter() - started
        values = encode_predictions(output)
        if self.trainer is not None:
            try:
                self.trainer.notify(output)
            except Exception:  # the outputs stand; the trainer misses one batch
                log.exception("the trainer failed to take a batch")
        return values, self.telemetry.batch(topic, output, seconds)

    def _broker_trouble(self, operation: str, exc: BaseException) -> None:
        self.metrics.broker_errors.labels(operation).inc()
        log.warning("Kafka %s failed (%s); retrying", operation, short(exc))
        self._stop.wait(0.5)

    def _check_contact(self, now: float) -> None:
        """Broker reachable = it answered a heartbeat, fetch or produce lately."""
        assert self.source is not None
        last = max(self._last_contact, self.source.last_heartbeat() or 0.0)
        ok = now - last < self._contact_window
        if ok and not self._broker_ok:
            log.info("Kafka at %s answers again", self.settings.kafka.bootstrap_servers)
        elif not ok and self._broker_ok:
            log.warning(
                "Kafka at %s has not answered for %.0fs: not ready; the client reconnects "
                "with backoff, outputs wait in the producer",
                self.settings.kafka.bootstrap_servers,
                now - last,
            )
        self._broker_ok = ok

    def _lag(self) -> dict[int, int]:
        assert self.source is not None
        try:
            return self.source.lag()
        except Exception as exc:
            log.debug("lag: %s", exc)
            return {}

    # -- rebalances: the client calls these while the loop waits in poll() or close()
    # -- (kafka-python on its I/O thread, librdkafka on this one), never mid-batch ------

    def _on_revoke(self, revoked: set[TopicPartition]) -> dict[TopicPartition, int]:
        """Flush, write the changelog, and return what may be committed."""
        budget = 5.0
        if self._deadline is not None:
            budget = max(0.0, min(budget, self._deadline - time.monotonic()))
        return self.partitions.revoke(revoked, budget)

    def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        self.partitions.assigned(assigned)
        self.models.owned(self.partitions.owned)

    def _on_lost(self, lost: set[TopicPartition]) -> None:
        self.partitions.lost(lost)
        self.models.owned(self.partitions.owned)

    # -- shutdown --------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Flush, account, commit, leave the group, close; within the shutdown budget."""
        self._stop.set()
        self._deadline = time.monotonic() + SHUTDOWN_SECONDS

        def left(cap: float) -> float:
            assert self._deadline is not None
            return max(0.0, min(cap, self._deadline - time.monotonic()))

        self.models.close(left(2.0))
        delivery, sink = self.delivery, self.delivery.sink
        offsets: dict | None = None
        if sink is not None and self.source is not None:
            log.info("stopping: flushing %d in-flight records", delivery.tracker.pending_sends)
            sink.flush(left(4.0))
            try:
                delivery.check_acks()
            except Fatal as exc:
                log.warning("producer: %s", exc)
            if self.partitions.statelog is not None:  # the rows first, then the offsets
                offsets = self.partitions.statelog.checkpoint(self.source.assigned, left(2.0))
            delivery.commit_final(self.source, left(1.5), offsets)
            if delivery.tracker.pending_sends:
                log.warning(
                    "%d records were not acknowledged before exit; their input offsets are "
                    "not committed, so they will be predicted again on restart",
                    delivery.tracker.pending_sends,
                )
        ends = self.partitions.local_ends(offsets) if offsets else {}
        self._close_clients(left)
        if ends:
            self.partitions.save_local(ends)
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.metrics.ready.set(0)
        log.info("stopped")

    def _close_clients(self, left: Budget | None = None) -> None:
        budget: Budget = left or (lambda cap: cap)
        if self.source is not None:
            try:
                self.source.close(timeout_ms=max(1, int(budget(1.5) * 1000)))
            except Exception as exc:
                log.warning("consumer close: %s", exc)
            self.source = None
        self.partitions.close()
        self.delivery.close_sink(budget(1.0))
