"""Shared fixtures: a Kafka-protocol broker for integration tests, unique topic names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from streamlstm.config import Settings, load_settings
from streamlstm.engine import BatchOutput, Engine
from streamlstm.events import EventBatch
from streamlstm.io.client import TopicPartition
from streamlstm.io.source import KafkaPythonSource


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of the test broker.

    ``STREAMLSTM_TEST_BOOTSTRAP`` (e.g. an Apache Kafka cluster) when set, else an
    embedded Tansu broker started for the session.
    """
    external = os.environ.get("STREAMLSTM_TEST_BOOTSTRAP")
    if external:
        yield external
        return
    from streamlstm.devtools.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap


#: The Kafka clients the daemon runs on (``kafka.client``); broker tests that matter run
#: for both (see the README's "Choosing the Kafka client" for which and why).
CLIENTS = ("kafka-python", "confluent")


@pytest.fixture(scope="module", params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    """Each Kafka client in turn. confluent-kafka is in the ``dev`` extra: missing, the
    confluent runs are skipped locally and fail under CI."""
    if request.param == "confluent":
        import importlib.util

        if importlib.util.find_spec("confluent_kafka") is None:
            message = "confluent-kafka is not installed (pip install 'streamlstm[confluent]')"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return request.param


@pytest.fixture
def unique_topic() -> str:
    """A fresh topic name prefix for one test, e.g. ``t-3f9c...``; append suffixes to it."""
    return f"t-{uuid.uuid4().hex[:12]}"


# -- helpers for the daemon's integration tests -----------------------------------


def require_binary(name: str) -> str:
    """Path of an executable the test needs: skip locally when missing, fail under CI.

    CI (``CI`` set) must prove the real path, so a missing binary there is an error.
    """
    import shutil

    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH (Debian: apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def daemon_overrides(
    prefix: str, metrics_port: int = 0, client: str = "kafka-python"
) -> dict[str, str]:
    """Small, fast daemon settings on topics ``<prefix>-in/-out/-dlq`` (no training), on
    the Kafka client ``client``."""
    return {
        "kafka.client": client,
        "kafka.input_topic": f"{prefix}-in",
        "kafka.output_topic": f"{prefix}-out",
        "kafka.dead_letter_topic": f"{prefix}-dlq",
        "kafka.group_id": f"{prefix}-group",
        "kafka.partitions": "2",
        "kafka.session_timeout_ms": "6000",
        "kafka.heartbeat_interval_ms": "1000",
        "kafka.commit_interval_ms": "200",
        "model.input_size": "2",
        "model.hidden_size": "8",
        "model.num_layers": "1",
        "training.enabled": "false",
        "metrics.host": "127.0.0.1",
        "metrics.port": str(metrics_port),
    }


def unit_daemon_settings(topic: str, **overrides: str) -> Settings:
    """An in-process daemon's settings for unit tests with fakes: tiny model, no training,
    no metrics server, input topic ``topic``."""
    return load_settings(
        overrides={
            "model.input_size": "1",
            "model.hidden_size": "4",
            "training.enabled": "false",
            "metrics.enabled": "false",
            "kafka.input_topic": topic,
            **overrides,
        }
    )


class KafkaTools:
    """Produce, read back and run daemons against one broker (integration tests)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def create(self, topics: dict[str, int]) -> None:
        from streamlstm.io.admin import create_topics

        create_topics(self.bootstrap, topics)

    def produce(
        self,
        topic: str,
        messages: list[tuple[bytes | None, bytes]],
        partition: int | None = None,
    ) -> None:
        """Send (key, value) messages in order and wait for all acknowledgements."""
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=2)
        try:
            for key, value in messages:
                producer.send(topic, key=key, value=value, partition=partition)
            producer.flush(timeout=30)
        finally:
            producer.close(timeout=5)

    def read(self, topic: str, expect: int, timeout: float = 60.0) -> list:
        """Every record of ``topic`` (all partitions), once ``expect`` are there.

        Once ``expect`` records are in, it reads on to each partition's high watermark, so
        a repeat already written is caught without waiting for one: stop the writer first
        (or wait until it has acknowledged everything) for an exact count.
        """
        import time

        reader = self.reader(topic, timeout)
        try:
            deadline = time.monotonic() + timeout
            records: list = []
            while len(records) < expect and time.monotonic() < deadline:
                records += reader.poll(0.2)
            if len(records) >= expect:
                read_to_end(reader, records.extend, max(deadline - time.monotonic(), 1.0))
            return sorted(records, key=lambda r: (r.partition, r.offset))
        finally:
            reader.close()

    def reader(self, topic: str, timeout: float = 60.0, partitions: int | None = None):
        """A kafka-python :class:`~streamlstm.io.reader.KafkaPythonReader` on every
        partition of ``topic`` (waits for the topic to exist), from the beginning."""
        from streamlstm.io.reader import KafkaPythonReader

        reader = KafkaPythonReader({"bootstrap_servers": self.bootstrap}, fetch_wait_ms=100)
        if partitions is None:
            partitions = len(
                wait_for(
                    lambda: reader.partitions(topic),
                    timeout,
                    interval=0.2,
                    what=f"topic {topic} to exist",
                )
            )
        reader.assign(topic, dict.fromkeys(range(partitions)))
        return reader

    def settings(self, prefix: str, **overrides: str):
        """Daemon settings on topics ``<prefix>-in/-out/-dlq``, fast group joins, no training."""
        from streamlstm.config import load_settings

        base = daemon_overrides(prefix)
        base["kafka.bootstrap_servers"] = self.bootstrap
        base.update(overrides)
        return load_settings(overrides=base)


@pytest.fixture(scope="session")
def kafka_tools(kafka_bootstrap: str) -> KafkaTools:
    return KafkaTools(kafka_bootstrap)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET (errors as their status, refused as 0)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except OSError:
        return 0, b""


def read_to_end(reader, take, timeout: float) -> None:
    """Hand ``take`` every record until each partition is read to the high watermark of
    its latest fetch (the io helper, failing the test on a timeout)."""
    from streamlstm.io.reader import EndNotReached
    from streamlstm.io.reader import read_to_end as io_read_to_end

    try:
        io_read_to_end(reader, take, max(timeout, 1.0), poll_s=0.1)
    except EndNotReached:
        pytest.fail(f"partitions not read to their end in {timeout:.0f}s")


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def live_exposition() -> str:
    """The text of a real /metrics scrape of a fresh metrics endpoint."""
    from streamlstm.metrics import Metrics, MetricsServer

    server = MetricsServer(Metrics(), "127.0.0.1", 0).start()
    try:
        status, body = http_get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
        assert status == 200, f"/metrics answered {status}"
        return body.decode()
    finally:
        server.stop()


# -- daemons as processes -----------------------------------------------------------


def run_until_predicted(settings: Settings, predictions: int, timeout: float = 60.0):
    """Run a :class:`~streamlstm.daemon.Daemon` in a thread until it has predicted
    ``predictions`` events, then stop it gracefully (flush, commit, changelog) and
    return it for its metrics."""
    import threading

    from streamlstm.daemon import Daemon

    daemon = Daemon(settings)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: daemon.live.predictions >= predictions, timeout, what="predictions")
    finally:
        daemon.request_stop()
        thread.join(timeout=30)
    return daemon


def start_daemon(bootstrap: str, overrides: dict[str, str], log) -> subprocess.Popen:
    """``streamlstm run`` as a child process, JSON log lines appended to ``log`` (a Path)."""
    cmd = [sys.executable, "-m", "streamlstm.cli", "run", "--bootstrap", bootstrap, "--log-json"]
    for name, value in overrides.items():
        cmd += ["--set", f"{name}={value}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``), children before grandchildren."""
    from pathlib import Path

    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def crash_daemon(proc: subprocess.Popen) -> None:
    """SIGKILL a :func:`start_daemon` daemon and its producer process, as a machine crash
    would: nothing is flushed or committed on the way out.

    The producer runs in a session of its own (a Ctrl-C must reach only the daemon), so
    killing the daemon alone (or its process group) would leave it alive to deliver
    what it holds.
    """
    import contextlib
    import signal

    if proc.poll() is not None:
        return
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # freeze all first: none sees another die
        for pid in [proc.pid, *_descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    proc.wait(timeout=10)


_METRICS_LINE = re.compile(rb"metrics on http://[^\s/]+:(\d+)/metrics")


def logged_metrics_port(log, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> int:
    """The port a daemon's metrics server bound (``metrics.port = 0``), read from its log.

    The daemon logs ``metrics on http://HOST:PORT/metrics`` once the server listens, so
    there is no window in which another process can take the port (unlike probing a
    free port first and passing it in). ``log`` must be this daemon's own log file.
    """

    def bound() -> int | None:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the daemon exited with {proc.returncode}: {log.read_text()[-2000:]}")
        found = _METRICS_LINE.search(log.read_bytes()) if log.exists() else None
        return int(found.group(1)) if found else None

    return wait_for(bound, timeout, what="the daemon to log its metrics port")


# -- fakes for in-process daemon tests (no broker) -------------------------------------


class FakeSink:
    """Keeps what the daemon hands over: one ``(ticket, groups)`` per ``send``."""

    output_topic = "out"

    def __init__(self) -> None:
        self.sent: list[tuple[Any, list]] = []

    def send(self, ticket: Any, groups: list) -> None:
        self.sent.append((ticket, groups))


class FakeSource:
    """Stands in for ``make_source``'s consumer: keeps the daemon's callbacks and the
    offsets it commits (``committed``), so a test can drive rebalances by hand."""

    def __init__(self, settings: Settings, **callbacks: Any) -> None:
        self.on_revoke = callbacks.get("on_revoke")
        self.on_assigned = callbacks.get("on_assigned")
        self.on_lost = callbacks.get("on_lost")
        self.on_committed = callbacks.get("on_committed")
        self.assigned: set[TopicPartition] = set()
        self.committed: list[dict[TopicPartition, Any]] = []
        self.consumer = SimpleNamespace(commit_async=self._commit_async)

    to_commit = staticmethod(KafkaPythonSource.to_commit)  # kafka-python's commit shape

    async def _commit_async(self, offsets: dict) -> None:
        self.committed.append(offsets)

    def highwater(self, partition: int) -> int | None:
        return None  # no fetch seen: restored offsets are never second-guessed

    def close(self, timeout_ms: int = 0) -> None:
        pass


POISON = "poison"


class PoisonEngine(Engine):
    """Raises for any batch holding the key ``POISON``: before applying it, or (``after``)
    once the batch is applied, so the guard's event-by-event retry must not apply it twice."""

    after = False
    calls = 0

    def process(
        self,
        batch: EventBatch,
        partition: np.ndarray | None = None,
        offset: np.ndarray | None = None,
    ) -> BatchOutput:
        self.calls += 1
        if POISON in batch.keys and not self.after:
            raise RuntimeError("boom before")
        out = super().process(batch, partition, offset)
        if POISON in batch.keys:
            raise RuntimeError("boom after")
        return out


def poisoned_daemon(after: bool = False, **overrides: str) -> tuple[Any, FakeSink]:
    """An in-process daemon (two-value events, tiny model) on a :class:`PoisonEngine`,
    handing its sends to a :class:`FakeSink`."""
    from streamlstm.daemon import Daemon

    settings = unit_daemon_settings("in", **{"model.input_size": "2", **overrides})
    engine = PoisonEngine.from_settings(settings)
    engine.after = after
    daemon = Daemon(settings, engine=engine)
    sink = FakeSink()
    daemon.delivery.sink = sink
    return daemon, sink


def polled_payloads(
    payloads: list[bytes], keys: list[bytes | None] | None = None, start: int = 0
) -> Any:
    """One poll of ``payloads`` from partition 0 of topic ``in``, offsets from ``start``."""
    from streamlstm.io import Polled

    n = len(payloads)
    keys = keys if keys is not None else [None] * n
    records = [
        SimpleNamespace(key=k, value=p, headers=[], partition=0, offset=start + i)
        for i, (p, k) in enumerate(zip(payloads, keys, strict=True))
    ]
    return Polled(
        topic="in",
        records=records,
        payloads=list(payloads),
        partition=np.zeros(n, np.int64),
        offset=np.arange(start, start + n, dtype=np.int64),
        ends={TopicPartition("in", 0): start + n},
        polled_at=0.0,
    )
