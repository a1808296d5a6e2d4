"""A :class:`~streamlstm.io.client.PartitionReader` on librdkafka.

librdkafka says itself when a fetch reached a partition's high watermark: with
``enable.partition.eof`` it hands out a ``_PARTITION_EOF`` event, also for an empty
partition, and again after new records were read to the end. A partition is at its end
when its newest event is that one, so :func:`~streamlstm.io.reader.read_to_end` needs no
``ListOffsets`` (which some brokers under-count) on this client either.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from streamlstm.io.client import Record
from streamlstm.io.confluent_config import reader_config

if TYPE_CHECKING:
    from streamlstm.config import KafkaSettings

log = logging.getLogger(__name__)

BATCH = 10_000  # records taken per consume() call


def consume(consumer: Any, n: int, timeout_s: float) -> list[Any]:
    """Up to ``n`` messages: those queued now, else the first to come within
    ``timeout_s`` and whatever came with it (``consume(n, t)`` would wait for all ``n``)."""
    msgs: list[Any] = consumer.consume(n, 0)
    if msgs or timeout_s <= 0:
        return msgs
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(n - 1, 0)] if n > 1 else [first]


class ConfluentReader:
    """Reads assigned partitions outside any group; knows which reached their end."""

    def __init__(
        self, kafka: KafkaSettings, max_fetch_bytes: int = 8 << 20, fetch_wait_ms: int = 10
    ) -> None:
        from confluent_kafka import Consumer

        self.consumer = Consumer(reader_config(kafka, max_fetch_bytes, fetch_wait_ms))
        self._eof: dict[int, bool] = {}
        self._topic = ""

    def partitions(self, topic: str) -> set[int] | None:
        meta = self.consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return None
        return set(meta.partitions)

    def assign(self, topic: str, starts: dict[int, int | None]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        self._topic = topic
        self._eof = dict.fromkeys(starts, False)
        self.consumer.assign(
            [
                TopicPartition(topic, p, OFFSET_BEGINNING if start is None else start)
                for p, start in sorted(starts.items())
            ]
        )

    def poll(self, timeout_s: float) -> list[Record]:
        msgs = consume(self.consumer, BATCH, timeout_s)
        out = []
        eof = self._eof
        m: Any
        for m in msgs:
            err = m.error()
            if err is None:
                eof[m.partition()] = False
                out.append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), None))
            elif err.code() == _partition_eof():
                if m.partition() in eof:
                    eof[m.partition()] = True
            elif err.fatal():
                from confluent_kafka import KafkaException

                raise KafkaException(err)
            else:
                log.warning("reading %s: %s", self._topic, err)
        return out

    def at_end(self) -> bool:
        return all(self._eof.values())

    def bounds(self, topic: str, partition: int) -> tuple[int, int] | None:
        from confluent_kafka import TopicPartition

        try:
            got = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        except Exception as exc:
            log.warning("offsets of %s[%d]: %s", topic, partition, exc)
            return None
        return None if got is None else (int(got[0]), int(got[1]))

    def close(self) -> None:
        self.consumer.close()


def _partition_eof() -> Any:
    from confluent_kafka import KafkaError

    return KafkaError._PARTITION_EOF
