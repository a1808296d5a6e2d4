"""The input side on kafka-python: a group consumer that never auto-commits, polled into
flat columns (:class:`Polled`, the same from either client; see :mod:`streamlstm.io.client`).

Offsets are committed by the daemon through :class:`~streamlstm.io.offsets.OffsetTracker`
(never by kafka-python's auto-commit), and the rebalance listener hands revoked, assigned
and lost partitions to the daemon's callbacks. kafka-python 3 runs the listener on its
I/O thread while the main thread waits inside ``poll()`` or ``close()`` (the group join
that calls it is only driven from there), so when it fires no batch is half-processed;
it must only stay short, and it may not call blocking consumer APIs, which is why the
listener is async and awaits ``commit_async``.
"""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, OffsetAndMetadata
from kafka import TopicPartition as KafkaTopicPartition
from kafka.structs import MemberState

from streamlstm.config import Settings
from streamlstm.io.client import CommitCallback, Offsets, TopicPartition

log = logging.getLogger(__name__)
_KEY = operator.attrgetter("key")


@dataclass
class Polled:
    """One poll's records, flattened in partition order (order within a partition kept)."""

    topic: str
    records: Sequence[Any]  # Record-like (key, value, headers, partition, offset)
    payloads: list[bytes | None]
    partition: np.ndarray  # int64 [M]
    offset: np.ndarray  # int64 [M]
    ends: dict[TopicPartition, int]  # next offset per partition
    polled_at: float  # time.time()
    keys: list[bytes | None] | None = None  # the records' keys, when the client has them

    def __len__(self) -> int:
        return len(self.records)

    def key_mismatches(self, source: np.ndarray, keys: Sequence[bytes | None]) -> int:
        """Events whose record was keyed by another key than their own (``keys``, UTF-8).

        ``source[i]`` is the message of event ``i``. Records without a key are not
        counted. C-speed loops only: it runs on every poll.
        """
        if not len(keys):
            return 0
        by_event = self.keys if self.keys is not None else list(map(_KEY, self.records))
        if not np.array_equal(source, np.arange(len(by_event))):  # arrays or rejections
            by_event = list(map(by_event.__getitem__, source.tolist()))
        unkeyed = by_event.count(None)  # None != key counts below: take them out
        return sum(map(operator.ne, by_event, keys)) - unkeyed


class _Listener(AsyncConsumerRebalanceListener):
    """Forwards rebalances to the daemon; commits what the daemon says is safe on revoke."""

    def __init__(self, source: KafkaPythonSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, theirs: set[KafkaTopicPartition]) -> None:
        source = self.source
        revoked = _ours(theirs)
        if not revoked:
            return
        offsets = source.on_revoke(set(revoked)) if source.on_revoke else {}
        if offsets:
            try:
                await source.consumer.commit_async(source.to_commit(offsets))
                if source.on_committed:
                    source.on_committed(offsets)
                log.info("committed %s before giving up partitions", fmt_offsets(offsets))
            except Exception as exc:  # the new owner re-reads from the last commit
                log.warning("commit on revoke failed (%s); those records will be re-read", exc)
        source.assigned -= set(revoked)
        log.info("partitions revoked: %s", fmt_tps(revoked))

    async def on_partitions_assigned(self, theirs: set[KafkaTopicPartition]) -> None:
        source = self.source
        assigned = _ours(theirs)
        source.assigned |= assigned
        log.info("partitions assigned: %s", fmt_tps(assigned) or "none")
        if source.on_assigned:  # the whole set: what is not in it moved to another member
            source.on_assigned(set(source.assigned))

    async def on_partitions_lost(self, theirs: set[KafkaTopicPartition]) -> None:
        # Membership was lost: committing would fail, and the new owner re-reads anyway.
        lost = _ours(theirs)
        if self.source.on_lost:
            self.source.on_lost(set(lost))
        self.source.assigned -= set(lost)
        log.warning("partitions lost (group membership expired): %s", fmt_tps(lost))


def _ours(tps: set[KafkaTopicPartition]) -> set[TopicPartition]:
    return {TopicPartition(tp.topic, tp.partition) for tp in tps}


def fmt_tps(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))


