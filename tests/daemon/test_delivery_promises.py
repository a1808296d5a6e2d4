"""The output side's promises, on :class:`~streamlstm.daemon.delivery.Delivery` alone.

A fake producer records what it is asked to do and reports on tickets only when the
test says so; a fake consumer records commits and pauses. Each test is named after the
promise it guards: acknowledgements are accounted, failures resent with backoff, a
record refused for good stops the daemon, consumption pauses and resumes at the
documented thresholds, commits never pass acknowledged outputs (async, final, and on a
hand-over), and a lost partition is never committed again.
"""

from __future__ import annotations

from typing import Any

import pytest
from kafka import TopicPartition

from streamlstm.daemon import delivery as delivery_module
from streamlstm.daemon.delivery import (
    MAX_BACKOFF_SECONDS,
    SEND_ATTEMPTS,
    Delivery,
    Fatal,
    fmt_offsets,
    short,
)
from streamlstm.daemon.telemetry import Telemetry
from streamlstm.io import Ticket
from streamlstm.io.sink import SinkError
from streamlstm.metrics import Metrics

P0, P1, P2 = (TopicPartition("in", p) for p in range(3))
SEND = ("out", b"k", b"v", None)


class FakeSink:
    """Records calls; a send leaves the ticket outstanding until :meth:`ack` or :meth:`fail`."""

    def __init__(self) -> None:
        self.sent: list[tuple[Ticket, list]] = []
        self.resent: list[tuple[Ticket, list]] = []
        self.flushes: list[float] = []
        self.closed: list[float] = []
        self.poll_error: Exception | None = None
        self.on_flush: Any = None

    def send(self, ticket: Ticket, groups: list) -> None:
        ticket.outstanding += 1
        ticket.pending += sum(len(g[1]) for g in groups)
        self.sent.append((ticket, groups))

    def send_records(self, ticket: Ticket, sends: list) -> None:
        ticket.outstanding += 1
        ticket.pending += len(sends)
        self.resent.append((ticket, sends))

    def poll_acks(self) -> None:
        if self.poll_error is not None:
            raise self.poll_error

    def flush(self, timeout_s: float) -> bool:
        self.flushes.append(timeout_s)
        if self.on_flush is not None:
            self.on_flush()
        return True

    def close(self, timeout_s: float = 0.0) -> None:
        self.closed.append(timeout_s)

    @staticmethod
    def ack(ticket: Ticket) -> None:
        ticket.outstanding, ticket.pending = 0, 0

    @staticmethod
    def fail(ticket: Ticket, *, retriable: bool = True, error: str = "KafkaTimeoutError") -> None:
        ticket.outstanding, ticket.pending = 0, 0
        ticket.failed = [SEND]
        ticket.errors = [error]
        ticket.retriable = retriable


class FakeSource:
    """Owns partitions 0..2; records commits (accepted, or failed with ``commit_error``)."""

    def __init__(self) -> None:
        self.assigned = {P0, P1, P2}
        self.commits: list[dict[TopicPartition, int]] = []
        self.timeouts: list[int] = []
        self.commit_error: Exception | None = None
        self.pauses = 0
        self.resumes = 0

    def commit_async(self, offsets: dict[TopicPartition, int], callback: Any) -> None:
        self.commits.append(dict(offsets))
        if self.commit_error is not None:
            callback(offsets, self.commit_error)
        else:
            callback(dict(offsets), None)

    def commit(self, offsets: dict[TopicPartition, int], timeout_ms: int) -> None:
        self.timeouts.append(timeout_ms)
        if self.commit_error is not None:
            raise self.commit_error
        self.commits.append(dict(offsets))

    def pause(self) -> None:
        self.pauses += 1

    def resume(self) -> None:
        self.resumes += 1


def _delivery(max_batch: int = 100) -> tuple[Delivery, FakeSink]:
    delivery = Delivery(Telemetry(Metrics(), 10.0, 0), max_batch=max_batch)
    sink = FakeSink()
    delivery.sink = sink  # type: ignore[assignment]
    return delivery, sink


