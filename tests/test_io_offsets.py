"""The commit protocol: offsets advance only over fully acknowledged polls, in poll order."""

from __future__ import annotations

from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from streamlstm.io.offsets import OffsetTracker, Ticket

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)


def _ticket(ends: dict, n: int) -> tuple[Ticket, list[Future]]:
    futures = [Future() for _ in range(n)]
    sends = [("out", b"k", b"v", None)] * n
    return Ticket(dict(ends), list(futures), sends, polled_at=0.0), futures


def test_offsets_advance_over_the_acknowledged_prefix_only() -> None:
    tracker = OffsetTracker()
    first, f1 = _ticket({P0: 5, P1: 3}, 2)
    second, f2 = _ticket({P0: 9}, 1)
    tracker.add(first)
    tracker.add(second)
    f2[0].success(None)
    f1[0].success(None)
    assert tracker.collect() == [] and tracker.uncommitted() == {}
    f1[1].success(None)
    assert tracker.collect() == [first, second]
    assert tracker.uncommitted() == {P0: 9, P1: 3}
    tracker.mark_committed({P0: 9})
    assert tracker.uncommitted() == {P1: 3}
    assert tracker.uncommitted([P0]) == {}


def test_a_failed_send_blocks_commits_until_repeated() -> None:
    tracker = OffsetTracker()
    ticket, futures = _ticket({P0: 4}, 2)
    tracker.add(ticket)
    futures[0].success(None)
    futures[1].failure(KafkaTimeoutError("expired"))
    assert tracker.collect() == []
    assert tracker.failed_head() is ticket and ticket.failed() == [1]
    assert tracker.uncommitted() == {}
    again = Future()
    ticket.futures[1] = again
    ticket._checked = 1
    assert tracker.failed_head() is None
    again.success(None)
    assert tracker.collect() == [ticket] and tracker.uncommitted() == {P0: 4}


def test_forgotten_partitions_are_never_committed() -> None:
    tracker = OffsetTracker()
    ticket, futures = _ticket({P0: 2, P1: 7}, 1)
    tracker.add(ticket)
    tracker.forget([P1])
    futures[0].success(None)
    tracker.collect()
    assert tracker.uncommitted() == {P0: 2}
    assert tracker.pending_sends == 0


def test_io_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, streamlstm.io; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
