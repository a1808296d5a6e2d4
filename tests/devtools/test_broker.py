"""The embedded broker: start-up, a real produce/consume round trip, topic creation, stop."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from streamlstm.devtools import tansu
from streamlstm.devtools.broker import BrokerError, EmbeddedBroker, find_tansu
from streamlstm.io.admin import create_topics


def _tansu_available() -> bool:
    try:
        find_tansu()
    except BrokerError:
        return False
    return True


needs_tansu = pytest.mark.skipif(not _tansu_available(), reason="tansu binary not installed")


def _partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(topics)}
    finally:
        admin.close()


@pytest.mark.integration
def test_produce_consume_roundtrip(kafka_bootstrap: str, unique_topic: str) -> None:
    topic = f"{unique_topic}-roundtrip"
    create_topics(kafka_bootstrap, {topic: 3})
    assert _partition_counts(kafka_bootstrap, [topic]) == {topic: 3}

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    sent = []
    for i in range(100):
        key, value = f"k{i % 20}".encode(), f"{i}".encode()
        producer.send(topic, key=key, value=value)
        sent.append((key, value))
    producer.flush(timeout=30)
    producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    got = []
    deadline = time.monotonic() + 60
    try:
        while len(got) < 100 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend(records)
        highwater = {
            tp.partition: consumer.highwater(tp)
            for tp in (TopicPartition(topic, p) for p in range(3))
        }
    finally:
        consumer.close()

    assert len(got) == 100
    assert sorted((r.key, r.value) for r in got) == sorted(sent)
    assert {r.partition for r in got} == {0, 1, 2}
    assert sum(highwater.values()) == 100
    # Within a partition, offsets ascend and each key keeps its send order.
    by_partition: dict[int, list] = {}
    for r in got:
        by_partition.setdefault(r.partition, []).append(r)
    for records in by_partition.values():
        offsets = [r.offset for r in records]
        assert offsets == sorted(offsets)
    for k in range(20):
        seq = [int(r.value) for r in got if r.key == f"k{k}".encode()]
        assert seq == sorted(seq)


@pytest.mark.integration
def test_create_topics_is_idempotent(kafka_bootstrap: str, unique_topic: str) -> None:
    topics = {f"{unique_topic}-a": 3, f"{unique_topic}-b": 1}
    create_topics(kafka_bootstrap, topics)
    create_topics(kafka_bootstrap, topics)  # existing topics are not an error
    create_topics(kafka_bootstrap, {f"{unique_topic}-a": 3, f"{unique_topic}-c": 2})
    want = {**topics, f"{unique_topic}-c": 2}
    assert _partition_counts(kafka_bootstrap, list(want)) == want


@pytest.mark.integration
@needs_tansu
def test_embedded_broker_start_and_stop() -> None:
    with EmbeddedBroker() as broker:
        host, port = broker.bootstrap.split(":")
        assert host == "127.0.0.1"
        assert broker.running
        pid = broker.pid
        assert pid is not None
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        admin.list_topics()
        admin.close()
    assert not broker.running
    assert broker.returncode is not None
    with pytest.raises(ChildProcessError):  # already reaped: no zombie left behind
        os.waitpid(pid, os.WNOHANG)
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=1):
        pass


def test_stop_escalates_to_kill() -> None:
    # A process that ignores SIGTERM is killed after the timeout, and reaped.
    # The shell says "ready" once SIGTERM is ignored (the ignore survives the exec).
    script = 'trap "" TERM; echo ready; exec sleep 30'
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    t0 = time.monotonic()
    tansu.stop_process(proc, timeout=0.5)
    assert proc.returncode is not None and proc.returncode < 0
    assert time.monotonic() - t0 < 5
    with pytest.raises(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)
    proc.stdout.close()


def test_start_failure_reports_broker_output(tmp_path: Path) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    broker = EmbeddedBroker(binary=fake, startup_timeout=10)
    with pytest.raises(BrokerError, match="boom: cannot start") as info:
        broker.start()
    assert "code 3" in str(info.value)
    assert not broker.running


def test_missing_binary_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tansu.TANSU_BIN_ENV, raising=False)
    monkeypatch.setattr(tansu.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(tansu.shutil, "which", lambda name: None)
    with pytest.raises(BrokerError, match=r"streamlstm\[broker\]"):
        find_tansu()
