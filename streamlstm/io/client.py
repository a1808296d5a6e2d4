"""The seam between the daemon and its Kafka client (``kafka.client``).

The daemon sees only what is here: a :class:`TopicPartition` of its own, a record with
the attributes kafka-python's ``ConsumerRecord`` has, the :class:`Source` and
:class:`PartitionReader` protocols, and factories that build the implementation the
settings name: kafka-python (:mod:`streamlstm.io.source`, :mod:`streamlstm.io.reader`)
or librdkafka through ``confluent-kafka`` (:mod:`streamlstm.io.confluent_source`,
:mod:`streamlstm.io.confluent_reader`). The producer side is chosen inside the producer
process (:mod:`streamlstm.io.producer`).

Our :class:`TopicPartition` is a named tuple like kafka-python's, so the two compare
and hash alike; a client converts its own type at its edge.

>>> tp = TopicPartition("events", 3)
>>> tp == ("events", 3), tp.partition
(True, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from streamlstm.config import KafkaSettings, Settings
    from streamlstm.io.source import Polled


class TopicPartition(NamedTuple):
    """One partition of one topic (hashes and compares as kafka-python's)."""

    topic: str
    partition: int


class Record:
    """A consumed record, client-neutral (the attributes of kafka-python's records)."""

    __slots__ = ("headers", "key", "offset", "partition", "topic", "value")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers or []

    def __repr__(self) -> str:
        return f"Record({self.topic}[{self.partition}]@{self.offset}, key={self.key!r})"


Offsets = dict[TopicPartition, int]
CommitCallback = Callable[[Offsets, BaseException | None], None]


class Source(Protocol):
    """The group consumer on the input topic. Rebalance callbacks (``on_revoke``,
    ``on_assigned``, ``on_lost``) run only while the loop waits in :meth:`poll` or
    :meth:`close`, so no batch is half-processed when they do; they only account and queue.
    """

    topic: str
    assigned: set[TopicPartition]

    def poll(self, timeout_ms: int) -> Polled | None: ...

    def commit_async(self, offsets: Offsets, callback: CommitCallback) -> None:
        """Commit without waiting; ``callback(offsets, error or None)`` runs in a later poll."""

    def commit(self, offsets: Offsets, timeout_ms: int) -> None:
        """Commit and wait (shutdown); raises on failure."""

    def committed(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of ``tp`` (None: none)."""

    def stable(self) -> bool: ...

    def last_heartbeat(self) -> float | None: ...

    def highwater(self, partition: int) -> int | None:
        """The partition's end as the last fetch response gave it (None: no fetch yet)."""

    def lag(self) -> dict[int, int]: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def close(self, timeout_ms: int = 3000) -> None: ...


class PartitionReader(Protocol):
    """A consumer outside any group that reads chosen partitions to their end.

    The end is the high watermark the fetch responses report (never ``ListOffsets``,
    which some brokers under-count): :func:`~streamlstm.io.reader.read_to_end` is the one
    "read to the high watermark" loop, on either client.
    """

    def partitions(self, topic: str) -> set[int] | None:
        """The topic's partitions (None if the broker does not know it)."""

    def assign(self, topic: str, starts: dict[int, int | None]) -> None:
        """Read these partitions (only), each from an offset (None: its beginning)."""

    def poll(self, timeout_s: float) -> list[Any]:
        """Records that arrived (``Record``-like), partition order kept."""

    def at_end(self) -> bool:
        """Every assigned partition read to the high watermark of its latest fetch."""

    def bounds(self, topic: str, partition: int) -> tuple[int, int] | None:
        """First and end offsets, as the broker answers them (None if unknown)."""

    def close(self) -> None: ...


def client_name(kafka: KafkaSettings) -> str:
    return str(getattr(kafka, "client", "kafka-python"))


def make_source(
    settings: Settings,
    on_revoke: Callable[[set[TopicPartition]], Offsets] | None = None,
    on_assigned: Callable[[set[TopicPartition]], None] | None = None,
    on_lost: Callable[[set[TopicPartition]], None] | None = None,
    on_committed: Callable[[Offsets], None] | None = None,
) -> Source:
    """The input consumer of the client ``kafka.client`` names."""
    if client_name(settings.kafka) == "confluent":
        from streamlstm.io.confluent_source import ConfluentSource

        return ConfluentSource(settings, on_revoke, on_assigned, on_lost, on_committed)
    from streamlstm.io.source import KafkaPythonSource

    return KafkaPythonSource(settings, on_revoke, on_assigned, on_lost, on_committed)


def make_reader(
    kafka: KafkaSettings, max_fetch_bytes: int = 8 << 20, fetch_wait_ms: int = 10
) -> PartitionReader:
    """A :class:`PartitionReader` of the client ``kafka.client`` names. A short fetch wait:
    an empty or finished partition answers at once."""
    if client_name(kafka) == "confluent":
        from streamlstm.io.confluent_reader import ConfluentReader

        return ConfluentReader(kafka, max_fetch_bytes, fetch_wait_ms)
    from streamlstm.io.reader import KafkaPythonReader

    return KafkaPythonReader(kafka.client_kwargs(), max_fetch_bytes, fetch_wait_ms)
