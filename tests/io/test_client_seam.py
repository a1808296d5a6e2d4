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


class _ErrMsg(_Msg):
    """An error event as ``consume()`` hands it out: a message whose ``error()`` is set
    (partition and offset mean nothing then)."""

    def __init__(self, err: Any) -> None:
        super().__init__(-1, -1001)
        self.err = err

    def error(self) -> Any:
        return self.err


def test_drop_errors_keeps_records_drops_retriable_errors_and_raises_fatal_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from confluent_kafka import KafkaError, KafkaException

    eof = KafkaError(KafkaError._PARTITION_EOF)
    down = KafkaError(KafkaError._TRANSPORT, "broker down", retriable=True)
    fenced = KafkaError(KafkaError._FATAL, "fenced by a newer instance", fatal=True)
    a, b = _Msg(0, 4), _Msg(1, 9)
    source = _source([])
    with caplog.at_level("WARNING", logger="streamlstm.io.confluent_source"):
        kept = source._drop_errors([_ErrMsg(eof), a, _ErrMsg(down), b])
    assert kept == [a, b]  # the records, same objects, same order
    assert "No more messages" in caplog.text and "broker down" in caplog.text
    with pytest.raises(KafkaException) as info:
        source._drop_errors([a, _ErrMsg(fenced), b])
    assert info.value.args[0] is fenced


def test_a_poll_of_errors_only_is_empty_and_errors_move_no_offset() -> None:
    from confluent_kafka import KafkaError

    down = _ErrMsg(KafkaError(KafkaError._TRANSPORT, "broker down", retriable=True))
    source = _source([[down], [_Msg(0, 3), down, _Msg(0, 4)]])
    assert source.poll(0) is None
    polled = source.poll(0)
    assert polled.offset.tolist() == [3, 4] and polled.ends == {TopicPartition("in", 0): 5}
    assert len(polled.records) == 2