def _send(delivery: Delivery, ends: dict[TopicPartition, int], records: int = 1) -> Ticket:
    ticket = Ticket(dict(ends), polled_at=0.0)
    delivery.send(ticket, [("out", [b"k"] * records, [b"v"] * records, None)])
    return ticket


def _metric(delivery: Delivery, name: str, labels: dict[str, str] | None = None) -> float:
    value = delivery.telemetry.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


# -- acknowledgements -----------------------------------------------------------------


def test_acknowledged_tickets_are_counted_once_in_poll_order() -> None:
    delivery, sink = _delivery()
    first, second = _send(delivery, {P0: 5}), _send(delivery, {P0: 9})
    first.predictions = second.predictions = 3
    assert sink.sent == [(first, first.sent), (second, second.sent)]
    assert delivery.check_acks() == 0
    sink.ack(second)  # acknowledged first, but waits behind the first ticket
    assert delivery.check_acks() == 0
    assert _metric(delivery, "streamlstm_predictions_total") == 0
    sink.ack(first)
    assert delivery.check_acks() == 2
    assert _metric(delivery, "streamlstm_predictions_total") == 6
    assert delivery.check_acks() == 0  # nothing counted twice
    assert _metric(delivery, "streamlstm_predictions_total") == 6


def test_a_failed_producer_process_is_fatal() -> None:
    delivery, sink = _delivery()
    sink.poll_error = SinkError("the producer died")
    with pytest.raises(Fatal, match="producer process failed"):
        delivery.check_acks()


def test_check_acks_resends_a_failed_head_and_counts_the_broker_error() -> None:
    delivery, sink = _delivery()
    ticket = _send(delivery, {P0: 3})
    sink.fail(ticket)
    assert delivery.check_acks() == 0
    assert sink.resent == [(ticket, [SEND])]
    assert ticket.failed == [] and ticket.attempts == 1
    assert _metric(delivery, "streamlstm_broker_errors_total", {"operation": "produce"}) == 1


# -- resend ---------------------------------------------------------------------------


def test_a_resend_repeats_every_later_ticket_after_the_failed_records() -> None:
    delivery, sink = _delivery()
    head, later, last = (_send(delivery, {P0: e}) for e in (2, 4, 6))
    sink.fail(head)
    sink.ack(later)
    sink.fail(last)  # its own failure is covered by its repeat
    delivery.check_acks()
    assert sink.resent == [(head, [SEND])]
    assert sink.sent[3:] == [(later, later.sent), (last, last.sent)]
    assert last.failed == [] and later.failed == []


def test_resends_back_off_half_a_second_per_attempt_up_to_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(delivery_module.time, "monotonic", lambda: now[0])
    delivery, sink = _delivery()
    ticket = _send(delivery, {P0: 1})
    waits = []
    for _ in range(12):
        sink.fail(ticket)  # retriable: repeated for as long as it takes
        delivery.resend(ticket)
        waits.append(ticket.retry_at - now[0])
        sink.fail(ticket)
        now[0] = ticket.retry_at - 0.01
        delivery.resend(ticket)  # too early: nothing happens
        assert ticket.failed == [SEND]
        now[0] = ticket.retry_at
    assert waits == [min(0.5 * a, MAX_BACKOFF_SECONDS) for a in range(1, 13)]
    assert MAX_BACKOFF_SECONDS == 5.0
    assert len(sink.resent) == 12 and ticket.attempts == 12


