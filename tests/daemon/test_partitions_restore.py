"""Restore and the skip rule with a fake changelog reader (no broker)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import unit_daemon_settings
from kafka import TopicPartition

import streamlstm.daemon.partitions as partitions_module
from streamlstm.daemon import Daemon
from streamlstm.daemon.delivery import Fatal
from streamlstm.daemon.partitions import Partitions
from streamlstm.io.changelog import Restored, encode

TOPIC = "in"


class _Reader:
    """Serves prepared changelog partitions; fails the first ``failures`` reads."""

    def __init__(self, data: dict[int, Restored], failures: int = 0) -> None:
        self.data = data
        self.failures = failures
        self.reads: list[int] = []

    def read(
        self, partition: int, timeout_s: float, progress: object = None, start: int | None = None
    ) -> Restored:
        self.reads.append(partition)
        if self.failures:
            self.failures -= 1
            raise TimeoutError("broker away")
        return self.data.get(partition, Restored())

    def partitions(self) -> set[int]:
        return {0, 1, 2}

    def log_start(self, topic: str, partition: int) -> int:
        return 0

    def close(self) -> None:
        pass


def _serve(monkeypatch: pytest.MonkeyPatch, fake: object) -> None:
    """The daemon's changelog reads go to ``fake`` (no client is built)."""
    monkeypatch.setattr(partitions_module, "make_reader", lambda kafka: None)
    monkeypatch.setattr(partitions_module, "ChangelogReader", lambda topic, reader: fake)


def _daemon() -> Daemon:
    return Daemon(unit_daemon_settings(TOPIC))


def _source() -> SimpleNamespace:
    return SimpleNamespace(
        topic=TOPIC, consumer=SimpleNamespace(committed=lambda tp: 0), assigned=set()
    )


def _changelog(daemon: Daemon, rows: dict[str, int]) -> Restored:
    """One record per key, its row reflecting offset ``rows[key]``, plus junk and a tombstone."""
    store = daemon.engine.store
    n = len(rows)
    values = encode(
        store.layout.fingerprint,
        np.full((n, store.layout.width), 0.5, np.float32),
        np.zeros(n),
        np.array(list(rows.values())),
    )
    return Restored(keys=[*rows, "junk"], values=[*values, b"\x00" * 9], records=n + 2)


def test_restore_loads_rows_and_skips_applied_events(monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = _daemon()
    parts = daemon.partitions
    reader = _Reader({1: _changelog(daemon, {"a": 10, "b": 3})})
    _serve(monkeypatch, reader)
    parts.assigned({TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)})
    assert parts.queued == [0, 1]
    parts.restore(_source())  # type: ignore[arg-type]
    assert parts.queued == [] and reader.reads == [0, 1]
    store = daemon.engine.store
    assert sorted(store.keys()) == ["a", "b"] and int(store.offset[store.slot("a")]) == 10
    assert daemon.metrics.changelog_rejected._value.get() == 1  # the junk record, counted
    # Re-read events: at or below the key's offset (same partition) are skipped.
    keys = ["a", "a", "b", "b", "c"]
    asked: list[int] = []

    def ends(partition: int) -> int:  # the fetches' high watermark
        asked.append(partition)
        return 500

    mask = parts.skip(keys, np.array([1, 1, 1, 1, 1]), np.array([9, 11, 3, 4, 2]), ends)
    assert mask is not None and mask.tolist() == [True, False, True, False, False]
    assert daemon.metrics.events_skipped._value.get() == 2
    assert parts.skip(["b"], np.array([1]), np.array([3]), ends) is not None
    assert asked == [1]  # the partition's end is confirmed once
    # Once a partition's polled offsets pass every restored offset, nothing is checked.
    assert parts.skip(["a"], np.array([1]), np.array([11]), ends) is None
    assert 1 not in parts.horizon


def _restored(monkeypatch: pytest.MonkeyPatch) -> tuple[Daemon, Partitions]:
    """Keys a (offset 10) and b (3) restored on partition 1."""
    daemon = _daemon()
    parts = daemon.partitions
    _serve(monkeypatch, _Reader({1: _changelog(daemon, {"a": 10, "b": 3})}))
    parts.assigned({TopicPartition(TOPIC, 1)})
    parts.restore(_source())  # type: ignore[arg-type]
    return daemon, parts


