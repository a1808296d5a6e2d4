"""The state half of the commit protocol: changed key rows to the changelog, then offsets.

Each commit interval (``kafka.commit_interval_ms``)::

    S = the changed rows (and tombstones of evicted keys) as they are now, with the input
        offsets they reflect (everything sent so far) and a barrier: the tickets sent so far
    wait until every ticket up to the barrier is acknowledged (outputs of all S reflects)
    produce S to the changelog (partition = the key's input partition), wait for its acks
    commit S's input offsets

Why no prediction is lost: a row reaches the changelog only once the outputs of every
event it reflects were acknowledged, so when a restart skips the re-read events at or
below a key's stored offset (:meth:`streamlstm.state.KeyedState.applied`), their outputs
are already in the output topic. Why no event is applied twice or missed: offsets are
committed only after the rows, so the restored state is never behind the committed
offset; a crash between the two leaves it ahead, and the skip covers that. A row written
before its outputs were acknowledged would be the bug: a crash would then skip events
whose outputs never arrived.

The loop never waits for this: S is taken in one pass over the table and produced by the
producer process like the outputs, and events keep flowing while S waits for its barrier
(newer changes mark their rows again, for the next S). One S is pending or in flight at a
time, so two versions of a key are never in flight together and land in order.

Rebalances and shutdown take the synchronous path, :meth:`StateLog.checkpoint`: outputs
flushed, rows written and flushed, and only partitions whose outputs and rows were all
acknowledged are committed; rows that could not be written are marked changed again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from streamlstm.daemon.delivery import MAX_BACKOFF_SECONDS, SEND_ATTEMPTS, Delivery, Fatal
from streamlstm.io import Source, Ticket, TopicPartition
from streamlstm.io.changelog import encode, groups
from streamlstm.metrics import Metrics
from streamlstm.state import KeyedState

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Snapshot:
    """Changelog records (tombstones first), and what committing after them allows."""

    keys: list[str]
    partitions: list[int]
    values: list[bytes | None]  # None: a tombstone
    ends: dict[TopicPartition, int]  # input offsets S reflects
    barrier: int  # tickets (outputs) that must be acknowledged before S is written
    taken: float  # monotonic
    ticket: Ticket | None = None  # while in flight
    attempts: int = 0
    retry_at: float = 0.0

    def __len__(self) -> int:
        return len(self.keys)

    def split(self, keep: set[int]) -> Snapshot:
        """Keep the records of partitions ``keep``; return the others as a snapshot."""
        inside = [p in keep for p in self.partitions]
        out = Snapshot(*_pick(self, [not i for i in inside]), self.ends, self.barrier, self.taken)
        self.keys, self.partitions, self.values = _pick(self, inside)
        return out

    def extend(self, other: Snapshot) -> None:
        """Append ``other``'s records (newer) after these."""
        self.keys += other.keys
        self.partitions += other.partitions
        self.values += other.values

    def size(self) -> int:
        return sum(len(v) for v in self.values if v is not None)


def _pick(s: Snapshot, mask: list[bool]) -> tuple[list[str], list[int], list[bytes | None]]:
    rows = [i for i, m in enumerate(mask) if m]
    return [s.keys[i] for i in rows], [s.partitions[i] for i in rows], [s.values[i] for i in rows]