def test_a_record_refused_for_good_stops_at_exactly_send_attempts() -> None:
    delivery, sink = _delivery()
    ticket = _send(delivery, {P0: 1})
    for attempt in range(1, SEND_ATTEMPTS):
        sink.fail(ticket, retriable=False, error="MessageSizeTooLargeError")
        ticket.retry_at = 0.0
        delivery.resend(ticket)
        assert ticket.attempts == attempt
    sink.fail(ticket, retriable=False, error="MessageSizeTooLargeError")
    ticket.retry_at = 0.0
    with pytest.raises(Fatal, match=rf"1 records were refused {SEND_ATTEMPTS} times"):
        delivery.resend(ticket)
    assert SEND_ATTEMPTS == 5
    assert len(sink.resent) == SEND_ATTEMPTS - 1
    assert delivery.tracker.uncommitted() == {}


# -- backpressure ---------------------------------------------------------------------


def test_backpressure_threshold_is_eight_batches_but_at_least_50000() -> None:
    assert Delivery(Telemetry(Metrics(), 10.0, 0), max_batch=100).pause_above == 50_000
    assert Delivery(Telemetry(Metrics(), 10.0, 0), max_batch=10_000).pause_above == 80_000


def test_consumption_pauses_above_the_threshold_and_resumes_at_half_of_it() -> None:
    delivery, _sink = _delivery()
    delivery.pause_above = 10
    source = FakeSource()
    first = _send(delivery, {P0: 1}, records=10)
    delivery.apply_backpressure(source)  # exactly at the threshold: keep fetching
    assert (source.pauses, delivery.paused) == (0, False)
    second = _send(delivery, {P0: 2}, records=1)
    delivery.apply_backpressure(source)
    assert (source.pauses, delivery.paused) == (1, True)
    delivery.apply_backpressure(source)  # paused once, not again
    assert source.pauses == 1
    first.pending = 5  # 6 wait: above half the threshold, still paused
    delivery.apply_backpressure(source)
    assert (source.resumes, delivery.paused) == (0, True)
    second.pending = 0  # 5 wait: exactly half
    delivery.apply_backpressure(source)
    assert (source.resumes, delivery.paused) == (1, False)
    delivery.apply_backpressure(source)
    assert (source.pauses, source.resumes) == (1, 1)


# -- commits --------------------------------------------------------------------------


def test_async_commits_only_acknowledged_offsets_and_each_once() -> None:
    delivery, sink = _delivery()
    source = FakeSource()
    first, second = _send(delivery, {P0: 5, P1: 2}), _send(delivery, {P0: 9})
    delivery.commit_async(source)
    assert source.commits == []  # nothing acknowledged: no commit at all
    sink.ack(first)
    sink.ack(second)
    delivery.check_acks()
    delivery.commit_async(source)
    assert source.commits == [{P0: 9, P1: 2}]
    assert _metric(delivery, "streamlstm_commits_total") == 1
    delivery.commit_async(source)  # accepted: not committed again
    assert source.commits == [{P0: 9, P1: 2}]


def test_a_failed_async_commit_is_counted_and_retried() -> None:
    delivery, sink = _delivery()
    source = FakeSource()
    sink.ack(_send(delivery, {P0: 5}))
    delivery.check_acks()
    source.commit_error = RuntimeError("coordinator moved")
    delivery.commit_async(source)
    assert _metric(delivery, "streamlstm_commit_failures_total") == 1
    assert _metric(delivery, "streamlstm_commits_total") == 0
    source.commit_error = None
    delivery.commit_async(source)  # the same offsets again
    assert source.commits == [{P0: 5}, {P0: 5}]
    assert _metric(delivery, "streamlstm_commits_total") == 1


def test_commits_cover_only_the_partitions_owned() -> None:
    delivery, sink = _delivery()
    source = FakeSource()
    source.assigned = {P1}
    sink.ack(_send(delivery, {P0: 5, P1: 7}))
    delivery.check_acks()
    delivery.commit_async(source)
    assert source.commits == [{P1: 7}]


