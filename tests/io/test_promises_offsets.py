"""Commit-protocol promises at their edges: empty trackers, first offsets, late callbacks,
partitions that come back. Each test names the promise it guards."""

from __future__ import annotations

from kafka import TopicPartition

from streamlstm.io.offsets import OffsetTracker, Ticket

P0, P1 = TopicPartition("in", 0), TopicPartition("in", 1)
SEND = ("out", b"k", b"v", None)


def _acked(tracker: OffsetTracker, ends: dict) -> Ticket:
    """A ticket added and fully acknowledged, then collected."""
    ticket = Ticket(dict(ends), polled_at=0.0)
    tracker.add(ticket)
    assert tracker.collect() == [ticket]
    return ticket


def test_an_empty_tracker_has_no_head_and_no_failed_head() -> None:
    tracker = OffsetTracker()
    assert tracker.head() is None and tracker.failed_head() is None
    assert tracker.collect() == [] and len(tracker) == 0


def test_head_is_the_oldest_unfinished_ticket() -> None:
    tracker = OffsetTracker()
    first, second = Ticket({P0: 1}, 0.0, outstanding=1), Ticket({P0: 2}, 0.0, outstanding=1)
    tracker.add(first)
    tracker.add(second)
    assert tracker.head() is first
    first.outstanding = 0
    tracker.collect()
    assert tracker.head() is second and len(tracker) == 1


def test_a_ticket_with_sends_in_flight_is_not_yet_a_failed_head() -> None:
    """Failed sends are repeated only once every frame of the ticket has been reported."""
    tracker = OffsetTracker()
    ticket = Ticket({P0: 3}, 0.0, outstanding=1, failed=[SEND], errors=["timeout"])
    tracker.add(ticket)
    assert tracker.failed_head() is None
    ticket.outstanding = 0
    assert tracker.failed_head() is ticket


def test_the_first_record_of_a_partition_is_committable() -> None:
    """Offset 1 (after record 0) is reported uncommitted, and marked committed, like any."""
    tracker = OffsetTracker()
    _acked(tracker, {P0: 1})
    assert tracker.uncommitted() == {P0: 1}
    tracker.mark_committed({P0: 1})
    assert tracker.uncommitted() == {}


def test_a_late_callback_of_an_older_commit_does_not_move_the_commit_back() -> None:
    tracker = OffsetTracker()
    _acked(tracker, {P0: 9})
    tracker.mark_committed({P0: 9})
    tracker.mark_committed({P0: 5})  # an earlier async commit, reported late
    assert tracker.uncommitted() == {}


def test_a_forgotten_partition_is_forgotten_acked_and_committed() -> None:
    """After a revoke, nothing acknowledged before it is committed; when the partition
    comes back, its new offsets count even if lower than what was committed before."""
    tracker = OffsetTracker()
    _acked(tracker, {P0: 10, P1: 4})
    tracker.mark_committed({P1: 4})
    tracker.forget([P0, P1])
    assert tracker.uncommitted() == {}
    _acked(tracker, {P1: 2})  # reassigned, resumed from an earlier committed offset
    assert tracker.uncommitted() == {P1: 2}


def test_taking_the_failed_sends_resets_the_ticket_to_retriable() -> None:
    """A failure after a repeat is judged on its own, not on the failures already taken."""
    ticket = Ticket({P0: 1}, 0.0, failed=[SEND], errors=["fatal"], retriable=False)
    assert ticket.take_failed() == ([SEND], ["fatal"], False)
    assert (ticket.failed, ticket.errors, ticket.retriable) == ([], [], True)


def test_acked_is_minus_one_until_a_partitions_outputs_are_acknowledged() -> None:
    """The changelog writes a key's row only up to ``acked``: a partition with nothing
    acknowledged must read as "nothing" (-1), never as offset 0 or 1."""
    tracker = OffsetTracker()
    assert tracker.acked(P0) == -1 and tracker.acked(P1) == -1
    _acked(tracker, {P0: 5})
    assert tracker.acked(P0) == 5 and tracker.acked(P1) == -1
    tracker.add(Ticket({P0: 9, P1: 4}, 0.0, outstanding=1))  # in flight: not acknowledged
    tracker.collect()
    assert tracker.acked(P0) == 5 and tracker.acked(P1) == -1
