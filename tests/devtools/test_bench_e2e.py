"""``streamlstm bench e2e`` runs end to end on tiny numbers (no timing assertions)."""

from __future__ import annotations

import itertools
import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from conftest import KafkaTools

from streamlstm.cli import build_parser, dev
from streamlstm.config import load_settings
from streamlstm.daemon.telemetry import LiveStats
from streamlstm.devtools import bench_clients
from streamlstm.devtools.bench_clients import Latency, Timed
from streamlstm.devtools.bench_e2e import E2EResult, bench_e2e

pytestmark = pytest.mark.integration


def test_bench_e2e_smoke(kafka_tools: KafkaTools) -> None:
    result = bench_e2e(
        events=600,
        keys=20,
        width=3,
        hidden=8,
        batch=10,
        rate=300,
        latency_seconds=1.0,
        bootstrap=kafka_tools.bootstrap,
        output_per_message=True,
    )
    doc = result.as_dict()
    json.dumps(doc)  # the --json output is plain JSON
    assert [row["batch"] for row in doc["throughput"]] == [1, 10]
    for row in doc["throughput"]:
        assert row["events"] == 600
        assert row["bare_events_per_s"] > 0 and row["daemon_events_per_s"] > 0
        ratio = row["daemon_events_per_s"] / row["bare_events_per_s"]
        assert row["ratio"] == pytest.approx(ratio, abs=1e-3)  # rounded to 3 places
    first, batched = doc["throughput"]
    assert first["per_message_events_per_s"] is None  # one event per message: nothing to group
    assert batched["per_message_events_per_s"] > 0
    for client in ("kafka-python", "confluent", "bare librdkafka pipe"):
        assert doc["latency"][client]["events"] == 300
        assert 0 < doc["latency"][client]["p50"] <= doc["latency"][client]["p99"]
        assert 0 <= doc["latency"][client]["acknowledged"] <= 300
        assert isinstance(doc["latency"][client]["kept_up"], bool)  # on this machine: either
        own = doc["latency"][client]["poll_to_ack_ms"]  # the daemon's (the pipe's) share
        assert 0 < own["p50"] <= own["p99"] <= doc["latency"][client]["max"]
    assert first["bare_confluent_events_per_s"] > 0 and first["confluent_events_per_s"] > 0
    text = "\n".join(result.lines())
    assert "one array out per message in" in text
    assert "daemon confluent / bare kafka-python" in text
    assert "event latency, confluent, at 300 events/s" in text
    assert "event latency, bare librdkafka pipe, at 300 events/s" in text  # the floor
    assert text.count("poll to ack p50") == 3


def test_bench_e2e_cli_options() -> None:
    args = build_parser().parse_args(
        [
            "bench",
            "e2e",
            "--json",
            "--batch",
            "20",
            "--bootstrap",
            "h:1",
            "--output-per-message",
            "--rounds",
            "3",
        ]
    )
    assert (args.json, args.batch, args.bootstrap) == (True, 20, "h:1")
    assert (args.output_per_message, args.rounds) == (True, 3)
    assert (args.clients, args.rate) == ("kafka-python,confluent", 0)  # 0: half of the max
    assert args.handler is dev.run_bench_e2e


