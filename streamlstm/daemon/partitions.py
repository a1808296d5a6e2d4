"""Partition ownership: keys come in with a partition (restored) and go out with it.

The client calls the rebalance callbacks while the loop waits in ``poll()``
(kafka-python on its I/O thread, librdkafka inside ``consume()``), so they only account
and queue: revoked partitions are flushed, their rows written to the changelog and their
offsets committed (:meth:`Partitions.revoke`); newly assigned ones are queued, and the
loop restores them (:meth:`Partitions.restore`) right after that ``poll()`` returns and
*before* it processes any record: a record of a partition is never applied to a key
whose state is not loaded yet. While a restore
runs, nothing polls, so no rebalance can interleave with it; a partition revoked before
its queued restore ran is simply taken off the queue.

Restoring reads the changelog partition with a consumer outside the group from its start
to the high watermark of the fetch responses (never compaction-dependent: the last record
of a key wins, a tombstone deletes), then loads the rows. Re-read events at or below a
restored key's offset are skipped (:meth:`Partitions.skip`), checked only while a
partition's polled offsets can still be at or below the highest restored offset. Unless
the partition's first fetch shows it ends at or below that offset: the events the keys
reflect are not in it (the input topic was recreated, or an unclean leader election cut
its tail), so its events are all new to them and none is skipped. The end is the fetch
response's high watermark, never a separate end-offsets request (some brokers
under-count those). A new leader can briefly report a lower high watermark; that false
alarm re-applies re-read events (at-least-once, as without a changelog), never drops any.

With ``state.dir`` set, a partition's local snapshot (:mod:`streamlstm.daemon.localstate`)
is loaded first and only the changelog from its offset on is read; any doubt about it
means a full read. Snapshots are written at a graceful shutdown only (a deploy or restart):
not on revoke, where an eager rebalance would write every partition while the whole group
waits; after a crash the last snapshot still holds, with a longer tail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from streamlstm.config import Settings
from streamlstm.daemon.delivery import Delivery, Fatal, short
from streamlstm.daemon.localstate import (
    LocalSnapshot,
    SnapshotError,
    apply_tail,
    read_snapshot,
    write_snapshot,
)
from streamlstm.daemon.statelog import StateLog
from streamlstm.daemon.telemetry import Telemetry
from streamlstm.io import Source, TopicPartition, make_reader
from streamlstm.io.changelog import ChangelogReader, Check, decode, max_restored_ts, plausible
from streamlstm.state import KeyedState

log = logging.getLogger(__name__)

RESTORE_ATTEMPTS = 3


class Partitions:
    """The input partitions this member holds, and their keys' way in and out."""

    def __init__(
        self,
        settings: Settings,
        store: KeyedState,
        delivery: Delivery,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.store = store
        self.delivery = delivery
        self.telemetry = telemetry
        self.metrics = telemetry.metrics
        topic = settings.changelog_topic
        self.statelog = StateLog(topic, store, delivery, self.metrics) if topic else None
        self.owned: set[int] = set()
        self.queued: list[int] = []  # assigned, not restored yet
        self.horizon: dict[int, int] = {}  # partition -> highest offset a held key reflects
        self.confirmed: set[int] = set()  # horizons the partition's fetched end is above
        self.reader: ChangelogReader | None = None
        self.beat: Callable[[], None] | None = None  # the loop's liveness, while restoring

    # -- rebalance callbacks (while the loop waits in poll) -------------------------------

    def revoke(self, revoked: set[TopicPartition], budget_s: float) -> dict[TopicPartition, int]:
        """Flush, write the changelog, say what to commit; the keys stay until the new set."""
        checkpoint = self.statelog.checkpoint if self.statelog else None
        offsets = self.delivery.hand_over(revoked, budget_s, checkpoint)
        self.queued = [p for p in self.queued if p not in {tp.partition for tp in revoked}]
        return offsets

    def assigned(self, assigned: set[TopicPartition]) -> None:
        """The whole new assignment (eager protocol: a partition given straight back keeps
        its keys); partitions new to this member are queued for restoring."""
        parts = {tp.partition for tp in assigned}
        self.metrics.rebalances.inc()
        self.metrics.partitions_owned.set(len(parts))
        self.forget(self.owned - parts)
        new = parts - self.owned
        self.owned = parts
        if self.statelog is not None:
            self.statelog.owned = set(parts)
            for p in parts - new:  # kept in memory: maybe ahead of the committed offset
                self._set_horizon(p)
            self.queued += sorted(new - set(self.queued))

    def lost(self, lost: set[TopicPartition]) -> None:
        """Membership expired: another member owns these now, from their last commit."""
        self.delivery.drop(lost)
        gone = {tp.partition for tp in lost}
        self.forget(gone)
        self.owned -= gone
        self.metrics.partitions_owned.set(len(self.owned))

    def forget(self, partitions: set[int]) -> None:
        """Drop the key state and lag series of partitions another member now owns."""
        if self.statelog is not None:
            self.statelog.drop(partitions)
        self.queued = [p for p in self.queued if p not in partitions]
        for partition in sorted(partitions):
            self.horizon.pop(partition, None)
            dropped = self.store.drop_partition(partition)
            self.telemetry.forget_partition(partition)
            log.info("partition %d moved away: forgot %d keys", partition, len(dropped))

    # -- the loop --------------------------------------------------------------------------

    def restore(self, source: Source) -> None:
        """Restore every queued partition still assigned (the loop, after ``poll``)."""
        while self.queued:
            partition = self.queued[0]
            for attempt in range(1, RESTORE_ATTEMPTS + 1):
                try:
                    self._restore(partition, source)
                    break
                except Fatal:
                    raise
                except Exception as exc:
                    self.metrics.broker_errors.labels("restore").inc()
                    if attempt == RESTORE_ATTEMPTS:
                        raise Fatal(f"restoring partition {partition} failed") from exc
                    log.warning("restoring partition %d: %s; retrying", partition, short(exc))
                    self._close_reader()
                    time.sleep(0.5 * attempt)
            self.queued.pop(0)

    def _restore(self, partition: int, source: Source) -> None:
        topic = self.settings.changelog_topic
        assert topic is not None and self.statelog is not None
        started = time.monotonic()
        reader = self._reader()
        known = reader.partitions()
        if known is not None and partition not in known:
            raise Fatal(
                f"the changelog {topic!r} has no partition {partition} (it has {len(known)}): "
                "it needs one per input partition; recreate it with the input's count"
            )
        timeout = self.settings.state.restore_timeout_seconds
        local = self._local(partition)
        start = None if local is None else local.changelog_offset
        read = reader.read(partition, timeout, self.beat, start=start)
        width = self.store.layout.width
        max_ts, check = self._check()
        rows = decode(read.values, self.statelog.fingerprint, width, check)
        rejected = int((~rows.ok).sum())
        keys = [k for k, ok in zip(read.keys, rows.ok.tolist(), strict=True) if ok]
        parts = [(keys, rows.rows, rows.last_ts, rows.offset)]
        if local is not None:
            bad = [k for k, ok in zip(read.keys, rows.ok.tolist(), strict=True) if not ok]
            parts = apply_tail(local, *parts[0], gone=read.deleted + bad)
        for part in parts:
            self.store.load(*part, partition)
        keys = [k for part in parts for k in part[0]]
        self._set_horizon(partition)
        seconds = time.monotonic() - started
        self.metrics.restore_seconds.observe(seconds)
        self.metrics.restored_keys.inc(len(keys))
        if rejected:
            self.metrics.changelog_rejected.inc(rejected)
        if rejected - rows.invalid:
            log.error(
                "changelog %s[%d]: %d records written by another row layout or version "
                "(an upgrade changed what a key's row holds): those keys start afresh",
                *(topic, partition, rejected - rows.invalid),
            )
        if rows.invalid:
            log.warning(
                "changelog %s[%d]: %d records hold impossible values (NaN or infinity, an "
                "event time past %.0f or before year 1, a negative offset): those keys "
                "start afresh",
                *(topic, partition, rows.invalid, max_ts),
            )
        log.info(
            "partition %d: restored %d keys from %s%d changelog records (%d bytes, offsets "
            "%d..%d) in %.2fs",
            *(partition, len(keys), "a local snapshot and " if local else ""),
            *(read.records, read.bytes, read.start, read.end, seconds),
        )
        self._check_log_start(partition, source)

    def _check(self) -> tuple[float, Check]:
        """What a restored row must be (:func:`~streamlstm.io.changelog.plausible`): no
        event time past ``max_ts``; the float16 recurrent state checked as such."""
        layout = self.store.layout
        halves = layout.columns["recurrent"] if layout.recurrent_dtype.itemsize == 2 else None
        max_ts = max_restored_ts(self.settings.engine.max_future_seconds)
        return max_ts, partial(plausible, max_ts=max_ts, halves=halves)

    def _reader(self) -> ChangelogReader:
        if self.reader is None:
            assert self.settings.changelog_topic is not None
            reader = make_reader(self.settings.kafka)
            self.reader = ChangelogReader(self.settings.changelog_topic, reader)
        return self.reader

    def _local(self, partition: int) -> LocalSnapshot | None:
        """The partition's local snapshot if there is one and it can be trusted."""
        folder, topic = self.settings.state.dir, self.settings.changelog_topic
        if folder is None or topic is None:
            return None
        width, fingerprint = self.store.layout.width, self.store.layout.fingerprint
        try:
            snap = read_snapshot(
                folder, topic, partition, fingerprint, width, check=self._check()[1]
            )
        except SnapshotError as exc:
            log.error(
                "partition %d: local snapshot ignored, reading the whole changelog: %s",
                partition,
                exc,
            )
            return None
        if snap is None:
            return None
        bounds = self._reader().bounds(partition)
        if bounds is None or not bounds[0] <= snap.changelog_offset <= bounds[1]:
            log.error(
                "partition %d: local snapshot ignored, reading the whole changelog: it "
                "reflects changelog offset %d, outside the log's offsets %s (the topic was "
                "recreated, or retention removed records it needs)",
                *(partition, snap.changelog_offset, bounds),
            )
            return None
        return snap

    def local_ends(self, offsets: dict[TopicPartition, int]) -> dict[int, int]:
        """At shutdown, after the checkpoint and *before* leaving the group (a new owner's
        writes must not count): the changelog end of each partition it wrote in full."""
        if self.settings.state.dir is None or self.statelog is None:
            return {}
        pending = {p for _, parts in (self.store.evicted or []) for p in parts}
        ends = {}
        for partition in sorted({tp.partition for tp in offsets} & self.owned - pending):
            if bool(self.store.dirty[self.store.slots_of_partition(partition)].any()):
                continue  # rows not in the changelog: a snapshot would be ahead of it
            bounds = self._reader().bounds(partition)
            if bounds is not None:
                ends[partition] = bounds[1]
        return ends

    def save_local(self, ends: dict[int, int]) -> None:
        """Snapshot those partitions (after the clients closed: a slow disk delays nothing)."""
        folder, topic = self.settings.state.dir, self.settings.changelog_topic
        if folder is None or topic is None or self.statelog is None:
            return
        for partition, end in sorted(ends.items()):
            started = time.monotonic()
            keys, _, rows, last_ts, offset = self.store.rows_of(
                self.store.slots_of_partition(partition)
            )
            fingerprint = self.statelog.fingerprint
            try:
                path = write_snapshot(
                    folder, topic, partition, fingerprint, end, keys, rows, last_ts, offset
                )
            except Exception as exc:  # only an accelerator: never fail a shutdown for it
                log.warning("partition %d: local snapshot not written: %s", partition, exc)
                continue
            log.info(
                "partition %d: local snapshot of %d keys at changelog offset %d (%s, %.2fs)",
                *(partition, len(keys), end, path, time.monotonic() - started),
            )

    def _check_log_start(self, partition: int, source: Source) -> None:
        """Say so loudly when the group's offset is below the input's first offset."""
        assert self.reader is not None
        tp = TopicPartition(source.topic, partition)
        try:
            committed = source.committed(tp)
        except Exception as exc:
            log.debug("committed offset of %s: %s", tp, exc)
            return
        start = self.reader.log_start(source.topic, partition)
        if committed is not None and start is not None and committed < start:
            log.error(
                "partition %d: the committed offset %d is below the log start %d: events "
                "%d..%d were deleted (retention) before this group read them; the keys' "
                "state misses them",
                *(partition, committed, start, committed, start - 1),
            )

    def _set_horizon(self, partition: int) -> None:
        self.confirmed.discard(partition)
        slots = self.store.slots_of_partition(partition)
        if len(slots):
            self.horizon[partition] = int(self.store.offset[slots].max())
        else:
            self.horizon.pop(partition, None)

    def skip(
        self,
        keys: list[str],
        partition: np.ndarray,
        offset: np.ndarray,
        highwater: Callable[[int], int | None],
    ) -> np.ndarray | None:
        """Mask of events already applied (None: none can be). Counted. ``highwater``:
        a partition's end as its fetches report it (the source's)."""
        if not self.horizon:
            return None
        check = False
        for p, high in list(self.horizon.items()):
            mine = partition == p
            if not mine.any():
                continue
            if offset[mine].min() > high:
                del self.horizon[p]  # offsets only grow from here on
            elif p in self.confirmed or not self._beyond_end(p, high, highwater(p)):
                check = True
        if not check:
            return None
        applied = self.store.applied(keys, partition, offset)
        skipped = int(applied.sum())
        if skipped:
            self.metrics.events_skipped.inc(skipped)
        return applied if skipped else None

    def _beyond_end(self, partition: int, high: int, end: int | None) -> bool:
        """Whether the restored keys reflect offsets the partition does not hold (its
        horizon is then dropped: nothing of it is skipped). Unknown ``end``: asked again
        at the next batch."""
        if end is None:
            return False
        if high < end:
            self.confirmed.add(partition)
            return False
        del self.horizon[partition]
        log.error(
            "partition %d: the restored keys reflect input offsets up to %d, but the "
            "partition ends at %d: their events are not in it (the input topic was "
            "recreated, or lost its tail); none of its events is skipped as re-read",
            *(partition, high, end),
        )
        return True

    def _close_reader(self) -> None:
        if self.reader is not None:
            try:
                self.reader.close()
            except Exception as exc:
                log.debug("changelog reader close: %s", exc)
            self.reader = None

    def close(self) -> None:
        self._close_reader()
