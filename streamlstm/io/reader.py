"""Reading partitions to their end outside any group: the one loop, and kafka-python's reader.

The changelog restore, the model topic's follower and the tools that read a topic back
all need "read these partitions to the end as of now". The end is the high watermark the
fetch responses report, not ``end_offsets()`` (``ListOffsets``), which some brokers
under-count for topics written in batches. :func:`read_to_end` is that loop for any
:class:`~streamlstm.io.client.PartitionReader`; librdkafka's reader is
:class:`~streamlstm.io.confluent_reader.ConfluentReader`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from streamlstm.io.client import PartitionReader

log = logging.getLogger(__name__)


class EndNotReached(TimeoutError):
    """The partitions were not read to their end in time."""


def read_to_end(
    reader: PartitionReader,
    take: Callable[[list[Any]], None],
    timeout_s: float,
    progress: Callable[[], None] | None = None,
    stop: Callable[[], bool] | None = None,
    poll_s: float = 0.02,
) -> None:
    """Poll ``reader`` and hand every batch of records to ``take`` until each assigned
    partition is read to the high watermark of its latest fetch; ``progress()`` after
    every poll. Raises :class:`EndNotReached` after ``timeout_s`` (or when ``stop()``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = reader.poll(poll_s)
        if records:
            take(records)
        if progress is not None:
            progress()
        if reader.at_end():
            return
        if time.monotonic() > deadline or (stop is not None and stop()):
            raise EndNotReached(f"not read to the end in {timeout_s:.0f}s")


class KafkaPythonReader:
    """A :class:`~streamlstm.io.client.PartitionReader` on kafka-python."""

    def __init__(
        self,
        client_kwargs: dict[str, Any],
        max_fetch_bytes: int = 8 << 20,
        fetch_wait_ms: int = 10,
        **extra: Any,
    ) -> None:
        from kafka import KafkaConsumer

        self.consumer = KafkaConsumer(
            **client_kwargs,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=max_fetch_bytes,
            fetch_max_bytes=max(max_fetch_bytes, 64 << 20),
            max_poll_records=100_000,
            fetch_max_wait_ms=fetch_wait_ms,  # an empty or finished partition answers soon
            metrics_enabled=False,
            **extra,
        )
        self._tps: list[Any] = []

    def partitions(self, topic: str) -> set[int] | None:
        return self.consumer.partitions_for_topic(topic)

    def assign(self, topic: str, starts: dict[int, int | None]) -> None:
        from kafka import TopicPartition

        self._tps = [TopicPartition(topic, p) for p in sorted(starts)]
        self.consumer.assign(self._tps)
        for tp in self._tps:
            start = starts[tp.partition]
            if start is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, start)

    def poll(self, timeout_s: float) -> list[Any]:
        got = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        if not got:
            return []
        return [r for tp in sorted(got) for r in got[tp]]

    def at_end(self) -> bool:
        consumer = self.consumer
        for tp in self._tps:  # never waits: an unknown position is "not yet" (poll moves it)
            high = consumer.highwater(tp)
            if high is None:
                return False
            position = consumer.position(tp, timeout_ms=0)
            if position is None or position < high:
                return False
        return True

    def bounds(self, topic: str, partition: int) -> tuple[int, int] | None:
        from kafka import TopicPartition

        tp = TopicPartition(topic, partition)
        try:
            first = self.consumer.beginning_offsets([tp]).get(tp)
            end = self.consumer.end_offsets([tp]).get(tp)
        except Exception as exc:
            log.warning("offsets of %s[%d]: %s", topic, partition, exc)
            return None
        return None if first is None or end is None else (int(first), int(end))

    def close(self) -> None:
        self.consumer.close(autocommit=False)