@pytest.mark.parametrize("end", [10, 4, 0])
def test_a_partition_ending_at_or_below_the_restored_offsets_skips_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, end: int
) -> None:
    """The input topic was recreated (or lost its tail): offsets 0.. are new events, not
    the ones the restored keys reflect; skipping them would drop them silently."""
    daemon, parts = _restored(monkeypatch)
    offsets = np.array([0, 1, 2, 3])
    with caplog.at_level("ERROR"):
        got = parts.skip(["a", "b", "a", "b"], np.ones(4, int), offsets, lambda p: end)
    assert got is None and 1 not in parts.horizon
    assert daemon.metrics.events_skipped._value.get() == 0
    assert f"input offsets up to 10, but the partition ends at {end}" in caplog.text
    assert parts.skip(["a"], np.array([1]), np.array([5]), lambda p: 1 / 0) is None


def test_an_unknown_partition_end_skips_as_before_and_is_asked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, parts = _restored(monkeypatch)
    ends = iter([None, 11])
    mask = parts.skip(["a", "b"], np.array([1, 1]), np.array([2, 3]), lambda p: next(ends))
    assert mask is not None and mask.tolist() == [True, True]
    mask = parts.skip(["a", "b"], np.array([1, 1]), np.array([4, 5]), lambda p: next(ends))
    assert mask is not None and mask.tolist() == [True, False]  # 11 > 10: confirmed
    assert parts.confirmed == {1}


def test_impossible_records_are_rejected_counted_and_those_keys_start_afresh(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = _daemon()
    store = daemon.engine.store
    width, now = store.layout.width, time.time()
    rows = np.full((5, width), 0.5, np.float32)
    rows[1, -1] = np.nan
    recurrent = store.layout.columns["recurrent"]
    rows[4, recurrent] = np.full(2 * (recurrent.stop - recurrent.start), np.inf, np.float16).view(
        np.float32
    )  # the float16 state: infinities a float32 check cannot see
    ts = np.array([-2e9, 0.0, now + 30 * 86_400, now, now])  # old, -, a month ahead, now, now
    values = encode(store.layout.fingerprint, rows, ts, np.array([1, 2, 3, 4, 5]))
    keys = ["old", "nan", "future", "now", "half"]
    reader = _Reader({0: Restored(keys=[*keys, "short"], values=[*values, values[0][:-4]])})
    _serve(monkeypatch, reader)
    daemon.partitions.assigned({TopicPartition(TOPIC, 0)})
    daemon.partitions.restore(_source())  # type: ignore[arg-type]
    assert sorted(store.keys()) == ["now", "old"]
    assert float(store.last_ts[store.slot("old")]) == -2e9
    assert daemon.metrics.changelog_rejected._value.get() == 4
    assert "3 records hold impossible values" in caplog.text
    assert "1 records written by another row layout" in caplog.text


def test_a_revoke_before_the_restore_ran_takes_it_off_the_queue() -> None:
    daemon = _daemon()
    parts = daemon.partitions
    p0, p1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
    parts.assigned({p0, p1})
    parts.lost({p1})
    assert parts.queued == [0]
    daemon.delivery.sink = SimpleNamespace(flush=lambda t: True, poll_acks=lambda: None)
    parts.revoke({p0}, 0.1)
    assert parts.queued == []


def test_a_failing_restore_is_retried_then_stops_the_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(partitions_module.time, "sleep", lambda s: None)
    daemon = _daemon()
    reader = _Reader({}, failures=2)
    _serve(monkeypatch, reader)
    daemon.partitions.assigned({TopicPartition(TOPIC, 0)})
    daemon.partitions.restore(_source())  # type: ignore[arg-type]
    assert reader.reads == [0, 0, 0]
    reader.failures = 5
    daemon.partitions.assigned({TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 2)})
    with pytest.raises(Fatal):
        daemon.partitions.restore(_source())  # type: ignore[arg-type]


def test_changelog_off_restores_nothing() -> None:
    daemon = Daemon(unit_daemon_settings(TOPIC, **{"state.changelog": "false"}))
    daemon.partitions.assigned({TopicPartition(TOPIC, 0)})
    assert daemon.partitions.statelog is None and daemon.partitions.queued == []


def test_a_changelog_without_the_partition_stops_the_daemon_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon = _daemon()
    reader = _Reader({})
    _serve(monkeypatch, reader)
    daemon.partitions.assigned({TopicPartition(TOPIC, 5)})
    with pytest.raises(Fatal, match="no partition 5"):
        daemon.partitions.restore(_source())  # type: ignore[arg-type]
    assert reader.reads == []
