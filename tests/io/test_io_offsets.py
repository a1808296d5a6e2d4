"""The commit protocol: offsets advance only over fully acknowledged polls, in poll order."""

from __future__ import annotations

from kafka import TopicPartition

from streamlstm.io.offsets import OffsetTracker, Ticket

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)


def _ticket(ends: dict, frames: int = 1, records: int = 1) -> Ticket:
    """A ticket whose outputs went out in ``frames`` frames of ``records`` records."""
    return Ticket(dict(ends), polled_at=0.0, outstanding=frames, pending=frames * records)


def _ack(ticket: Ticket, records: int = 1, failed: list | None = None) -> None:
    """What the sink does with the producer's report on one frame."""
    ticket.outstanding -= 1
    ticket.pending -= records
    for send in failed or ():
        ticket.failed.append(send)
        ticket.errors.append("KafkaTimeoutError: expired")
        ticket.retriable = False


def test_offsets_advance_over_the_acknowledged_prefix_only() -> None:
    tracker = OffsetTracker()
    first = _ticket({P0: 5, P1: 3}, frames=2)
    second = _ticket({P0: 9})
    tracker.add(first)
    tracker.add(second)
    assert tracker.pending_sends == 3
    _ack(second)
    _ack(first)
    assert tracker.collect() == [] and tracker.uncommitted() == {}
    _ack(first)
    assert tracker.collect() == [first, second]
    assert tracker.uncommitted() == {P0: 9, P1: 3}
    tracker.mark_committed({P0: 9})
    assert tracker.uncommitted() == {P1: 3}
    assert tracker.uncommitted([P0]) == {}


def test_a_failed_send_blocks_commits_until_repeated() -> None:
    tracker = OffsetTracker()
    ticket = _ticket({P0: 4}, records=2)
    tracker.add(ticket)
    _ack(ticket, records=2, failed=[("out", b"k", b"v", None)])
    assert tracker.collect() == []
    assert tracker.failed_head() is ticket
    assert tracker.pending_sends == 1  # the failed record still counts as not acknowledged
    assert tracker.uncommitted() == {}
    sends, errors, retriable = ticket.take_failed()
    assert sends == [("out", b"k", b"v", None)] and len(errors) == 1 and not retriable
    ticket.outstanding, ticket.pending = 1, 1  # sent again
    assert tracker.failed_head() is None and tracker.collect() == []
    _ack(ticket)
    assert tracker.collect() == [ticket] and tracker.uncommitted() == {P0: 4}


def test_forgotten_partitions_are_never_committed() -> None:
    tracker = OffsetTracker()
    ticket = _ticket({P0: 2, P1: 7})
    tracker.add(ticket)
    tracker.forget([P1])
    _ack(ticket)
    tracker.collect()
    assert tracker.uncommitted() == {P0: 2}
    assert tracker.pending_sends == 0


def test_io_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, streamlstm.io, streamlstm.io.producer; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