def test_the_final_commit_waits_for_acknowledged_offsets_only() -> None:
    delivery, sink = _delivery()
    source = FakeSource()
    sink.ack(_send(delivery, {P0: 5}))
    _send(delivery, {P0: 9, P1: 3})  # never acknowledged
    delivery.check_acks()
    delivery.commit_final(source, timeout_s=2.5)
    assert source.commits == [{P0: 5}] and source.timeouts == [2500]
    assert _metric(delivery, "streamlstm_commits_total") == 1
    delivery.commit_final(source, timeout_s=2.5)  # nothing new: no second commit
    assert source.timeouts == [2500]


def test_a_final_commit_with_no_time_left_still_waits_a_millisecond() -> None:
    delivery, sink = _delivery()
    source = FakeSource()
    sink.ack(_send(delivery, {P0: 5}))
    delivery.check_acks()
    delivery.commit_final(source, timeout_s=0.0)
    assert source.timeouts == [1]


def test_a_failed_final_commit_is_counted_and_not_marked_committed() -> None:
    delivery, sink = _delivery()
    source = FakeSource()
    sink.ack(_send(delivery, {P0: 5}))
    delivery.check_acks()
    source.commit_error = RuntimeError("timed out")
    delivery.commit_final(source, timeout_s=1.0)
    assert _metric(delivery, "streamlstm_commit_failures_total") == 1
    assert _metric(delivery, "streamlstm_commits_total") == 0
    assert delivery.tracker.uncommitted() == {P0: 5}


# -- rebalances -----------------------------------------------------------------------


def test_hand_over_flushes_then_offers_the_revoked_partitions_offsets_and_forgets_them() -> None:
    delivery, sink = _delivery()
    ticket = _send(delivery, {P0: 5, P1: 8})
    sink.on_flush = lambda: sink.ack(ticket)  # in flight until the flush
    offsets = delivery.hand_over({P0}, budget_s=3.0)
    assert sink.flushes == [3.0]
    assert offsets == {P0: 5}
    assert delivery.tracker.uncommitted() == {P1: 8}  # the partition kept still commits
    assert delivery.hand_over({P0}, budget_s=3.0) == {}  # forgotten: never offered again


def test_hand_over_never_raises_into_the_rebalance_listener() -> None:
    delivery, sink = _delivery()
    sink.ack(_send(delivery, {P0: 5}))
    delivery.check_acks()
    sink.poll_error = SinkError("the producer died")
    assert delivery.hand_over({P0}, budget_s=1.0) == {P0: 5}


def test_a_lost_partition_is_never_committed_again() -> None:
    delivery, sink = _delivery()
    source = FakeSource()
    sink.ack(_send(delivery, {P0: 5, P2: 4}))
    delivery.check_acks()
    delivery.drop({P0})
    delivery.commit_async(source)
    assert source.commits == [{P2: 4}]


def test_close_sink_closes_the_producer_once() -> None:
    delivery, sink = _delivery()
    delivery.close_sink(timeout_s=4.0)
    delivery.close_sink(timeout_s=4.0)
    assert sink.closed == [4.0] and delivery.sink is None


# -- log lines ------------------------------------------------------------------------


def test_short_names_the_exception_once_and_stays_under_200_characters() -> None:
    assert short(ValueError("bad")) == "ValueError: bad"
    assert short(ValueError("ValueError already said")) == "ValueError already said"
    assert short(KeyError()) == "KeyError"
    long = short(RuntimeError("x" * 500))
    assert len(long) == 200 and long.endswith("x...") and long.startswith("RuntimeError: x")
    exact = "RuntimeError: " + "y" * (199 - len("RuntimeError: "))
    assert short(RuntimeError("y" * (199 - len("RuntimeError: ")))) == exact


def test_fmt_offsets_lists_partitions_in_order() -> None:
    assert fmt_offsets({P1: 7, P0: 3}) == "in[0]@3, in[1]@7"


def test_a_delivery_never_connected_has_nothing_to_account_flush_or_close() -> None:
    delivery = Delivery(Telemetry(Metrics(), 10.0, 0), max_batch=100)
    assert delivery.sink is None
    assert delivery.check_acks() == 0
    assert delivery.hand_over({P0}, budget_s=1.0) == {}
    delivery.close_sink(timeout_s=1.0)
    assert delivery.sink is None


