"""The commit protocol: an offset is committed only once every output before it is acknowledged.

Each poll becomes a :class:`Ticket`: the next offset of every partition it covers, and a
count of the send frames (predictions and dead letters) still awaiting the producer's
report. Tickets finish in poll order; a partition's committable offset advances over
the longest prefix of finished tickets. So after a crash the group resumes at a record
whose outputs may be missing, never past one: predictions are at-least-once, nothing
is lost.

The reports are applied by :meth:`streamlstm.io.sink.Sink.poll_acks` from the daemon's
loop (or by ``flush`` from the rebalance listener while the loop waits in ``poll``).

>>> from streamlstm.io.client import TopicPartition
>>> tracker = OffsetTracker()
>>> tp = TopicPartition("events", 0)
>>> a, b = Ticket({tp: 10}, polled_at=0.0), Ticket({tp: 20}, polled_at=0.0)
>>> a.outstanding = b.outstanding = 1
>>> tracker.add(a); tracker.add(b)
>>> b.outstanding = 0                  # b acknowledged: it waits for a
>>> [t.ends for t in tracker.collect()], tracker.uncommitted()
([], {})
>>> a.outstanding = 0
>>> len(tracker.collect()), tracker.uncommitted()
(2, {TopicPartition(topic='events', partition=0): 20})
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from streamlstm.io.client import TopicPartition
from streamlstm.io.producer import Group

# (topic, key, value, headers) of one produced record, kept until acknowledged so a
# failed send can be repeated.
Send = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]] | None]


@dataclass(eq=False)
class Ticket:
    """Everything one poll produced, and the offsets it lets us commit once acknowledged."""

    ends: dict[TopicPartition, int]  # next offset to consume, per partition of this poll
    polled_at: float  # time.time() when the records were polled
    event_ts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # ts of predicted events
    predictions: int = 0
    anomalies: int = 0
    dead_letter_reasons: list[str] = field(default_factory=list)
    outstanding: int = 0  # send frames the producer has not reported on yet
    pending: int = 0  # records in those frames
    failed: list[Send] = field(default_factory=list)  # reported failed, to be sent again
    errors: list[str] = field(default_factory=list)  # why, one per entry of ``failed``
    retriable: bool = True  # every failure in ``failed`` is retriable
    attempts: int = 0  # times failed sends were repeated
    retry_at: float = 0.0  # monotonic time before which no repeat is tried
    # The groups first sent for this poll, kept until the ticket is collected: when an
    # earlier ticket's records are repeated, this one's are repeated after them.
    sent: list[Group] = field(default_factory=list)

    def done(self) -> bool:
        """True when the producer reported on every record (successfully or not)."""
        return self.outstanding == 0

    def take_failed(self) -> tuple[list[Send], list[str], bool]:
        """The failed records, their errors, and whether all are retriable; clears them."""
        out = (self.failed, self.errors, self.retriable)
        self.failed, self.errors, self.retriable = [], [], True
        return out


class OffsetTracker:
    """Tickets in poll order, acknowledged offsets, and what has been committed."""

    def __init__(self) -> None:
        self._tickets: deque[Ticket] = deque()
        self._acked: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._lock = threading.Lock()  # kafka-python's rebalance listener: its I/O thread

    def __len__(self) -> int:
        return len(self._tickets)

    @property
    def pending_sends(self) -> int:
        """Records sent but not yet known to be acknowledged."""
        return sum(t.pending + len(t.failed) for t in self._tickets)

    def add(self, ticket: Ticket) -> None:
        with self._lock:
            self._tickets.append(ticket)

    def head(self) -> Ticket | None:
        """The oldest unfinished ticket."""
        with self._lock:
            return self._tickets[0] if self._tickets else None

    def behind(self, ticket: Ticket) -> list[Ticket]:
        """The tickets after ``ticket``, in poll order."""
        with self._lock:
            tickets = list(self._tickets)
        for i, t in enumerate(tickets):
            if t is ticket:
                return tickets[i + 1 :]
        return []

    def collect(self) -> list[Ticket]:
        """Pop finished, fully successful tickets from the front; advance acked offsets.

        Stops at the first ticket that is unfinished or has a failed send: the caller
        repeats its failed sends (:meth:`failed_head`) before anything behind it counts.
        """
        finished = []
        with self._lock:
            while self._tickets and self._tickets[0].done():
                ticket = self._tickets[0]
                if ticket.failed:
                    break
                self._tickets.popleft()
                self._acked.update(ticket.ends)
                finished.append(ticket)
        return finished

    def failed_head(self) -> Ticket | None:
        """The front ticket when it finished with failed sends, else None."""
        with self._lock:
            head = self._tickets[0] if self._tickets else None
            if head is not None and head.done() and head.failed:
                return head
            return None

    def uncommitted(self, partitions: Iterable[TopicPartition] | None = None) -> dict:
        """Acknowledged offsets not committed yet (optionally only for ``partitions``)."""
        with self._lock:
            wanted = self._acked if partitions is None else set(partitions)
            return {
                tp: off
                for tp, off in self._acked.items()
                if tp in wanted and self._committed.get(tp, -1) < off
            }

    def acked(self, tp: TopicPartition) -> int:
        """The offset up to which every output of ``tp`` is acknowledged (-1: none)."""
        with self._lock:
            return self._acked.get(tp, -1)

    def mark_committed(self, offsets: dict[TopicPartition, int]) -> None:
        with self._lock:
            for tp, off in offsets.items():
                if self._committed.get(tp, -1) < off:
                    self._committed[tp] = off

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop all knowledge of ``partitions`` (revoked or lost): never commit them again.

        Tickets stay, so the outputs of other partitions still count.
        """
        gone = set(partitions)
        with self._lock:
            for tp in gone:
                self._acked.pop(tp, None)
                self._committed.pop(tp, None)
            for ticket in self._tickets:
                for tp in gone & ticket.ends.keys():
                    del ticket.ends[tp]
