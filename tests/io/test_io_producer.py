"""The producer process: partitions as Kafka's default partitioner, reports, its lifetime."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from conftest import KafkaTools, wait_for
from kafka.partitioner.default import DefaultPartitioner

from streamlstm.io.offsets import Ticket
from streamlstm.io.producer import PartitionCache
from streamlstm.io.sink import Sink, SinkError


class _Cluster:
    """The slice of kafka-python's ClusterMetadata the default partitioner reads."""

    def __init__(self, topic: str, partitions: int) -> None:
        self.topic, self.parts = topic, set(range(partitions))

    def topics(self) -> set[str]:
        return {self.topic}

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self.parts

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self.parts


def test_partition_cache_equals_the_default_partitioner() -> None:
    keys = [f"key-{i}".encode() for i in range(2000)] + [b"", "pümpe-17".encode(), b"\xff" * 9]
    cache = PartitionCache()
    default = DefaultPartitioner()
    for n in (1, 3, 7, 12, 3):  # a partition count change drops the topic's cache
        cluster = _Cluster("out", n)
        expected = [default.partition("out", k, k, None, None, cluster) for k in keys]
        assert cache.partitions("out", keys, range(n)) == expected
        assert cache.partitions("out", keys, range(n)) == expected  # cached
    assert cache.partitions("out", [None, b"a"], {0, 1}) == [None, _p(b"a", 2)]


def _p(key: bytes, n: int) -> int:
    return DefaultPartitioner().partition("t", key, key, None, None, _Cluster("t", n))


def _settings(tools: KafkaTools, prefix: str, **extra: str):
    return tools.settings(prefix, **extra)


@pytest.mark.integration
def test_reports_resolve_tickets_and_records_land_on_the_default_partition(
    kafka_tools: KafkaTools, client: str
) -> None:
    prefix = f"sink-{uuid.uuid4().hex[:8]}"
    kafka_tools.create({f"{prefix}-out": 3, f"{prefix}-dlq": 1})
    sink = Sink(_settings(kafka_tools, prefix, **{"kafka.client": client}))
    try:
        keys = [f"k{i}".encode() for i in range(50)]
        tickets = [Ticket({}, polled_at=0.0) for _ in range(3)]
        for t in tickets:
            sink.send(t, [(f"{prefix}-out", keys, [b"v"] * len(keys), None)])
        sink.send_records(tickets[2], [(f"{prefix}-dlq", None, b"bad", [("why", b"x")])])
        assert tickets[2].outstanding == 2 and tickets[2].pending == 51
        assert sink.flush(30)
        assert all(t.done() and t.pending == 0 and not t.failed for t in tickets)
    finally:
        sink.close(5)
    assert sink.proc.poll() == 0
    out = kafka_tools.read(f"{prefix}-out", 150)
    assert len(out) == 150
    assert all(r.partition == _p(r.key, 3) for r in out)
    (dead,) = kafka_tools.read(f"{prefix}-dlq", 1)
    assert dead.value == b"bad" and dead.headers == [("why", b"x")]


@pytest.mark.integration
def test_failed_records_come_back_to_their_ticket(kafka_tools: KafkaTools, client: str) -> None:
    prefix = f"sink-{uuid.uuid4().hex[:8]}"
    kafka_tools.create({f"{prefix}-out": 1})
    sink = Sink(_settings(kafka_tools, prefix, **{"kafka.client": client}))
    try:
        ticket = Ticket({}, polled_at=0.0)
        huge = b"x" * (3 << 20)  # over max_request_size: refused by the producer
        sink.send(ticket, [(f"{prefix}-out", [b"a", b"b"], [b"ok", huge], None)])
        wait_for(lambda: sink.poll_acks() or ticket.done(), 30, what="the report")
        assert ticket.pending == 0
        assert ticket.failed == [(f"{prefix}-out", b"b", huge, None)]
        too_large = {"kafka-python": "MessageSizeTooLarge", "confluent": "MSG_SIZE_TOO_LARGE"}
        assert too_large[client] in ticket.errors[0] and not ticket.retriable
    finally:
        sink.close(5)


def test_start_failure_is_an_error_and_leaves_no_child() -> None:
    from streamlstm.config import load_settings

    settings = load_settings(
        overrides={"kafka.bootstrap_servers": "127.0.0.1:1", "training.enabled": "false"}
    )
    started = time.monotonic()
    with pytest.raises(SinkError):
        Sink(settings, bootstrap_timeout_ms=500)
    assert time.monotonic() - started < 20


_PARENT = """
import sys, time
from streamlstm.config import load_settings
from streamlstm.io.sink import Sink
s = load_settings(overrides={"kafka.bootstrap_servers": sys.argv[1], "training.enabled": "false"})
sink = Sink(s)
print(sink.proc.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_child_exits_when_the_parent_dies(kafka_tools: KafkaTools) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, kafka_tools.bootstrap], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not _alive(child), 10, what="the producer process to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.integration
def test_explicit_partitions_and_tombstones_land_where_told(
    kafka_tools: KafkaTools, client: str
) -> None:
    """The state changelog's groups: each record to the partition given, None as a tombstone;
    read back through :class:`~streamlstm.io.changelog.ChangelogReader` (last record per
    key wins, a tombstone deletes, on a log no compaction touched)."""
    from streamlstm.io.changelog import ChangelogReader, groups
    from streamlstm.io.client import make_reader

    prefix = f"sink-{uuid.uuid4().hex[:8]}"
    topic = f"{prefix}-in.state"
    kafka_tools.create({topic: 3})
    settings = _settings(kafka_tools, prefix, **{"kafka.client": client})
    sink = Sink(settings)
    try:
        ticket = Ticket({}, polled_at=0.0)
        sink.send(
            ticket, groups(topic, ["a", "b", "a", "c"], [2, 2, 2, 0], [b"1", b"2", b"3", b"4"])
        )
        sink.send(ticket, groups(topic, ["b"], [2], [None]))
        assert sink.flush(30) and ticket.done() and not ticket.failed
    finally:
        sink.close(5)
    reader = ChangelogReader(topic, make_reader(settings.kafka))
    try:
        two = reader.read(2, timeout_s=30)
        assert dict(zip(two.keys, two.values, strict=True)) == {"a": b"3"}
        assert two.records == 4 and two.end == 4
        assert reader.read(0, timeout_s=30).keys == ["c"]
        empty = reader.read(1, timeout_s=30)
        assert empty.keys == [] and empty.records == 0 and empty.end == 0
    finally:
        reader.close()
