"""``streamlstm bench e2e``: the daemon on each Kafka client against bare consumers, same run.

1. N synthetic events are produced to a fresh topic (one event per message, or
   ``batch`` per JSON-array message).
2. Bare consumers, kafka-python and librdkafka (confluent-kafka), same fetch settings,
   read the topic and decode every message with the same decoder: the most any Python
   daemon built on that client could do.
3. The daemon, on each client (``kafka.client``), reads the same topic in its own group
   and runs its whole job: decode, engine, prediction records produced and
   acknowledged, dead letters, offsets committed. Its rate runs from its first event to
   the last prediction acknowledged: its maximum sustained rate.
4. A second baseline: a bare kafka-python consume -> decode -> produce pipe (no engine),
   which is what that client costs when every event also yields an output record.
5. Event latency (ts to prediction acknowledged) of each client's daemon at half its
   maximum sustained rate (or at ``rate``), fed by a paced librdkafka producer; then,
   at the last of those rates, the floor: a bare librdkafka consume -> produce pipe
   under the same load (what the machine and the broker give with no daemon at all).
   Each row says how many of the window's events were answered within 30 s of the last
   one sent; the others are not dropped but count as that wait (the percentiles resting
   on them print as ">=", lower bounds). And whether it kept up: the rate its answers
   came at, first to last (a steady queue shifts both ends alike, a growing one stretches
   them), against the offered rate; below 0.98 of it, or any event missing, it fell
   behind. The maximum comes from a backlog with nothing else running, the latency run
   shares the cores with the paced producer: half of one need not be half of the other.
   Each row also gives the part from the poll to the acknowledgement ("poll to ack"):
   what the daemon (or the pipe) owns; the rest, stamp to poll, is the producer's, the
   broker's and the fetch wait's. A broker that answers a fetch only when its wait runs
   out (Tansu does, per partition) puts up to ``kafka.fetch_max_wait_ms`` times the
   partitions there; Apache Kafka answers as soon as data arrives.

With ``output_per_message`` the batched run also measures the daemon with
``kafka.output_per_message`` on (one JSON array out per message in), the two modes
interleaved over ``rounds`` runs each in fresh consumer groups; medians are reported, as
the machine this runs on is often shared.

Both sides talk to the same broker on the same machine, one after the other.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, get_args

import orjson
from kafka import KafkaConsumer

from streamlstm.config import KafkaSettings, Settings, load_settings
from streamlstm.devtools.bench_clients import (
    Latency,
    bare_consume_confluent,
    bare_pipe_latency,
    latency,
    start_daemon,
)
from streamlstm.devtools.loadgen import Producer, make_producer, synthetic_events
from streamlstm.devtools.synthetic import SyntheticStream
from streamlstm.events import Decoder
from streamlstm.io.source import consumer_kwargs

log = logging.getLogger(__name__)

BARE_PIPE = "bare librdkafka pipe"  # the latency floor's row


@dataclass
class Throughput:
    batch: int  # events per message
    events: int
    bare_events_per_s: float
    pipe_events_per_s: float
    daemon_events_per_s: float  # the median over ``rounds`` runs
    per_message_events_per_s: float | None = None  # kafka.output_per_message on (median)
    rounds: int = 1
    bare_confluent_events_per_s: float | None = None  # a bare librdkafka consumer + decode
    confluent_events_per_s: float | None = None  # the daemon on kafka.client = confluent

    @property
    def ratio(self) -> float:
        return self.daemon_events_per_s / self.bare_events_per_s

    @property
    def pipe_ratio(self) -> float:
        return self.daemon_events_per_s / self.pipe_events_per_s

    @property
    def confluent_ratio(self) -> float | None:
        """The confluent daemon against the bare kafka-python consumer (target >= 0.9)."""
        if self.confluent_events_per_s is None:
            return None
        return self.confluent_events_per_s / self.bare_events_per_s


@dataclass
class E2EResult:
    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        rows = []
        for t in self.throughput:
            row = asdict(t)
            row.update(ratio=round(t.ratio, 3), pipe_ratio=round(t.pipe_ratio, 3))
            if t.confluent_ratio is not None:
                row["confluent_ratio"] = round(t.confluent_ratio, 3)
            rows.append(row)
        return {
            "throughput": rows,
            "latency": {
                lat.client: {
                    "offered_events_per_s": round(lat.offered_events_per_s, 1),
                    "events": lat.events,
                    "acknowledged": lat.acknowledged,
                    "waited_s": round(lat.waited_s, 1),
                    **{k: round(v, 2) for k, v in lat.ms.items()},
                    "at_least": lat.at_least,
                    "achieved_events_per_s": (
                        None
                        if lat.achieved_events_per_s is None
                        else round(lat.achieved_events_per_s, 1)
                    ),
                    "kept_up": lat.kept_up,
                    "poll_to_ack_ms": {k: round(v, 2) for k, v in lat.after_poll_ms.items()},
                }
                for lat in self.latency
            },
            "settings": self.settings,
        }

    def lines(self) -> list[str]:
        out = []
        for t in self.throughput:
            kind = "1 event per message" if t.batch == 1 else f"{t.batch} events per message"
            out += [
                f"{kind}, {t.events:,} events:",
                f"  bare consumer + decode, kafka-python {t.bare_events_per_s:10,.0f} events/s",
            ]
            if t.bare_confluent_events_per_s is not None:
                out.append(
                    f"  bare consumer + decode, confluent    "
                    f"{t.bare_confluent_events_per_s:10,.0f} events/s"
                )
            out += [
                f"  bare consume+decode+produce (k-p)    {t.pipe_events_per_s:10,.0f} events/s",
                f"  daemon, kafka-python (end to end)    {t.daemon_events_per_s:10,.0f} events/s",
            ]
            if t.confluent_events_per_s is not None and t.confluent_ratio is not None:
                out.append(
                    f"  daemon, confluent (end to end)       "
                    f"{t.confluent_events_per_s:10,.0f} events/s"
                )
                own = t.bare_confluent_events_per_s or float("nan")
                out += [
                    f"  daemon confluent / bare kafka-python {t.confluent_ratio:10.2f}",
                    f"  daemon confluent / bare confluent    "
                    f"{t.confluent_events_per_s / own:10.2f}",
                ]
            out += [
                f"  daemon / bare consumer (kafka-python) {t.ratio:9.2f}",
                f"  daemon / bare pipe (kafka-python)    {t.pipe_ratio:10.2f}",
            ]
            if t.per_message_events_per_s is not None:
                gain = t.per_message_events_per_s / t.daemon_events_per_s
                out += [
                    f"  daemon, one array out per message in {t.per_message_events_per_s:,.0f}"
                    f" events/s ({gain:.2f}x; medians of {t.rounds} interleaved runs)",
                ]
        out += [lat.text() for lat in self.latency if lat.ms]
        s = self.settings
        out.append(
            f"settings: {s.get('keys')} keys, width {s.get('width')}, hidden {s.get('hidden')}, "
            f"{s.get('layers')} layers, max_batch {s.get('max_batch')}, broker {s.get('broker')}"
        )
        return out


def _settings(bootstrap: str, topic: str, width: int, hidden: int, max_batch: int) -> Settings:
    return load_settings(
        overrides={
            "kafka.bootstrap_servers": bootstrap,
            "kafka.input_topic": f"{topic}-in",
            "kafka.output_topic": f"{topic}-out",
            "kafka.dead_letter_topic": f"{topic}-dlq",
            "kafka.group_id": f"{topic}-daemon",
            "kafka.session_timeout_ms": "6000",
            "kafka.heartbeat_interval_ms": "1000",
            "kafka.partitions": "3",
            "model.input_size": str(width),
            "model.hidden_size": str(hidden),
            "engine.max_batch": str(max_batch),
            "training.enabled": "false",
            "metrics.enabled": "false",
        }
    )


def _produce(settings: Settings, events: Iterator[list[dict]], batch: int, rate: float = 0) -> None:
    producer = make_producer(settings.kafka)
    try:
        Producer(producer, settings.kafka.input_topic, rate=rate, batch=batch).run(
            events, progress=False
        )
    finally:
        producer.close(timeout=5)


def _consumer(settings: Settings, group: str) -> KafkaConsumer:
    # The daemon's own consumer settings, so the baseline differs only in what it skips.
    kwargs = {**consumer_kwargs(settings, group), "auto_offset_reset": "earliest"}
    consumer = KafkaConsumer(**kwargs)
    consumer.subscribe([settings.kafka.input_topic])
    return consumer


def bare_consume(settings: Settings, events: int, produce_outputs: bool = False) -> float:
    """Events/s of poll + decode (+ one produced record per event), first to last record."""
    consumer = _consumer(settings, f"{settings.kafka.group_id}-bare-{uuid.uuid4().hex[:6]}")
    producer = make_producer(settings.kafka) if produce_outputs else None
    decoder = Decoder.from_settings(settings)
    out_topic = settings.kafka.output_topic + "-pipe"
    seen = 0
    first = None
    deadline = time.monotonic() + 300
    try:
        while seen < events and time.monotonic() < deadline:
            result = consumer.poll(timeout_ms=200)
            if not result:
                continue
            if first is None:
                first = time.perf_counter()
            for recs in result.values():
                batch, _ = decoder.decode([r.value for r in recs])
                seen += len(batch)
                if producer is not None:  # one small JSON record per event, as the daemon
                    send, dumps = producer.send, orjson.dumps
                    values = batch.values.tolist()
                    for key, ts, v in zip(batch.keys, batch.ts.tolist(), values, strict=True):
                        send(
                            out_topic, value=dumps({"key": key, "ts": ts, "p": v}), key=key.encode()
                        )
        if producer is not None:
            producer.flush(timeout=60)
        elapsed = time.perf_counter() - (first or time.perf_counter())
    finally:
        consumer.close(autocommit=False)
        if producer is not None:
            producer.close(timeout=5)
    if seen < events:
        raise RuntimeError(f"bare consumer saw {seen} of {events} events")
    return seen / elapsed


def daemon_throughput(settings: Settings, events: int) -> float:
    """Events/s of the daemon from its first event to its last prediction acknowledged."""
    daemon, thread = start_daemon(settings)
    live = daemon.live
    deadline = time.monotonic() + 600
    try:
        while live.predictions < events and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.01)
    finally:
        daemon.request_stop()
        thread.join(timeout=15)
    if live.predictions < events or live.first_event_at is None or live.last_ack_at is None:
        raise RuntimeError(f"daemon predicted {live.predictions} of {events} events")
    return events / (live.last_ack_at - live.first_event_at)


def bench_e2e(
    events: int = 100_000,
    keys: int = 1000,
    width: int = 8,
    hidden: int = 64,
    batch: int = 1,
    rate: float = 0.0,
    latency_seconds: float = 10.0,
    max_batch: int = 2048,
    bootstrap: str | None = None,
    output_per_message: bool = False,
    rounds: int = 1,
    clients: tuple[str, ...] = ("kafka-python", "confluent"),
) -> E2EResult:
    """Run the benchmark (an embedded broker unless ``bootstrap`` is given). ``rate`` 0:
    latency at half of each client's measured maximum sustained rate."""
    from streamlstm.devtools.broker import EmbeddedBroker
    from streamlstm.io import ensure_topics

    known = get_args(KafkaSettings.model_fields["client"].annotation)
    if not clients or not set(clients) <= set(known):
        raise ValueError(f"clients must be some of {', '.join(known)}, got {clients!r}")
    with contextlib.ExitStack() as stack:
        if bootstrap is None:
            bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap
            where = "embedded Tansu"
        else:
            where = bootstrap
        result = E2EResult(
            settings={
                "events": events,
                "keys": keys,
                "width": width,
                "hidden": hidden,
                "layers": 2,
                "max_batch": max_batch,
                "broker": where,
                "rounds": rounds,
                "clients": list(clients),
            }
        )
        most: dict[str, float] = {}
        for per_message in sorted({1, batch}):
            topic = f"bench-{uuid.uuid4().hex[:8]}"
            s = _settings(bootstrap, topic, width, hidden, max_batch)
            ensure_topics(s.kafka)
            stream = SyntheticStream(keys, width, seed=0)
            _produce(s, synthetic_events(stream, events), per_message)
            bare = bare_consume(s, events)
            bare_ck = bare_consume_confluent(s, events) if "confluent" in clients else None
            pipe = bare_consume(s, events, produce_outputs=True)
            # (client, output_per_message) runs, interleaved: all see the same machine load.
            modes = [(c, False) for c in clients]
            if output_per_message and per_message > 1:
                modes.append(("kafka-python", True))
            runs: dict[tuple[str, bool], list[float]] = {mode: [] for mode in modes}
            for r in range(max(1, rounds)):
                for client, grouped in modes:
                    tag = f"{r}-{client}-{int(grouped)}"
                    kafka = s.kafka.model_copy(
                        update={
                            "group_id": f"{topic}-daemon-{tag}",
                            "output_per_message": grouped,
                            "client": client,
                        }
                    )
                    # A fresh changelog too: one restored from an earlier run skips its events.
                    state = s.state.model_copy(update={"changelog_topic": f"{topic}-state-{tag}"})
                    run = s.model_copy(update={"kafka": kafka, "state": state})
                    runs[(client, grouped)].append(daemon_throughput(run, events))
            median = {mode: statistics.median(v) for mode, v in runs.items()}
            row = Throughput(
                per_message,
                events,
                bare,
                pipe,
                median.get(("kafka-python", False), float("nan")),
                rounds=rounds,
                bare_confluent_events_per_s=bare_ck,
                confluent_events_per_s=median.get(("confluent", False)),
            )
            row.per_message_events_per_s = median.get(("kafka-python", True))
            result.throughput.append(row)
            if per_message == 1:
                most = {c: median[(c, False)] for c in clients}
        if latency_seconds > 0:
            for client in clients:
                offered = rate or most[client] / 2
                topic = f"bench-{uuid.uuid4().hex[:8]}"
                s = _settings(bootstrap, topic, width, hidden, max_batch)
                s = s.model_copy(update={"kafka": s.kafka.model_copy(update={"client": client})})
                ensure_topics(s.kafka)
                lat = latency(s, keys, width, offered, latency_seconds)
                result.latency.append(Latency.of(client, offered, lat))
            # The floor at the last offered rate: a bare pipe, same load, broker, machine.
            floor = bare_pipe_latency(s, keys, width, offered, latency_seconds)
            result.latency.append(Latency.of(BARE_PIPE, offered, floor))
    return result
