"""The client seam without a broker: settings mapped onto librdkafka, the factories, the
confluent source's poll and commit bookkeeping against a fake consumer."""

from __future__ import annotations

import collections
from types import SimpleNamespace
from typing import Any

import pytest

from streamlstm.config import load_settings
from streamlstm.io import TopicPartition
from streamlstm.io.confluent_config import consumer_config, producer_config

pytest.importorskip("confluent_kafka")


def test_every_setting_the_daemon_uses_is_mapped() -> None:
    k = load_settings(
        overrides={
            "kafka.bootstrap_servers": "a:1, b:2",
            "kafka.client": "confluent",
            "kafka.session_timeout_ms": "6000",
            "kafka.heartbeat_interval_ms": "1000",
            "kafka.fetch_max_wait_ms": "7",
            "kafka.compression_type": "lz4",
            "kafka.producer_acks": "1",
            "kafka.producer_linger_ms": "9",
        }
    ).kafka
    c = consumer_config(k)
    assert c["bootstrap.servers"] == "a:1,b:2" and c["group.id"] == "streamlstm"
    assert c["session.timeout.ms"] == 6000 and c["heartbeat.interval.ms"] == 1000
    assert c["fetch.wait.max.ms"] == 7 and c["enable.auto.commit"] is False
    assert c["enable.auto.offset.store"] is False and c["auto.offset.reset"] == "earliest"
    p = producer_config(k, 2_000_000)
    assert p["acks"] == "1" and p["enable.idempotence"] is False and p["linger.ms"] == 9
    assert p["compression.type"] == "lz4" and p["message.max.bytes"] == 2_000_000


class _Msg:
    def __init__(self, partition: int, offset: int, key: bytes | None = b"k") -> None:
        self._p, self._o, self._k = partition, offset, key

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes:
        return b"v%d" % self._o

    def topic(self) -> str:
        return "in"

    def headers(self) -> None:
        return None


class _FakeConsumer:
    def __init__(self, batches: list[list[_Msg]]) -> None:
        self.batches = batches
        self.commits: list[Any] = []

    def consume(self, n: int, timeout: float) -> list[_Msg]:
        return self.batches.pop(0) if self.batches else []

    def poll(self, timeout: float) -> None:
        return None

    def commit(self, offsets: Any, asynchronous: bool) -> None:
        self.commits.append(([(o.partition, o.offset) for o in offsets], asynchronous))


def _source(batches: list[list[_Msg]]) -> Any:
    from streamlstm.io.confluent_source import ConfluentSource

    source = ConfluentSource.__new__(ConfluentSource)
    source.topic, source.max_batch, source.consumer = "in", 100, _FakeConsumer(batches)
    source._commits = collections.deque()
    return source


def test_a_poll_is_in_partition_order_with_the_next_offset_of_each() -> None:
    source = _source([[_Msg(1, 5), _Msg(0, 7), _Msg(1, 6), _Msg(0, 8, key=None)]])
    polled = source.poll(0)
    assert polled.partition.tolist() == [0, 0, 1, 1]
    assert polled.offset.tolist() == [7, 8, 5, 6]
    assert polled.ends == {TopicPartition("in", 0): 9, TopicPartition("in", 1): 7}
    assert polled.payloads == [b"v7", b"v8", b"v5", b"v6"]
    assert polled.records[1].key is None and polled.records[2].offset == 5
    assert source.poll(0) is None


def test_async_commit_results_reach_their_callbacks_in_order() -> None:
    source = _source([])
    got: list[tuple[dict, Any]] = []
    first, second = {TopicPartition("in", 0): 3}, {TopicPartition("in", 0): 9}
    source.commit_async(first, lambda o, e: got.append((o, e)))
    source.commit_async(second, lambda o, e: got.append((o, e)))
    assert source.consumer.commits == [([(0, 3)], True), ([(0, 9)], True)]
    ok = SimpleNamespace(error=None)
    source._on_commit(None, [ok])
    source._on_commit("broker away", [ok])
    assert got[0] == (first, None)
    assert got[1][0] == second and got[1][1] is not None
