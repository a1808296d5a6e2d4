"""Issue 3 against a real broker: a group rebalance under load, and a broker that goes away.

1. Daemon A consumes a 4-partition topic while events keep flowing; daemon B joins the
   group, then A stops cleanly and B takes over every partition. Each daemon writes to
   its own output topic (same group, same input), so every prediction can be
   attributed: nothing is lost, each daemon's predictions of a key follow event order,
   and no event is predicted twice (A flushes and commits on revoke and on stop).
2. A daemon's broker stops mid-run: the daemon stays alive, ``/readyz`` turns 503;
   a broker comes back on the same port and the daemon resumes on its own.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import orjson
import pytest
from conftest import KafkaTools, http_get, wait_for
from kafka import KafkaProducer, TopicPartition

from streamlstm.daemon import Daemon

pytestmark = pytest.mark.integration

PARTITIONS = 4
KEYS = 12  # key k always goes to partition k % PARTITIONS: per-key order is kept
TICK_SECONDS = 0.02  # one event per key each tick: ~600 events/s


class _RecordingDaemon(Daemon):
    """A daemon that remembers every offset commit it saw succeed (any thread)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commits: list[dict[TopicPartition, int]] = []
        committed = self.delivery.committed

        def recording(offsets: dict[TopicPartition, int]) -> None:
            self.commits.append(dict(offsets))
            committed(offsets)

        self.delivery.committed = recording  # type: ignore[method-assign]

    def committed_max(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for offsets in list(self.commits):
            for tp, off in offsets.items():
                out[tp.partition] = max(out.get(tp.partition, 0), off)
        return out


def _assigned(daemon: Daemon) -> frozenset[int]:
    source = daemon.source
    if source is None:
        return frozenset()
    for _ in range(5):  # the set is changed in place by kafka's I/O thread
        try:
            return frozenset(tp.partition for tp in set(source.assigned))
        except RuntimeError:
            continue
    return frozenset()


@dataclass
class _Flow:
    """Events produced in a background thread until stopped: (key, ts) in send order."""

    topic: str
    bootstrap: str
    sent: list[tuple[str, float]] = field(default_factory=list)
    error: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> _Flow:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        try:
            step = 0
            while not self._stop.is_set():
                ts = 1000.0 + step
                for k in range(KEYS):
                    key = f"k{k:02d}"
                    value = orjson.dumps({"key": key, "ts": ts, "values": [k, step % 7]})
                    producer.send(
                        self.topic, key=key.encode(), value=value, partition=k % PARTITIONS
                    )
                    self.sent.append((key, ts))
                step += 1
                self._stop.wait(TICK_SECONDS)
            producer.flush(timeout=30)
        except BaseException as exc:  # reported by stop()
            self.error.append(exc)
        finally:
            producer.close(timeout=5)

    def halt(self) -> None:
        self._stop.set()

    def stop(self) -> list[tuple[str, float]]:
        self.halt()
        assert self._thread is not None
        self._thread.join(timeout=40)
        assert not self._thread.is_alive(), "the test producer did not stop"
        assert not self.error, f"the test producer failed: {self.error[0]!r}"
        return list(self.sent)


def test_rebalance_hands_partitions_over_without_loss_or_repeats(
    kafka_tools: KafkaTools, client: str
) -> None:
    started = time.monotonic()
    tools = kafka_tools
    prefix = f"rb-{uuid.uuid4().hex[:10]}"
    tools.create(
        {
            f"{prefix}-in": PARTITIONS,
            f"{prefix}-out-a": PARTITIONS,
            f"{prefix}-out-b": PARTITIONS,
            f"{prefix}-dlq": PARTITIONS,
        }
    )

    def settings(out: str):
        # Periodic commits are rare: only the commits on revoke and on stop can keep B
        # from predicting again what A did.
        return tools.settings(
            prefix,
            **{
                "kafka.output_topic": f"{prefix}-{out}",
                "kafka.partitions": str(PARTITIONS),
                "kafka.commit_interval_ms": "30000",
                "kafka.client": client,
            },
        )

    a, b = _RecordingDaemon(settings("out-a")), _RecordingDaemon(settings("out-b"))
    threads = {d: threading.Thread(target=d.run, daemon=True) for d in (a, b)}
    samples: list[tuple[frozenset[int], frozenset[int]]] = []
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(0.02):
            samples.append((_assigned(a), _assigned(b)))

    watcher = threading.Thread(target=watch, daemon=True)
    flow = _Flow(f"{prefix}-in", tools.bootstrap)
    try:
        watcher.start()
        threads[a].start()
        wait_for(a.ready, 30, what="daemon A ready")
        assert _assigned(a) == set(range(PARTITIONS))
        flow.start()
        wait_for(lambda: a.live.predictions >= 300, 20, what="A to predict while alone")

        threads[b].start()

        def shared() -> bool:
            pa, pb = _assigned(a), _assigned(b)
            return bool(pa and pb and a.ready() and b.ready())

        wait_for(shared, 30, what="A and B to share the partitions")
        mark = b.live.predictions
        wait_for(lambda: b.live.predictions >= mark + 300, 20, what="B to predict beside A")

        a.request_stop()
        threads[a].join(timeout=15)
        assert not threads[a].is_alive(), "daemon A did not stop within 15s"
        assert a.exit_code == 0

        wait_for(
            lambda: _assigned(b) == set(range(PARTITIONS)) and b.ready(),
            30,
            what="B to take every partition over",
        )
        mark = b.live.predictions
        wait_for(lambda: b.live.predictions >= mark + 300, 20, what="B to predict alone")
        sent = flow.stop()

        from_a = tools.read(f"{prefix}-out-a", a.live.predictions, timeout=20)
        inputs = tools.read(f"{prefix}-in", len(sent), timeout=20)
        unique_a = {(orjson.loads(r.value)["key"], orjson.loads(r.value)["ts"]) for r in from_a}
        # Up to 20 s for B to catch up; what is missing then is reported below.
        deadline = time.monotonic() + 20
        while b.live.predictions < len(set(sent) - unique_a) and time.monotonic() < deadline:
            time.sleep(0.1)
        from_b = tools.read(f"{prefix}-out-b", b.live.predictions, timeout=20)
    finally:
        flow.halt()
        for d in (a, b):
            d.request_stop()
        for t in threads.values():
            if t.ident is not None:
                t.join(timeout=15)
        watching.set()
        watcher.join(timeout=5)

    # Both daemons owned partitions side by side, each a disjoint share of all of them.
    together = {(pa, pb) for pa, pb in samples if pa and pb}
    assert together, "A and B never owned partitions at the same time"
    for pa, pb in together:
        assert not pa & pb, f"a partition owned twice: A {sorted(pa)}, B {sorted(pb)}"

    where = {}
    for r in inputs:
        doc = orjson.loads(r.value)
        where[(doc["key"], doc["ts"])] = (r.partition, r.offset)
    assert len(where) == len(sent)

    def events(records: list) -> list[tuple[str, float]]:
        out = []
        for r in records:
            doc = orjson.loads(r.value)
            assert r.key == doc["key"].encode()
            out.append((doc["key"], doc["ts"]))
        return out

    seen_a, seen_b = events(from_a), events(from_b)
    assert {where[e][0] for e in seen_a} == set(range(PARTITIONS))
    assert {where[e][0] for e in seen_b} == set(range(PARTITIONS))

    # No loss: every produced event was predicted by A or B.
    missing = set(sent) - set(seen_a) - set(seen_b)
    assert not missing, f"{len(missing)} events never predicted, e.g. {sorted(missing)[:5]}"

    # Within each daemon's output, a key's predictions follow its events (no repeats).
    for name, seen in (("A", seen_a), ("B", seen_b)):
        by_key: dict[str, list[float]] = defaultdict(list)
        for key, ts in seen:
            by_key[key].append(ts)
        for key, ts in by_key.items():
            assert ts == sorted(set(ts)), f"{name}: predictions of {key} out of order"

    # Nothing A committed is predicted again by B, and with commits on revoke and on
    # stop nothing at all is predicted twice.
    committed = a.committed_max()
    assert committed, "A never committed"
    again = [e for e in seen_b if where[e][1] < committed.get(where[e][0], 0)]
    assert not again, f"B predicted {len(again)} events A had committed, e.g. {again[:3]}"
    twice = set(seen_a) & set(seen_b)
    assert not twice, f"{len(twice)} events predicted by both A and B"
    print(
        f"rebalance: {len(sent)} events, A {len(seen_a)}, B {len(seen_b)}, "
        f"{time.monotonic() - started:.1f}s"
    )


def _outage_events(step0: int, steps: int) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value): key k on partition k % 2, ``steps`` events per key."""
    out = []
    for step in range(step0, step0 + steps):
        for k in range(4):
            key = f"o{k}"
            value = orjson.dumps({"key": key, "ts": float(step), "values": [k, step]})
            out.append((k % 2, key.encode(), value))
    return out


def _produce(bootstrap: str, topic: str, events: list[tuple[int, bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    try:
        for partition, key, value in events:
            producer.send(topic, key=key, value=value, partition=partition)
        producer.flush(timeout=20)
    finally:
        producer.close(timeout=5)


def test_daemon_survives_a_broker_restart(tmp_path) -> None:
    from streamlstm.devtools.broker import BrokerError, EmbeddedBroker, find_tansu

    try:
        find_tansu()
    except BrokerError as exc:
        pytest.skip(str(exc))
    started = time.monotonic()
    prefix = f"out-{uuid.uuid4().hex[:8]}"
    # No port given: the broker retries on a fresh port if another process takes one.
    broker = EmbeddedBroker(log_path=tmp_path / "tansu-1.log").start()
    port = broker.port
    tools = KafkaTools(broker.bootstrap)
    # acks=1: no idempotent producer. Its producer id lives in the broker, and Tansu's
    # memory storage forgets it; Kafka answers the client's epoch bump (KIP-360) for
    # an unknown id with a new one, Tansu with an error, so acks=all would test Tansu.
    settings = tools.settings(
        prefix, **{"kafka.partitions": "2", "kafka.producer_acks": "1"}
    )  # the daemon creates its topics
    timeout_s = settings.kafka.session_timeout_ms / 1000
    daemon = Daemon(settings)
    thread = threading.Thread(target=daemon.run, daemon=True)
    second = None
    try:
        thread.start()
        wait_for(daemon.ready, 30, what="daemon ready")
        readyz = f"http://127.0.0.1:{daemon.metrics_port}/readyz"
        assert http_get(readyz)[0] == 200
        before = _outage_events(0, 10)  # 20 events per partition
        _produce(broker.bootstrap, f"{prefix}-in", before)
        first = tools.read(f"{prefix}-out", len(before), timeout=20)
        assert len(first) == len(before)

        broker.stop()
        gone = time.monotonic()
        wait_for(
            lambda: http_get(readyz)[0] == 503,
            timeout_s + 6,
            what="/readyz to turn 503 once the broker is gone",
        )
        not_ready_after = time.monotonic() - gone
        time.sleep(1.0)  # the daemon keeps retrying, it does not give up
        assert thread.is_alive() and daemon.exit_code == 0
        assert http_get(readyz)[0] == 503
        assert http_get(f"http://127.0.0.1:{daemon.metrics_port}/healthz")[0] == 200

        # A broker on the same address. Tansu keeps topics in memory: recreate them, as
        # a durable broker would still have them.
        second = EmbeddedBroker(port, log_path=tmp_path / "tansu-2.log").start()
        back = time.monotonic()
        tools.create({f"{prefix}-in": 2, f"{prefix}-out": 2, f"{prefix}-dlq": 2})
        wait_for(lambda: http_get(readyz)[0] == 200, 30, what="/readyz 200 after the restart")
        ready_after = time.monotonic() - back
        # Fewer events per partition than before the outage: a consumer position left
        # over from the old (lost) log is out of range and resets, it cannot skip them.
        after = _outage_events(100, 5)
        _produce(second.bootstrap, f"{prefix}-in", after)
        outputs = tools.read(f"{prefix}-out", len(after), timeout=30)
        assert thread.is_alive()
    finally:
        daemon.request_stop()
        thread.join(timeout=15)
        for b in (broker, second):
            if b is not None:
                b.stop()
    assert not thread.is_alive()
    assert daemon.exit_code == 0
    expected = {(key.decode(), orjson.loads(value)["ts"]) for _, key, value in after}
    predicted = [(orjson.loads(r.value)["key"], orjson.loads(r.value)["ts"]) for r in outputs]
    assert set(predicted) == expected
    print(
        f"broker restart: 503 after {not_ready_after:.1f}s, 200 again after "
        f"{ready_after:.1f}s, {time.monotonic() - started:.1f}s in all"
    )