def fmt_offsets(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{off}" for tp, off in sorted(offsets.items()))


def consumer_kwargs(settings: Settings, group_id: str | None = None) -> dict[str, Any]:
    """kafka-python consumer settings of the daemon (also the benchmark's baseline)."""
    k = settings.kafka
    return {
        **k.client_kwargs(),
        "group_id": group_id or k.group_id,
        "enable_auto_commit": False,  # the daemon commits what was acknowledged
        "auto_offset_reset": k.auto_offset_reset,
        "session_timeout_ms": k.session_timeout_ms,
        "heartbeat_interval_ms": k.heartbeat_interval_ms,
        "max_poll_records": settings.engine.max_batch,
        "max_partition_fetch_bytes": k.max_partition_fetch_bytes,
        "fetch_max_wait_ms": k.fetch_max_wait_ms,
        "metrics_enabled": False,
    }


class KafkaPythonSource:
    """A kafka-python consumer on ``kafka.input_topic`` in group ``kafka.group_id``."""

    def __init__(
        self,
        settings: Settings,
        on_revoke: Callable[[set[TopicPartition]], dict[TopicPartition, int]] | None = None,
        on_assigned: Callable[[set[TopicPartition]], None] | None = None,
        on_lost: Callable[[set[TopicPartition]], None] | None = None,
        on_committed: Callable[[dict[TopicPartition, int]], None] | None = None,
        bootstrap_timeout_ms: int = 5000,
    ) -> None:
        k = settings.kafka
        self.topic = k.input_topic
        self.on_revoke = on_revoke
        self.on_assigned = on_assigned
        self.on_lost = on_lost
        self.on_committed = on_committed
        self.assigned: set[TopicPartition] = set()
        self.consumer = KafkaConsumer(
            **consumer_kwargs(settings), bootstrap_timeout_ms=bootstrap_timeout_ms
        )
        self.consumer.subscribe([self.topic], listener=_Listener(self))

    def poll(self, timeout_ms: int) -> Polled | None:
        """Up to ``engine.max_batch`` records, or None when nothing arrived in time."""
        result = self.consumer.poll(timeout_ms=timeout_ms)
        if not result:
            return None
        polled_at = time.time()
        records: list[Any] = []
        parts: list[np.ndarray] = []
        ends: dict[TopicPartition, int] = {}
        for tp, recs in result.items():
            if not recs:
                continue
            records.extend(recs)
            parts.append(np.full(len(recs), tp.partition, dtype=np.int64))
            ends[TopicPartition(tp.topic, tp.partition)] = recs[-1].offset + 1
        if not records:
            return None
        return Polled(
            topic=self.topic,
            records=records,
            payloads=[r.value for r in records],
            partition=np.concatenate(parts),
            offset=np.fromiter((r.offset for r in records), np.int64, len(records)),
            ends=ends,
            polled_at=polled_at,
        )

    @staticmethod
    def to_commit(offsets: Offsets) -> dict[KafkaTopicPartition, OffsetAndMetadata]:
        return {
            KafkaTopicPartition(tp.topic, tp.partition): OffsetAndMetadata(off, "", -1)
            for tp, off in offsets.items()
        }

    def commit_async(self, offsets: Offsets, callback: CommitCallback) -> None:
        """Commit without waiting; ``callback(offsets, error or None)`` runs in a later poll."""
        offsets = dict(offsets)

        def done(_: Any, result: Any) -> None:
            callback(offsets, result if isinstance(result, BaseException) else None)

        self.consumer.commit_async(self.to_commit(offsets), callback=done)

    def commit(self, offsets: dict[TopicPartition, int], timeout_ms: int) -> None:
        """Commit and wait (shutdown); raises on failure."""
        self.consumer.commit(self.to_commit(offsets), timeout_ms=timeout_ms)

    def committed(self, tp: TopicPartition) -> int | None:
        """The group's committed offset of ``tp`` (None: none)."""
        return self.consumer.committed(KafkaTopicPartition(tp.topic, tp.partition))

    def stable(self) -> bool:
        """Joined the group with an assignment (heartbeats flowing)."""
        state = self.consumer.group_metadata().state
        return state == MemberState.STABLE and bool(self.assigned)

    def last_heartbeat(self) -> float | None:
        """Monotonic time of the last heartbeat the group coordinator answered.

        kafka-python keeps no public record of it, and its group state stays "stable"
        while the broker is away, so this reads the heartbeat bookkeeping (None if that
        ever moves).
        """
        heartbeat = getattr(getattr(self.consumer, "_coordinator", None), "heartbeat", None)
        value = getattr(heartbeat, "last_receive", None)
        return value if isinstance(value, float) and value > 0 else None

    def highwater(self, partition: int) -> int | None:
        try:
            return self.consumer.highwater(KafkaTopicPartition(self.topic, partition))
        except Exception:  # not assigned (revoked meanwhile)
            return None

    def lag(self) -> dict[int, int]:
        """Records between the consumer's position and the high watermark, per partition."""
        out = {}
        for ours in list(self.assigned):
            tp = KafkaTopicPartition(ours.topic, ours.partition)
            high = self.highwater(ours.partition)
            try:
                pos = self.consumer.position(tp, timeout_ms=0) if high is not None else None
            except Exception:  # partition revoked meanwhile, or no position yet
                continue
            if high is not None and pos is not None:
                out[tp.partition] = max(0, high - pos)
        return out

    def pause(self) -> None:
        self.consumer.pause(*self.consumer.assignment())

    def resume(self) -> None:
        self.consumer.resume(*self.consumer.paused())

    def close(self, timeout_ms: int = 3000) -> None:
        self.consumer.close(autocommit=False, timeout_ms=timeout_ms)
