"""The input side on librdkafka (``kafka.client = "confluent"``): the same contract as
:class:`~streamlstm.io.source.KafkaPythonSource`.

librdkafka runs the rebalance callbacks (``on_assign``, ``on_revoke``, ``on_lost``),
commit results and statistics inside ``consume()``/``poll()``/``close()`` on the
calling thread: the loop's thread, between batches, which is the moment the daemon's
callbacks expect. A revoke commits synchronously before the partitions go (the pattern
librdkafka documents for the rebalance callback). Offsets are never auto-committed nor
auto-stored: the daemon commits explicit offsets after their outputs and rows.

``consume(n, timeout)`` waits until ``n`` messages *or* the timeout, so a poll takes
what is queued at once and waits only when nothing is: latency stays that of one fetch.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import orjson

from streamlstm.config import Settings
from streamlstm.io.client import CommitCallback, Offsets, Record, TopicPartition
from streamlstm.io.confluent_config import consumer_config
from streamlstm.io.confluent_reader import consume
from streamlstm.io.source import Polled, fmt_offsets, fmt_tps

log = logging.getLogger(__name__)


class MessageRecords(Sequence[Any]):
    """A poll's librdkafka messages seen as records, built only when one is looked at
    (dead letters, output arrays): the hot path reads keys and values in bulk."""

    __slots__ = ("messages",)

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.messages)))]
        m = self.messages[i]
        return Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers())


def _ours(parts: list[Any]) -> set[TopicPartition]:
    return {TopicPartition(p.topic, p.partition) for p in parts}


def theirs(offsets: Offsets) -> list[Any]:
    from confluent_kafka import TopicPartition as CKTopicPartition

    return [CKTopicPartition(tp.topic, tp.partition, off) for tp, off in sorted(offsets.items())]


class ConfluentSource:
    """A confluent-kafka consumer on ``kafka.input_topic`` in group ``kafka.group_id``."""

    def __init__(
        self,
        settings: Settings,
        on_revoke: Callable[[set[TopicPartition]], Offsets] | None = None,
        on_assigned: Callable[[set[TopicPartition]], None] | None = None,
        on_lost: Callable[[set[TopicPartition]], None] | None = None,
        on_committed: Callable[[Offsets], None] | None = None,
        bootstrap_timeout_ms: int = 5000,
    ) -> None:
        from confluent_kafka import Consumer

        k = settings.kafka
        self.topic = k.input_topic
        self.max_batch = settings.engine.max_batch
        self.on_revoke = on_revoke
        self.on_assigned = on_assigned
        self.on_lost = on_lost
        self.on_committed = on_committed
        self.assigned: set[TopicPartition] = set()
        self._commits: deque[tuple[Offsets, CommitCallback]] = deque()
        self._stats: dict[str, Any] = {}
        self._stats_at: float | None = None
        conf = {
            **consumer_config(k),
            "on_commit": self._on_commit,
            "stats_cb": self._on_stats,
            "error_cb": self._on_error,
        }
        self.consumer = Consumer(conf)
        try:
            # Fail fast like kafka-python's bootstrap when no broker answers at all.
            self.consumer.list_topics(self.topic, timeout=bootstrap_timeout_ms / 1000)
            self.consumer.subscribe(
                [self.topic], on_assign=self._assign, on_revoke=self._revoke, on_lost=self._lost
            )
        except BaseException:
            self.consumer.close()
            raise

    # -- callbacks (inside consume/poll/close, on the caller's thread) -----------------

    def _revoke(self, _consumer: Any, parts: list[Any]) -> None:
        revoked = _ours(parts)
        if not revoked:
            return
        offsets = self.on_revoke(set(revoked)) if self.on_revoke else {}
        if offsets:
            try:
                self._commit_now(offsets)
                if self.on_committed:
                    self.on_committed(offsets)
                log.info("committed %s before giving up partitions", fmt_offsets(offsets))
            except Exception as exc:  # the new owner re-reads from the last commit
                log.warning("commit on revoke failed (%s); those records will be re-read", exc)
        self.assigned -= revoked
        log.info("partitions revoked: %s", fmt_tps(revoked))

    def _assign(self, _consumer: Any, parts: list[Any]) -> None:
        self.assigned |= _ours(parts)
        log.info("partitions assigned: %s", fmt_tps(_ours(parts)) or "none")
        if self.on_assigned:  # the whole set: eager assignors, as kafka-python's
            self.on_assigned(set(self.assigned))

    def _lost(self, _consumer: Any, parts: list[Any]) -> None:
        lost = _ours(parts)
        if self.on_lost:
            self.on_lost(set(lost))
        self.assigned -= lost
        log.warning("partitions lost (group membership expired): %s", fmt_tps(lost))

    def _on_commit(self, err: Any, parts: list[Any]) -> None:
        # Only asynchronous commits report here (a commit() that waits returns its result,
        # and librdkafka calls no on_commit for it), in the order they were made.
        if not self._commits:
            return
        offsets, callback = self._commits.popleft()
        failed = [p for p in parts or () if p.error is not None]
        error: BaseException | None = None
        if err is not None or failed:
            from confluent_kafka import KafkaException

            error = KafkaException(err if err is not None else failed[0].error)
        callback(offsets, error)

    def _on_stats(self, text: str) -> None:
        try:
            self._stats = orjson.loads(text)
            self._stats_at = time.monotonic()
        except orjson.JSONDecodeError:  # never fail a poll for statistics
            pass

    def _on_error(self, err: Any) -> None:
        if err.fatal():
            log.error("librdkafka: %s", err)
        else:
            log.debug("librdkafka: %s", err)

    # -- the loop ------------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> Polled | None:
        """Up to ``engine.max_batch`` records: those queued now, else the first to come
        within ``timeout_ms`` and whatever came with it."""
        msgs = consume(self.consumer, self.max_batch, timeout_ms / 1000)
        if not msgs:
            return None
        polled_at = time.time()
        if any(m.error() is not None for m in msgs):
            msgs = self._drop_errors(msgs)
            if not msgs:
                return None
        partition = np.fromiter((m.partition() for m in msgs), np.int64, len(msgs))
        offset = np.fromiter((m.offset() for m in msgs), np.int64, len(msgs))
        if len(msgs) > 1 and (partition[1:] != partition[:-1]).any():
            order = np.argsort(partition, kind="stable")  # partition order, as kafka-python
            msgs = [msgs[i] for i in order.tolist()]
            partition, offset = partition[order], offset[order]
        last = np.flatnonzero(np.append(partition[1:] != partition[:-1], True))
        ends = {
            TopicPartition(self.topic, int(partition[i])): int(offset[i]) + 1 for i in last.tolist()
        }
        return Polled(
            topic=self.topic,
            records=MessageRecords(msgs),
            payloads=[m.value() for m in msgs],
            partition=partition,
            offset=offset,
            ends=ends,
            polled_at=polled_at,
            keys=[m.key() for m in msgs],
        )

    def _drop_errors(self, msgs: list[Any]) -> list[Any]:
        from confluent_kafka import KafkaException

        good = []
        for m in msgs:
            err = m.error()
            if err is None:
                good.append(m)
            elif err.fatal():
                raise KafkaException(err)
            else:
                log.warning("consumer: %s", err)
        return good

    def commit_async(self, offsets: Offsets, callback: CommitCallback) -> None:
        """Commit without waiting; ``callback(offsets, error or None)`` runs in a later poll."""
        self._commits.append((dict(offsets), callback))
        try:
            self.consumer.commit(offsets=theirs(offsets), asynchronous=True)
        except Exception:
            self._commits.pop()
            raise

    def _commit_now(self, offsets: Offsets) -> None:
        result = self.consumer.commit(offsets=theirs(offsets), asynchronous=False)
        failed = [p for p in result or () if p.error is not None]
        if failed:
            from confluent_kafka import KafkaException

            raise KafkaException(failed[0].error)

    def commit(self, offsets: Offsets, timeout_ms: int) -> None:
        """Commit and wait (shutdown); raises on failure. librdkafka bounds the wait by
        its own request timeouts, not ``timeout_ms``."""
        self._commit_now(offsets)

    def committed(self, tp: TopicPartition) -> int | None:
        got = self.consumer.committed(theirs({tp: -1001}), timeout=5)
        offset = got[0].offset if got else -1001
        return offset if offset >= 0 else None

    def stable(self) -> bool:
        """Joined the group with an assignment, as the last statistics (1 s) say."""
        cgrp = self._stats.get("cgrp") or {}
        return (
            cgrp.get("state") == "up" and cgrp.get("join_state") == "steady" and bool(self.assigned)
        )

    def last_heartbeat(self) -> float | None:
        """When the statistics last saw the group coordinator connected (monotonic)."""
        cgrp = self._stats.get("cgrp") or {}
        return self._stats_at if cgrp.get("state") == "up" else None

    def highwater(self, partition: int) -> int | None:
        """The end the fetches reported (librdkafka's cached watermark; no request)."""
        tp = TopicPartition(self.topic, partition)
        try:
            _, high = self.consumer.get_watermark_offsets(theirs({tp: -1001})[0], cached=True)
        except Exception:  # revoked meanwhile
            return None
        return int(high) if high >= 0 else None

    def lag(self) -> dict[int, int]:
        """High watermark (of the fetches) minus position, per assigned partition."""
        out: dict[int, int] = {}
        assigned = sorted(self.assigned)
        if not assigned:
            return out
        positions = self.consumer.position(theirs(dict.fromkeys(assigned, -1001)))
        for tp, pos in zip(assigned, positions, strict=True):
            high = self.highwater(tp.partition)
            if high is not None and pos.offset >= 0:
                out[tp.partition] = max(0, high - pos.offset)
        return out

    def pause(self) -> None:
        self.consumer.pause(self.consumer.assignment())

    def resume(self) -> None:
        self.consumer.resume(self.consumer.assignment())

    def close(self, timeout_ms: int = 3000) -> None:
        """Leave the group (the revoke callback runs in here) and close."""
        self.consumer.close()
