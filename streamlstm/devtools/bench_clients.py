"""``bench e2e``'s pieces per Kafka client: librdkafka's bare consumer, the daemon as a
thread, and event latency at a paced rate.

The paced load uses librdkafka's producer whichever client the daemon runs: a few µs
per record, so the generator neither starves the daemon of CPU nor delays what it
stamps (each event's ``ts`` is taken when it is handed to the producer, in ticks of
:data:`TICK_S`).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import orjson

from streamlstm.config import Settings
from streamlstm.devtools.loadgen import synthetic_events
from streamlstm.devtools.synthetic import SyntheticStream
from streamlstm.events import Decoder

TICK_S = 0.002  # the paced producer sends what is due every 2 ms
WARM_S = 1.0  # seconds of load before latencies are kept
READY_S = 60.0  # to join the group and get partitions (the daemon's or the bare pipe's)
WARM_WAIT_S = 30.0  # for the warm-up's predictions once it is sent
DRAIN_S = 30.0  # for the timed window's outputs once it is sent; later ones count as missing
KEPT_UP = 0.98  # achieved / offered rate below this (or events missing): it fell behind


@dataclass
class Timed:
    """The timed window of a latency run: ``offered`` events sent, ``observed`` of them
    acknowledged by the end of the wait, ``waited_s`` after the last was sent.
    ``seconds``: their latencies (all, or a uniform sample of ``observed``). The others
    are missing: each of their latencies is more than ``waited_s``, and
    :func:`percentiles` counts them so. ``span_s``: from the first of those acknowledged
    to the last (NaN: unknown). ``after_poll``: for each of ``seconds``, the part from its
    poll to its acknowledgement, what the daemon (or the bare pipe) owns; the rest is the
    producer's and the broker's before the poll (empty: not known)."""

    seconds: np.ndarray
    offered: int
    observed: int
    waited_s: float
    span_s: float = math.nan
    after_poll: np.ndarray = field(default_factory=lambda: np.empty(0))

    @property
    def achieved(self) -> float | None:
        """The rate the window's events were answered at, first acknowledgement to last:
        the offered rate when the daemon keeps up (a steady queue shifts both ends alike);
        below it when its latency grew over the window. None: fewer than two answers."""
        if self.observed < 2 or not self.span_s > 0:
            return None
        return self.observed / self.span_s

    @property
    def missing(self) -> int:
        return max(0, self.offered - self.observed)


class NotConsuming(RuntimeError):
    """A latency run whose daemon (or bare pipe) is not consuming: timing it would report
    a number that is not its latency, so nothing is measured."""


def _await(
    done: Callable[[], bool],
    timeout_s: float,
    what: str,
    pause: Callable[[], object] = lambda: time.sleep(0.01),
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Return once ``done()``; raise :class:`NotConsuming` naming ``what`` after
    ``timeout_s``, or at once when the thing waited for is no longer ``alive()``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if not alive():
            raise NotConsuming(f"{what}: it stopped first (see its log); nothing measured")
        if time.monotonic() > deadline:
            raise NotConsuming(f"{what}: not within {timeout_s:.0f}s; nothing measured")
        pause()


def _consume(consumer: Any, n: int, wait_s: float) -> list[Any]:
    """Up to ``n`` messages: those queued now, else the first to come within ``wait_s``
    and whatever came with it (the poll strategy of ``ConfluentSource.poll``)."""
    msgs = consumer.consume(n, 0)
    if msgs:
        return msgs
    first = consumer.poll(wait_s)
    if first is None:
        return []
    return [first, *consumer.consume(n - 1, 0)] if n > 1 else [first]


def bare_consume_confluent(settings: Settings, events: int) -> float:
    """Events/s of a bare librdkafka consumer (the daemon's consumer settings, same poll
    strategy) that decodes every message, first to last record."""
    from confluent_kafka import Consumer

    from streamlstm.io.confluent_config import consumer_config

    conf = consumer_config(settings.kafka, f"{settings.kafka.group_id}-ck-{uuid.uuid4().hex[:6]}")
    conf.pop("statistics.interval.ms")
    consumer = Consumer(conf)
    consumer.subscribe([settings.kafka.input_topic])
    decoder = Decoder.from_settings(settings)
    n = settings.engine.max_batch
    seen, first = 0, None
    deadline = time.monotonic() + 300
    try:
        while seen < events and time.monotonic() < deadline:
            msgs = _consume(consumer, n, 0.2)
            if not msgs:
                continue
            if first is None:
                first = time.perf_counter()
            batch, _ = decoder.decode([m.value() for m in msgs if m.error() is None])
            seen += len(batch)
        elapsed = time.perf_counter() - (first or time.perf_counter())
    finally:
        consumer.close()
    if seen < events:
        raise RuntimeError(f"bare confluent consumer saw {seen} of {events} events")
    return seen / elapsed


def start_daemon(settings: Settings) -> tuple[Any, threading.Thread]:
    from streamlstm.daemon import Daemon

    daemon = Daemon(settings)
    thread = threading.Thread(target=daemon.run, name="daemon", daemon=True)
    thread.start()
    return daemon, thread


def paced_producer(settings: Settings) -> Any:
    """librdkafka's producer for the paced load, ready before any event is stamped.

    A fresh producer spends its first few hundred ms connecting, fetching metadata and
    (idempotent) getting a producer id; records handed to it meanwhile wait in its queue.
    Stamped then, the first second of a timed window would carry that start-up (a ~1 s
    tail of 1-2% of the events), which is the generator's, not the daemon's.
    """
    from confluent_kafka import Producer

    from streamlstm.io.confluent_config import producer_config

    conf = producer_config(settings.kafka, 1_048_576)
    producer = Producer({**conf, "linger.ms": 1})
    producer.list_topics(settings.kafka.input_topic, timeout=10)
    return producer


def paced_produce(
    settings: Settings, stream: SyntheticStream, rate: float, count: int, producer: Any = None
) -> None:
    """``count`` events at ``rate`` events/s, each stamped when handed to the producer
    (one of :func:`paced_producer`, kept open for the next call; else a fresh one)."""
    own = producer is None
    if own:
        producer = paced_producer(settings)
    topic, dumps = settings.kafka.input_topic, orjson.dumps
    events = iter(e for chunk in synthetic_events(stream, count) for e in chunk)
    started, sent = time.monotonic(), 0
    while sent < count:
        due = min(count, int((time.monotonic() - started) * rate) + 1)
        now = time.time()
        for e in (next(events) for _ in range(due - sent)):
            e["ts"] = now
            producer.produce(topic, dumps(e), e["key"].encode())
        sent = due
        producer.poll(0)
        time.sleep(TICK_S)
    producer.flush(30)


def latency(settings: Settings, keys: int, width: int, rate: float, seconds: float) -> Timed:
    """Event latencies (s, ts to prediction acknowledged) of a daemon fed at ``rate`` for
    ``seconds``, after a second of the same load from the same producer (its start-up,
    the daemon's first batches and every key's first event are not timed). Events not
    predicted within :data:`DRAIN_S` of the last one sent are missing, not dropped."""
    daemon, thread = start_daemon(settings)
    try:
        _await(
            daemon.ready,
            READY_S,
            "the daemon did not get ready (group joined, partitions assigned, broker reachable)",
            alive=thread.is_alive,
        )
        stream = SyntheticStream(keys, width, seed=1)
        producer = paced_producer(settings)
        warm = int(rate * WARM_S)
        paced_produce(settings, stream, rate, warm, producer)
        _await(
            lambda: daemon.live.predictions >= warm,
            WARM_WAIT_S,
            f"the daemon did not predict the {warm} warm-up events (it is not consuming)",
            alive=thread.is_alive,
        )
        daemon.live.take()  # a window: its counters run on (predictions is a total)
        count = int(rate * seconds)
        paced_produce(settings, stream, rate, count, producer)
        sent = time.monotonic()
        while daemon.live.predictions < warm + count and time.monotonic() < sent + DRAIN_S:
            time.sleep(0.01)
        window = daemon.live.take()
        waited = time.monotonic() - sent
        span = window.acks[1] - window.acks[0] if window.acks else math.nan
        return Timed(window.latencies, count, window.latency_count, waited, span, window.in_daemon)
    finally:
        daemon.request_stop()
        thread.join(timeout=15)


def bare_pipe_latency(
    settings: Settings, keys: int, width: int, rate: float, seconds: float
) -> Timed:
    """The floor under the daemon's latency: ``ts`` to acknowledged output of a bare
    librdkafka consume -> produce loop (each record copied out, the daemon's consumer and
    producer settings, no decode, engine or producer process), same paced load and
    broker, in its own thread of this process as the daemon. What the machine and the
    broker give before the daemon does anything. Outputs not acknowledged within
    :data:`DRAIN_S` of the last event sent are missing, as in :func:`latency`."""
    from confluent_kafka import Consumer, Producer

    from streamlstm.io.confluent_config import consumer_config, producer_config

    k = settings.kafka
    conf = consumer_config(k, f"{k.group_id}-pipe-{uuid.uuid4().hex[:6]}")
    conf.pop("statistics.interval.ms")
    consumer = Consumer({**conf, "auto.offset.reset": "latest"})
    consumer.subscribe([k.input_topic])
    producer = Producer(producer_config(k, 1_048_576))
    # (monotonic clock, latency, polled to acknowledged) per acknowledgement
    acked: list[tuple[float, float, float]] = []
    window = [float("inf")]  # ts from which latencies are kept
    stop = threading.Event()

    def delivered(polled_at: float, err: Any, msg: Any) -> None:
        ts, now = orjson.loads(msg.value())["ts"], time.time()
        if err is None and ts >= window[0]:
            acked.append((time.monotonic(), now - ts, now - polled_at))

    def pipe() -> None:
        n = settings.engine.max_batch
        while not stop.is_set():
            msgs = _consume(consumer, n, 0.005)
            answer = partial(delivered, time.time())
            for m in msgs:
                if m.error() is None:
                    producer.produce(k.output_topic, m.value(), m.key(), on_delivery=answer)
            producer.poll(0)

    thread = threading.Thread(target=pipe, name="bare-pipe", daemon=True)
    try:
        _await(
            lambda: bool(consumer.assignment()),
            READY_S,
            f"the bare pipe's consumer got no partition of {k.input_topic!r}",
            pause=lambda: consumer.poll(0.1),
        )
        thread.start()
        stream = SyntheticStream(keys, width, seed=1)
        load = paced_producer(settings)
        paced_produce(settings, stream, rate, int(rate * WARM_S), load)
        window[0] = time.time()
        count = int(rate * seconds)
        paced_produce(settings, stream, rate, count, load)
        sent = time.monotonic()
        while len(acked) < count and time.monotonic() < sent + DRAIN_S:
            time.sleep(0.01)
        kept = np.asarray(acked[:], dtype=np.float64).reshape(-1, 3)  # later ones: missing
        span = float(kept[-1, 0] - kept[0, 0]) if len(kept) else math.nan
        timed = Timed(kept[:, 1], count, len(kept), time.monotonic() - sent, span, kept[:, 2])
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(timeout=5)
        producer.flush(5)
        consumer.close()
    return timed


def percentiles(timed: Timed) -> tuple[dict[str, float], list[str]]:
    """p50/p90/p99/max in milliseconds of the window's events (empty: none), each missing
    event counted as ``waited_s`` (its latency is more); and which of the figures are
    then only lower bounds (those that rest on a missing event's)."""
    missing, observed = timed.missing, timed.observed
    sample = np.asarray(timed.seconds, dtype=np.float64)
    # Missing events in the sample's proportion (all of them when it is not sampled).
    extra = missing
    if missing and observed:
        extra = max(1, round(missing * len(sample) / observed))
    values = np.sort(np.concatenate([sample, np.full(extra, timed.waited_s)])) * 1000
    if not len(values):
        return {}, []
    # An order statistic below the waited time is an observed event's, exact; from the
    # first one at it on, missing events are among those below, and it is a lower bound.
    exact = int(np.count_nonzero(values < timed.waited_s * 1000)) if extra else len(values)
    ms, bounds = {}, []
    for q in (50, 90, 99):
        ms[f"p{q}"] = float(np.percentile(values, q))
        if math.ceil(q / 100 * (len(values) - 1)) >= exact:
            bounds.append(f"p{q}")
    ms["max"] = float(values[-1])
    if extra:
        bounds.append("max")
    return ms, bounds


@dataclass
class Latency:
    client: str
    offered_events_per_s: float
    events: int  # offered in the timed window
    ms: dict[str, float]  # p50, p90, p99, max; missing events count as waited_s
    acknowledged: int = 0  # of ``events``, by the end of the wait; the rest are missing
    waited_s: float = 0.0  # after the last event was sent
    at_least: list[str] = field(default_factory=list)  # figures of ms that are lower bounds
    achieved_events_per_s: float | None = None  # Timed.achieved
    # p50 and p99 (ms) of Timed.after_poll, over the acknowledged events: the daemon's share
    after_poll_ms: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, client: str, offered: float, timed: Timed) -> Latency:
        ms, at_least = percentiles(timed)
        inside = timed.after_poll[np.isfinite(timed.after_poll)] * 1000
        return cls(
            client,
            offered,
            events=timed.offered,
            ms=ms,
            acknowledged=timed.observed,
            waited_s=timed.waited_s,
            at_least=at_least,
            achieved_events_per_s=timed.achieved,
            after_poll_ms={f"p{q}": float(np.percentile(inside, q)) for q in (50, 99)}
            if len(inside)
            else {},
        )

    @property
    def kept_up(self) -> bool:
        """Every event answered, at :data:`KEPT_UP` of the offered rate or more."""
        rate = self.achieved_events_per_s
        return (
            self.acknowledged >= self.events
            and rate is not None
            and rate >= KEPT_UP * self.offered_events_per_s
        )

    def text(self) -> str:
        ms, low = self.ms, set(self.at_least)
        figures = "  ".join(f"{k} {'>=' if k in low else ''}{v:.1f} ms" for k, v in ms.items())
        missing = self.events - self.acknowledged
        done = (
            f", {missing:,} not acknowledged within {self.waited_s:.0f}s, counted as more"
            if missing > 0
            else ""
        )
        rate = self.achieved_events_per_s
        answered = "?" if rate is None else f"{rate:,.0f}"
        verdict = "kept up" if self.kept_up else "FELL BEHIND"
        own = self.after_poll_ms
        share = f"; poll to ack p50 {own['p50']:.1f} / p99 {own['p99']:.1f} ms" if own else ""
        return (
            f"event latency, {self.client}, at {self.offered_events_per_s:,.0f} events/s "
            f"offered ({self.events:,} events{done}; answered at {answered} events/s, "
            f"{verdict}): {figures}{share}"
        )
