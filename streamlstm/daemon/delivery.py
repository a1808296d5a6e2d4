"""Delivery: from outputs handed to the producer to input offsets committed.

Each poll's outputs are one :class:`~streamlstm.io.Ticket`. The producer reports on
them asynchronously; :meth:`Delivery.check_acks` is the one place those reports are
accounted (on the loop, at shutdown and during a rebalance alike), failed records are
sent again (:meth:`Delivery.resend`, followed by a repeat of every later ticket, so
each key's outputs end in input order), consumption pauses while too much waits
(:meth:`Delivery.apply_backpressure`), and commits never pass an output that was not
acknowledged (the :class:`~streamlstm.io.OffsetTracker` only offers those).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from streamlstm.daemon.telemetry import Telemetry
from streamlstm.io import OffsetTracker, Sink, Source, Ticket, TopicPartition
from streamlstm.io.producer import Group
from streamlstm.io.sink import SinkError

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 5.0
SEND_ATTEMPTS = 5  # a record refused this often for good stops the daemon (no commit past it)


class Fatal(Exception):
    """An internal error that must stop the daemon (without committing past it)."""


def short(exc: BaseException) -> str:
    """An exception in one log-friendly line: its type, then at most ~200 characters."""
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    text = text if text.startswith(name) else f"{name}: {text}"
    return text if len(text) < 200 else text[:197] + "..."


def fmt_offsets(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{off}" for tp, off in sorted(offsets.items()))


class Delivery:
    """The output side of the loop: the producer (``sink``), tickets, resends, commits."""

    def __init__(self, telemetry: Telemetry, max_batch: int) -> None:
        self.telemetry = telemetry
        self.tracker = OffsetTracker()
        self.sink: Sink | None = None  # set while connected
        self.paused = False
        self.sent = 0  # tickets handed to the producer so far
        self.collected = 0  # of them, fully acknowledged (they finish in order)
        self.processed: dict[TopicPartition, int] = {}  # next offset past what was sent
        # Stop fetching above this many unacknowledged records; resume at half of it.
        self.pause_above = max(50_000, 8 * max_batch)

    def send(self, ticket: Ticket, groups: list[Group]) -> None:
        """Hand one poll's outputs to the producer, without waiting."""
        assert self.sink is not None
        ticket.sent = groups
        self.sent += 1
        for tp, end in ticket.ends.items():
            self.processed[tp] = max(end, self.processed.get(tp, 0))
        self.tracker.add(ticket)
        self.sink.send(ticket, groups)

    def check_acks(self) -> int:
        """Account finished tickets; resend what failed at the head. Returns tickets finished.

        Raises :class:`Fatal` when the producer process failed or a record was refused
        for good: nothing at or after it may be committed.
        """
        try:
            if self.sink is not None:
                self.sink.poll_acks()
        except SinkError as exc:
            raise Fatal("the producer process failed") from exc
        finished = self.tracker.collect()
        if finished:
            self.collected += len(finished)
            self.telemetry.acknowledged(finished)
        failed = self.tracker.failed_head()
        if failed is not None:
            self.resend(failed)
        return len(finished)

    def resend(self, ticket: Ticket) -> None:
        """Send a ticket's failed records again (the producer gave up on them).

        Per-key order: records of tickets polled after this one may already be in the
        output topic (a3 a4 produced, a1 a2 expired). So every record of every later
        ticket is repeated after the failed ones, in poll order, whether it was
        acknowledged or not: the last copy of each record then comes in input order
        (a3 a4 a1 a2 a3 a4). Outputs are at-least-once, and a repeat carries the same
        values. A later ticket's own failures are covered by its repeat.

        Retriable failures (the broker away, timeouts) are repeated with backoff for as
        long as it takes. A record refused SEND_ATTEMPTS times for good stops the daemon
        (exit 1) before anything at or after its input offset is committed: nothing is
        lost, and the restart tries again with a fresh producer.
        """
        assert self.sink is not None
        now = time.monotonic()
        if now < ticket.retry_at:
            return
        attempts = ticket.attempts + 1
        shown = "; ".join(sorted(set(ticket.errors))[:3])
        self.telemetry.metrics.broker_errors.labels("produce").inc()
        if not ticket.retriable and attempts >= SEND_ATTEMPTS:
            raise Fatal(
                f"{len(ticket.failed)} records were refused {attempts} times ({shown}); "
                "stopping without committing past them, so a restart produces them again"
            )
        sends, _, _ = ticket.take_failed()
        ticket.attempts = attempts
        ticket.retry_at = now + min(0.5 * attempts, MAX_BACKOFF_SECONDS)
        later = self.tracker.behind(ticket)
        repeated = sum(len(g[1]) for t in later for g in t.sent)
        log.warning(
            "%d records were not acknowledged (%s); sending them again (attempt %d), and "
            "the %d records sent after them, to keep each key's order",
            len(sends),
            shown,
            attempts + 1,
            repeated,
        )
        self.sink.send_records(ticket, sends)
        for t in later:
            t.take_failed()  # in its repeat below
            self.sink.send(t, t.sent)

    def apply_backpressure(self, source: Source) -> None:
        """Stop fetching while too many records wait for acknowledgement (broker slow/away)."""
        pending = self.tracker.pending_sends
        if not self.paused and pending > self.pause_above:
            source.pause()
            self.paused = True
            log.warning("%d records await acknowledgement: pausing consumption", pending)
        elif self.paused and pending <= self.pause_above // 2:
            source.resume()
            self.paused = False
            log.info("acknowledgements caught up: resuming consumption")

    # -- commits -------------------------------------------------------------------------

    def commit_async(self, source: Source) -> None:
        """Commit what was acknowledged on the partitions owned, without waiting."""
        offsets = self.tracker.uncommitted(source.assigned)
        if offsets:
            source.commit_async(offsets, self.commit_done)

    def caught_up(self, tp: TopicPartition) -> bool:
        """Every output of what was sent from ``tp`` is acknowledged."""
        return tp not in self.processed or self.tracker.acked(tp) >= self.processed[tp]

    def commit_final(
        self, source: Source, timeout_s: float, offsets: dict[TopicPartition, int] | None = None
    ) -> None:
        """Commit what was acknowledged (or ``offsets``) and wait (shutdown); a failure is
        logged."""
        if offsets is None:
            offsets = self.tracker.uncommitted(source.assigned)
        if not offsets:
            return
        try:
            source.commit(offsets, timeout_ms=int(timeout_s * 1000) or 1)
        except Exception as exc:
            self.telemetry.metrics.commit_failures.inc()
            log.warning("final commit failed (%s): those records will be re-read", exc)
            return
        self.committed(offsets)
        log.info("committed offsets %s", fmt_offsets(offsets))

    def commit_done(self, offsets: dict[TopicPartition, int], error: BaseException | None) -> None:
        """An asynchronous commit's result (the client calls it from a later poll)."""
        if error is not None:
            self.telemetry.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s); will retry", short(error))
            return
        self.committed(offsets)

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """The broker accepted these offsets (any commit path, the revoke one included)."""
        self.tracker.mark_committed(offsets)
        self.telemetry.metrics.commits.inc()

    # -- rebalances ----------------------------------------------------------------------

    def hand_over(
        self,
        revoked: set[TopicPartition],
        budget_s: float,
        checkpoint: Callable[[set[TopicPartition], float], dict[TopicPartition, int]] | None = None,
    ) -> dict[TopicPartition, int]:
        """Partitions are being revoked: the offsets to commit for them before they go.

        Outputs still in flight are flushed and accounted first, so those offsets cover
        everything this member did with the partitions. ``checkpoint`` (the changelog on)
        then persists the keys' rows and says which offsets may be committed. Runs in the
        rebalance listener: a failure is logged, never raised into kafka-python.
        """
        started = time.monotonic()
        if self.sink is not None:
            self.sink.flush(budget_s)
        try:
            self.check_acks()
        except Exception:
            log.exception("accounting acknowledgements during a rebalance")
        offsets = self.tracker.uncommitted(revoked)
        if checkpoint is not None:
            try:
                offsets = checkpoint(revoked, max(0.0, budget_s - (time.monotonic() - started)))
            except Exception:
                log.exception("writing the state changelog during a rebalance")
                offsets = {}
        self.forget(revoked)
        return offsets

    def drop(self, lost: set[TopicPartition]) -> None:
        """Partitions were lost (membership expired): never commit them again."""
        self.forget(lost)

    def forget(self, partitions: set[TopicPartition]) -> None:
        self.tracker.forget(partitions)
        for tp in partitions:
            self.processed.pop(tp, None)

    def close_sink(self, timeout_s: float) -> None:
        if self.sink is not None:
            self.sink.close(timeout_s=timeout_s)
            self.sink = None