def test_latency_times_a_producer_started_before_the_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The warm-up and the timed window share one producer, made before either: a fresh
    one's start-up (connect, metadata, producer id) would be timed as the daemon's."""
    live = LiveStats()
    daemon = SimpleNamespace(ready=lambda: True, live=live, request_stop=lambda: None)
    idle = threading.Thread(target=lambda: None)
    idle.start()
    monkeypatch.setattr(bench_clients, "start_daemon", lambda settings: (daemon, idle))
    made: list[object] = []
    used: list[Any] = []

    def producer(settings: Any) -> object:
        made.append(object())
        return made[-1]

    def produce(settings: Any, stream: Any, rate: float, count: int, p: Any = None) -> None:
        used.append(p)
        live.add_events(count)
        live.add(count, 0, 0, np.full(count, 0.01))

    monkeypatch.setattr(bench_clients, "paced_producer", producer)
    monkeypatch.setattr(bench_clients, "paced_produce", produce)
    settings = load_settings(overrides={"model.input_size": "2"})
    timed = bench_clients.latency(settings, keys=3, width=2, rate=100, seconds=2)
    assert len(timed.seconds) == timed.observed == timed.offered == 200  # the timed window only
    assert timed.missing == 0
    assert len(made) == 1 and used == [made[0], made[0]]


@pytest.mark.parametrize("clients", [(), ("kafka-python", "kafka-pyhton")])
def test_bench_e2e_refuses_unknown_or_no_clients_before_starting(clients: tuple) -> None:
    with pytest.raises(ValueError, match="clients must be some of kafka-python, confluent"):
        bench_e2e(clients=clients, bootstrap="unreachable:1")


def _never_measure(*_: Any) -> None:
    raise AssertionError("a latency run went on to measure")


@pytest.mark.parametrize("alive", [True, False], ids=["never-ready", "died"])
def test_latency_refuses_a_daemon_that_is_not_ready(
    monkeypatch: pytest.MonkeyPatch, alive: bool
) -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait if alive else lambda: None)
    thread.start()
    if not alive:
        thread.join()
    daemon = SimpleNamespace(ready=lambda: False, live=LiveStats(), request_stop=release.set)
    monkeypatch.setattr(bench_clients, "start_daemon", lambda settings: (daemon, thread))
    monkeypatch.setattr(bench_clients, "paced_producer", _never_measure)
    monkeypatch.setattr(bench_clients, "READY_S", 0.05)
    settings = load_settings(overrides={"model.input_size": "2"})
    match = "did not get ready.*(not within|stopped first)"
    with pytest.raises(bench_clients.NotConsuming, match=match):
        bench_clients.latency(settings, keys=3, width=2, rate=100, seconds=2)
    assert not thread.is_alive()  # stopped and joined


def test_latency_refuses_a_daemon_that_does_not_predict_the_warm_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    daemon = SimpleNamespace(ready=lambda: True, live=LiveStats(), request_stop=release.set)
    monkeypatch.setattr(bench_clients, "start_daemon", lambda settings: (daemon, thread))
    monkeypatch.setattr(bench_clients, "paced_producer", lambda settings: object())
    sent: list[int] = []
    monkeypatch.setattr(bench_clients, "paced_produce", lambda s, st, r, n, p: sent.append(n))
    monkeypatch.setattr(bench_clients, "WARM_WAIT_S", 0.05)
    settings = load_settings(overrides={"model.input_size": "2"})
    with pytest.raises(bench_clients.NotConsuming, match="100 warm-up events"):
        bench_clients.latency(settings, keys=3, width=2, rate=100, seconds=2)
    assert sent == [100]  # the warm-up only, never the timed window


class _FakeConsumer:
    """librdkafka's Consumer as the bare pipe uses it: ``assigned`` partitions, no records."""

    assigned: tuple[int, ...] = ()

    def __init__(self, conf: dict) -> None:
        pass

    def subscribe(self, topics: list[str]) -> None:
        pass

    def assignment(self) -> list[int]:
        return list(self.assigned)

    def consume(self, n: int, timeout: float) -> list:
        return []

    def poll(self, timeout: float) -> None:
        return None

    def close(self) -> None:
        pass


def test_the_bare_pipe_refuses_a_consumer_without_partitions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    confluent_kafka = pytest.importorskip("confluent_kafka")
    closed: list[str] = []

    class Unassigned(_FakeConsumer):
        def close(self) -> None:
            closed.append("consumer")

    class Quiet:
        def __init__(self, conf: dict) -> None:
            pass

        def flush(self, timeout: float) -> int:
            return 0

    monkeypatch.setattr(confluent_kafka, "Consumer", Unassigned)
    monkeypatch.setattr(confluent_kafka, "Producer", Quiet)
    monkeypatch.setattr(bench_clients, "paced_producer", _never_measure)
    monkeypatch.setattr(bench_clients, "READY_S", 0.05)
    settings = load_settings(overrides={"model.input_size": "2"})
    with pytest.raises(bench_clients.NotConsuming, match="got no partition"):
        bench_clients.bare_pipe_latency(settings, keys=3, width=2, rate=100, seconds=2)
    assert closed == ["consumer"]