def test_the_final_commit_covers_only_the_partitions_owned() -> None:
    delivery, sink = _delivery()
    source = FakeSource()
    source.assigned = {P1}
    sink.ack(_send(delivery, {P0: 5, P1: 7}))
    delivery.check_acks()
    delivery.commit_final(source, timeout_s=1.0)
    assert source.commits == [{P1: 7}]


def test_a_stop_for_refused_records_names_up_to_three_of_the_errors() -> None:
    delivery, sink = _delivery()
    ticket = _send(delivery, {P0: 1})
    sink.fail(ticket, retriable=False)
    ticket.errors = ["D", "B", "A", "C", "A"]
    ticket.attempts = SEND_ATTEMPTS - 1
    with pytest.raises(Fatal) as refused:
        delivery.resend(ticket)
    assert "(A; B; C)" in str(refused.value) and "D" not in str(refused.value)


# -- what the operator reads ----------------------------------------------------------


def _messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_a_resend_logs_how_many_why_which_attempt_and_what_is_repeated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    delivery, sink = _delivery()
    head = _send(delivery, {P0: 1})
    _send(delivery, {P0: 3}, records=2)
    sink.fail(head, error="KafkaTimeoutError: expired")
    with caplog.at_level("WARNING", logger="streamlstm.daemon.delivery"):
        delivery.check_acks()
    assert (
        "1 records were not acknowledged (KafkaTimeoutError: expired); sending them again"
        " (attempt 2), and the 2 records sent after them" in _messages(caplog)
    )


def test_pausing_logs_how_many_records_wait(caplog: pytest.LogCaptureFixture) -> None:
    delivery, _sink = _delivery()
    delivery.pause_above = 10
    _send(delivery, {P0: 1}, records=11)
    with caplog.at_level("WARNING", logger="streamlstm.daemon.delivery"):
        delivery.apply_backpressure(FakeSource())
    assert "11 records await acknowledgement" in _messages(caplog)


def test_commit_logs_name_the_offsets_and_the_reason_of_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    delivery, sink = _delivery()
    source = FakeSource()
    sink.ack(_send(delivery, {P0: 5, P1: 2}))
    delivery.check_acks()
    with caplog.at_level("INFO", logger="streamlstm.daemon.delivery"):
        source.commit_error = RuntimeError("coordinator moved")
        delivery.commit_async(source)
        delivery.commit_final(source, timeout_s=1.0)
        source.commit_error = None
        delivery.commit_final(source, timeout_s=1.0)
    text = _messages(caplog)
    assert "offset commit failed (RuntimeError: coordinator moved)" in text
    assert "final commit failed (coordinator moved)" in text
    assert "committed offsets in[0]@5, in[1]@2" in text


def test_a_failed_changelog_write_on_hand_over_commits_nothing_for_the_revoked() -> None:
    """Committing past rows that never reached the changelog would let a restore replay
    events onto an older row; the hand-over must offer no offsets at all instead."""
    delivery, sink = _delivery()
    sink.ack(_send(delivery, {P0: 5}))
    delivery.check_acks()

    def failing_checkpoint(revoked: set, budget_s: float) -> dict:
        raise SinkError("changelog unreachable")

    assert delivery.hand_over({P0}, budget_s=1.0, checkpoint=failing_checkpoint) == {}


def test_a_forgotten_partition_counts_as_caught_up_when_it_comes_back() -> None:
    """What was sent from a partition before it went says nothing about it once it is
    given back: a stale count would hold its changelog rows back for good."""
    delivery, _sink = _delivery()
    _send(delivery, {P0: 5})  # never acknowledged
    assert not delivery.caught_up(P0)
    delivery.hand_over({P0}, budget_s=1.0)
    assert delivery.caught_up(P0)
