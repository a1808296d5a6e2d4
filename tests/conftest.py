"""Shared fixtures: a Kafka-protocol broker for integration tests, unique topic names."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


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


def daemon_overrides(prefix: str, metrics_port: int = 0) -> dict[str, str]:
    """Small, fast daemon settings on topics ``<prefix>-in/-out/-dlq`` (no training)."""
    return {
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

    def read(self, topic: str, expect: int, timeout: float = 60.0, settle: float = 0.0) -> list:
        """Every record of ``topic`` (all partitions), once ``expect`` are there.

        ``settle`` keeps reading that many seconds more, to catch records beyond
        ``expect`` (duplicates).
        """
        import time

        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        try:
            deadline = time.monotonic() + timeout
            parts = None
            while not parts and time.monotonic() < deadline:
                parts = consumer.partitions_for_topic(topic)
                if not parts:
                    time.sleep(0.2)
            tps = [TopicPartition(topic, p) for p in sorted(parts or [])]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            records: list = []
            settle_until = None
            while time.monotonic() < deadline:
                for recs in consumer.poll(timeout_ms=200).values():
                    records.extend(recs)
                if len(records) >= expect:
                    if settle_until is None:
                        settle_until = time.monotonic() + settle
                    if time.monotonic() >= settle_until:
                        break
            return sorted(records, key=lambda r: (r.partition, r.offset))
        finally:
            consumer.close(autocommit=False)

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