def test_latency_counts_the_events_never_predicted_as_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon that predicts 90% of the timed window: the other 10% are not dropped from
    the percentiles but counted as longer than the wait, so p90 on are lower bounds."""
    live = LiveStats()
    daemon = SimpleNamespace(ready=lambda: True, live=live, request_stop=lambda: None)
    idle = threading.Thread(target=lambda: None)
    idle.start()
    monkeypatch.setattr(bench_clients, "start_daemon", lambda settings: (daemon, idle))
    monkeypatch.setattr(bench_clients, "paced_producer", lambda settings: object())
    windows: list[int] = []

    def produce(settings: Any, stream: Any, rate: float, count: int, p: Any = None) -> None:
        done = count if not windows else count * 9 // 10  # the warm-up in full
        windows.append(count)
        live.add_events(count)
        live.add(done, 0, 0, np.full(done, 0.01))

    monkeypatch.setattr(bench_clients, "paced_produce", produce)
    monkeypatch.setattr(bench_clients, "DRAIN_S", 0.05)
    settings = load_settings(overrides={"model.input_size": "2"})
    timed = bench_clients.latency(settings, keys=3, width=2, rate=100, seconds=2)
    assert (timed.offered, timed.observed, timed.missing) == (200, 180, 20)
    assert timed.waited_s >= 0.05
    ms, at_least = bench_clients.percentiles(timed)
    assert ms["p50"] == pytest.approx(10.0)  # 90% of the events took 10 ms: exact
    assert ms["p99"] == ms["max"] == pytest.approx(timed.waited_s * 1000)
    assert at_least == ["p90", "p99", "max"]  # p90 interpolates towards a missing event


def test_percentiles_with_and_without_missing_events() -> None:
    every = Timed(np.linspace(0.001, 0.1, 100), offered=100, observed=100, waited_s=1.0)
    ms, at_least = bench_clients.percentiles(every)
    assert at_least == [] and ms["max"] == pytest.approx(100.0)
    assert ms["p99"] == pytest.approx(float(np.percentile(every.seconds * 1000, 99)))
    # 2% missing: p99 rests on them, p50 and p90 are the observed events' own.
    some = Timed(np.full(98, 0.02), offered=100, observed=98, waited_s=30.0)
    ms, at_least = bench_clients.percentiles(some)
    assert (ms["p50"], ms["p90"]) == (pytest.approx(20.0), pytest.approx(20.0))
    assert ms["p99"] == ms["max"] == pytest.approx(30_000.0) and at_least == ["p99", "max"]
    # A sample of 100 standing for 10,000 observed events, 100 missing: one in the sample.
    sampled = Timed(np.full(100, 0.02), offered=10_100, observed=10_000, waited_s=30.0)
    assert bench_clients.percentiles(sampled)[1] == ["max"]
    none = Timed(np.empty(0), offered=50, observed=0, waited_s=30.0)
    ms, at_least = bench_clients.percentiles(none)
    assert ms["p50"] == pytest.approx(30_000.0) and at_least == ["p50", "p90", "p99", "max"]
    assert bench_clients.percentiles(Timed(np.empty(0), 0, 0, 30.0)) == ({}, [])


def test_bench_e2e_shows_missing_events_and_lower_bounds() -> None:
    timed = Timed(np.full(98, 0.02), offered=100, observed=98, waited_s=30.0)
    result = E2EResult(latency=[Latency.of("confluent", 50.0, timed)])
    [line] = [x for x in result.lines() if x.startswith("event latency")]
    assert "(100 events, 2 not acknowledged within 30s, counted as more;" in line
    assert "p50 20.0 ms" in line and "p99 >=30000.0 ms" in line and "max >=30000.0 ms" in line
    row = result.as_dict()["latency"]["confluent"]
    json.dumps(row)
    assert (row["events"], row["acknowledged"], row["waited_s"]) == (100, 98, 30.0)
    assert row["p99"] == 30_000.0 and row["at_least"] == ["p99", "max"]


def _fake_daemon(monkeypatch: pytest.MonkeyPatch, live: LiveStats) -> None:
    daemon = SimpleNamespace(ready=lambda: True, live=live, request_stop=lambda: None)
    idle = threading.Thread(target=lambda: None)
    idle.start()
    monkeypatch.setattr(bench_clients, "start_daemon", lambda settings: (daemon, idle))
    monkeypatch.setattr(bench_clients, "paced_producer", lambda settings: object())


@pytest.mark.parametrize(("last_ack", "kept_up"), [(2.0, True), (3.0, False)])
def test_latency_says_whether_the_daemon_kept_up_with_the_offered_rate(
    monkeypatch: pytest.MonkeyPatch, last_ack: float, kept_up: bool
) -> None:
    """200 events offered over 2 s: answered in four tickets from t=10 s to t=10 s +
    ``last_ack``. Over 2 s the daemon kept up (a steady queue: both ends shifted); over
    3 s its latency grew by a second across the window: 67 events/s of 100 offered."""
    now = [0.0]
    live = LiveStats(clock=lambda: now[0])
    _fake_daemon(monkeypatch, live)
    calls: list[int] = []

    def produce(settings: Any, stream: Any, rate: float, count: int, p: Any = None) -> None:
        live.add_events(count)
        if not calls:  # the warm-up, in one ticket
            live.add(count, 0, 0, np.full(count, 0.01))
        else:
            for i in range(4):
                now[0] = 10.0 + i * last_ack / 3
                live.add(count // 4, 0, 0, np.full(count // 4, 0.05))
        calls.append(count)

    monkeypatch.setattr(bench_clients, "paced_produce", produce)
    settings = load_settings(overrides={"model.input_size": "2"})
    timed = bench_clients.latency(settings, keys=3, width=2, rate=100, seconds=2)
    assert timed.span_s == pytest.approx(last_ack)
    assert timed.achieved == pytest.approx(200 / last_ack)
    row = Latency.of("kafka-python", 100.0, timed)
    assert row.kept_up is kept_up
    [line] = [x for x in E2EResult(latency=[row]).lines() if x.startswith("event latency")]
    verdict = "kept up" if kept_up else "FELL BEHIND"
    assert f"; answered at {200 / last_ack:,.0f} events/s, {verdict}):" in line
    doc = E2EResult(latency=[row]).as_dict()["latency"]["kafka-python"]
    assert doc["kept_up"] is kept_up
    assert doc["achieved_events_per_s"] == pytest.approx(200 / last_ack, abs=0.1)


def test_a_window_with_missing_events_or_one_answer_did_not_keep_up() -> None:
    fast_but_short = Timed(np.full(98, 0.02), offered=100, observed=98, waited_s=30, span_s=0.5)
    assert not Latency.of("confluent", 100.0, fast_but_short).kept_up
    one = Timed(np.full(1, 0.02), offered=1, observed=1, waited_s=0.1, span_s=0.0)
    row = Latency.of("confluent", 100.0, one)
    assert row.achieved_events_per_s is None and not row.kept_up
    assert "answered at ? events/s, FELL BEHIND" in row.text()


def test_the_bare_pipe_reports_the_span_of_its_acknowledgements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fake librdkafka clients: the pipe copies every record; each copy is acknowledged
    1 s of a fake clock after the previous one."""
    confluent_kafka = pytest.importorskip("confluent_kafka")
    clock = itertools.count(100.0, 1.0)

    def monotonic() -> float:  # a second per reading on the pipe's thread; still elsewhere
        return next(clock) if threading.current_thread().name == "bare-pipe" else 0.0

    fake_time = SimpleNamespace(monotonic=monotonic, time=time.time, sleep=time.sleep)
    monkeypatch.setattr(bench_clients, "time", fake_time)
    produced: list[bytes] = []

    class Msg:
        def __init__(self, value: bytes) -> None:
            self._value = value

        def value(self) -> bytes:
            return self._value

        def key(self) -> bytes:
            return b"k"

        def error(self) -> None:
            return None

    class Consumer(_FakeConsumer):
        assigned = (0,)

        def consume(self, n: int, timeout: float) -> list:
            out = [Msg(v) for v in produced]
            produced.clear()
            return out

    class Producer:
        def __init__(self, conf: dict) -> None:
            self.pending: list[tuple[Msg, Any]] = []

        def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
            self.pending.append((Msg(value), on_delivery))

        def poll(self, timeout: float) -> None:
            pending, self.pending = self.pending, []
            for msg, done in pending:
                done(None, msg)

        def flush(self, timeout: float) -> int:
            self.poll(0)
            return 0

    def paced(settings: Any, stream: Any, rate: float, count: int, p: Any = None) -> None:
        produced.extend(orjson.dumps({"ts": time.time()}) for _ in range(count))

    monkeypatch.setattr(confluent_kafka, "Consumer", Consumer)
    monkeypatch.setattr(confluent_kafka, "Producer", Producer)
    monkeypatch.setattr(bench_clients, "paced_producer", lambda settings: object())
    monkeypatch.setattr(bench_clients, "paced_produce", paced)
    monkeypatch.setattr(bench_clients, "DRAIN_S", 1e9)
    settings = load_settings(overrides={"model.input_size": "2"})
    timed = bench_clients.bare_pipe_latency(settings, keys=3, width=2, rate=5, seconds=2)
    assert (timed.offered, timed.observed) == (10, 10)
    assert timed.span_s == 9.0  # ten acknowledgements, a clock second apart
    assert len(timed.after_poll) == 10  # each copy's poll to acknowledgement, within its latency
    assert np.all((timed.after_poll >= 0) & (timed.after_poll <= timed.seconds))


def test_the_poll_to_ack_share_counts_the_acknowledged_events_only() -> None:
    """Missing events have no poll-to-ack time: the share's percentiles are over the
    answered ones (its own row in the text and the JSON), not padded with the wait."""
    timed = Timed(
        np.full(98, 0.04),
        offered=100,
        observed=98,
        waited_s=30.0,
        after_poll=np.r_[np.full(97, 0.01), 0.03],
    )
    row = Latency.of("kafka-python", 50.0, timed)
    assert row.after_poll_ms == pytest.approx({"p50": 10.0, "p99": 10.6})  # 96.03rd of 98
    assert "poll to ack p50 10.0 / p99 10.6 ms" in row.text()
    doc = E2EResult(latency=[row]).as_dict()["latency"]["kafka-python"]
    assert doc["poll_to_ack_ms"] == {"p50": 10.0, "p99": 10.6}
    unknown = Latency.of("kafka-python", 50.0, Timed(np.full(3, 0.04), 3, 3, 1.0))
    assert unknown.after_poll_ms == {} and "poll to ack" not in unknown.text()