class StateLog:
    """Writes changed key rows to ``topic`` and commits input offsets after them."""

    def __init__(self, topic: str, store: KeyedState, delivery: Delivery, metrics: Metrics):
        self.topic = topic
        self.store = store
        store.evicted = []  # evictions become tombstones
        self.delivery = delivery
        self.metrics = metrics
        self.fingerprint = store.layout.fingerprint
        self.owned: set[int] = set()  # input partitions whose keys this member writes
        self.snapshot: Snapshot | None = None  # pending (no ticket) or in flight

    # -- the loop's path -----------------------------------------------------------------

    def advance(self, source: Source, due: bool) -> None:
        """Move the protocol on (every turn; cheap): take, send, retry or finish S."""
        snap = self.snapshot
        if snap is None:
            if due:
                self.snapshot = self.take()
            return
        if snap.ticket is None:
            if self.delivery.collected >= snap.barrier:
                self._send(snap, source)
            return
        if not snap.ticket.done():
            return
        if snap.ticket.failed:
            self._retry(snap)
        else:
            self._finish(snap, source)

    def take(self) -> Snapshot:
        """The rows changed since the last take and the keys evicted since, as records."""
        slots = self.store.take_dirty()
        keys, parts, rows, last_ts, offset = self.store.rows_of(slots)
        values: list[bytes | None] = list(encode(self.fingerprint, rows, last_ts, offset))
        evicted = self.store.evicted or []
        dead_keys = [k for ks, _ in evicted for k in ks]
        dead_parts = [p for _, ps in evicted for p in ps]
        evicted.clear()
        tombstones: list[bytes | None] = [None] * len(dead_keys)
        return Snapshot(
            dead_keys + keys,
            dead_parts + parts.tolist(),
            tombstones + values,
            dict(self.delivery.processed),
            self.delivery.sent,
            time.monotonic(),
        )

    def _send(self, snap: Snapshot, source: Source) -> None:
        snap.split(self.owned)  # a partition gone since is its new owner's to write
        if not len(snap):
            self._finish(snap, source)
            return
        snap.ticket = Ticket(ends={}, polled_at=time.time())
        self._produce(snap)

    def _produce(self, snap: Snapshot) -> None:
        assert self.delivery.sink is not None and snap.ticket is not None
        records = groups(self.topic, snap.keys, snap.partitions, snap.values)
        self.delivery.sink.send(snap.ticket, records)

    def _retry(self, snap: Snapshot) -> None:
        """Send every record of S again (a repeat is harmless: same values, same order)."""
        assert snap.ticket is not None
        now = time.monotonic()
        if now < snap.retry_at:
            return
        _, errors, retriable = snap.ticket.take_failed()
        snap.attempts += 1
        shown = "; ".join(sorted(set(errors))[:3])
        self.metrics.broker_errors.labels("changelog").inc()
        if not retriable and snap.attempts >= SEND_ATTEMPTS:
            raise Fatal(
                f"the state changelog {self.topic!r} refused records {snap.attempts} times "
                f"({shown}); stopping without committing past them"
            )
        snap.retry_at = now + min(0.5 * snap.attempts, MAX_BACKOFF_SECONDS)
        log.warning("changelog records not acknowledged (%s); sending them again", shown)
        self._produce(snap)

    def _finish(self, snap: Snapshot, source: Source) -> None:
        """S is in the changelog: count it, commit its input offsets."""
        self.snapshot = None
        self._count(snap)
        offsets = {
            tp: off
            for tp, off in snap.ends.items()
            if tp.partition in self.owned and tp in source.assigned
        }
        if offsets:
            source.commit_async(offsets, self.delivery.commit_done)

    def _count(self, snap: Snapshot) -> None:
        self.metrics.changelog_records.inc(len(snap))
        self.metrics.changelog_bytes.inc(snap.size())
        self.metrics.state_commit_seconds.observe(time.monotonic() - snap.taken)

    # -- rebalances and shutdown ---------------------------------------------------------

    def checkpoint(self, partitions: set[TopicPartition], budget_s: float) -> dict:
        """Write every change so far and wait; the offsets of ``partitions`` now safe to
        commit. The caller flushed and accounted the outputs first."""
        deadline = time.monotonic() + budget_s
        caught_up = {tp.partition for tp in self.delivery.processed if self.delivery.caught_up(tp)}
        idle = {p for p in self.owned if p not in {tp.partition for tp in self.delivery.processed}}
        safe = caught_up | idle  # every output of what they reflect is acknowledged
        snap, fresh = self.snapshot, self.take()
        self.snapshot = None
        ticket = snap.ticket if snap is not None else None
        if snap is not None and ticket is not None and ticket.done() and not ticket.failed:
            self._count(snap)
            snap = None  # written already
        if snap is None:
            snap = fresh
        else:
            snap.extend(fresh)  # older versions first, so the newest lands last
        snap.split(self.owned)
        unsafe = snap.split(safe & self.owned)
        self._remark(unsafe)
        if len(snap) and not self._write_now(snap, deadline):
            self._remark(snap)
            return {}
        return {
            tp: self.delivery.processed[tp]
            for tp in partitions
            if tp.partition in safe and tp in self.delivery.processed
        }

    def _write_now(self, snap: Snapshot, deadline: float) -> bool:
        sink = self.delivery.sink
        if sink is None:
            return False
        snap.ticket = Ticket(ends={}, polled_at=time.time())
        try:
            self._produce(snap)
            sink.flush(max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            log.warning("state changelog: %s", exc)
            return False
        ok = snap.ticket.done() and not snap.ticket.failed
        if ok:
            self._count(snap)
        else:
            log.warning(
                "%d changelog records were not acknowledged in time: offsets not committed",
                len(snap),
            )
        return ok

    def _remark(self, snap: Snapshot) -> None:
        """Records that were not written: mark the rows changed again (tombstones queued
        again), so the next write carries them."""
        store = self.store
        for key, part, value in zip(snap.keys, snap.partitions, snap.values, strict=True):
            slot = store.slot(key)
            if value is None:
                if store.evicted is not None and slot is None:
                    store.evicted.append(([key], [part]))
            elif slot is not None and int(store.partition[slot]) == part:
                store.dirty[slot] = True

    def drop(self, partitions: set[int]) -> None:
        """Partitions moved away or were lost: never write their keys again."""
        self.owned -= partitions
