"""Local snapshots (``state.dir``): only ever an accelerator of the changelog restore."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import unit_daemon_settings
from kafka import TopicPartition

import streamlstm.daemon.partitions as partitions_module
import streamlstm.learning.checkpoint as checkpoint_module
from streamlstm.daemon import Daemon
from streamlstm.daemon.localstate import (
    SnapshotError,
    read_snapshot,
    snapshot_path,
    write_snapshot,
)
from streamlstm.io.changelog import Restored, encode

TOPIC = "in"
LOG = str(unit_daemon_settings(TOPIC).changelog_topic)  # the daemon's default name


class _Log:
    """One changelog partition as a list of records; reads from any offset."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None]] = []
        self.starts: list[int | None] = []

    def read(
        self, partition: int, timeout_s: float, progress: object = None, start: int | None = None
    ) -> Restored:
        self.starts.append(start)
        latest = dict(self.records[start or 0 :])
        out = Restored(records=len(self.records) - (start or 0), end=len(self.records))
        for key, value in latest.items():
            if value is None:
                out.deleted.append(key)
            else:
                out.keys.append(key)
                out.values.append(value)
        return out

    def bounds(self, partition: int) -> tuple[int, int]:
        return 0, len(self.records)

    def partitions(self) -> set[int]:
        return {0}

    def log_start(self, topic: str, partition: int) -> int:
        return 0

    def close(self) -> None:
        pass


def _serve(monkeypatch: pytest.MonkeyPatch, fake: object) -> None:
    """The daemon's changelog reads go to ``fake`` (no client is built)."""
    monkeypatch.setattr(partitions_module, "make_reader", lambda kafka: None)
    monkeypatch.setattr(partitions_module, "ChangelogReader", lambda topic, reader: fake)


def _daemon(folder: Path) -> Daemon:
    return Daemon(unit_daemon_settings(TOPIC, **{"state.dir": str(folder)}))


def _write(log: _Log, daemon: Daemon, key: str, value: float | None, offset: int = 0) -> None:
    if value is None:
        log.records.append((key, None))
        return
    layout = daemon.engine.store.layout
    row = np.full((1, layout.width), value, np.float32)
    log.records.append((key, encode(layout.fingerprint, row, np.zeros(1), np.array([offset]))[0]))


def _restore(daemon: Daemon, log: _Log, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    _serve(monkeypatch, log)
    source = SimpleNamespace(topic=TOPIC, consumer=SimpleNamespace(committed=lambda tp: 0))
    daemon.partitions.assigned({TopicPartition(TOPIC, 0)})
    daemon.partitions.restore(source)  # type: ignore[arg-type]
    store = daemon.engine.store
    return {k: float(store.table[store.slot(k), 0]) for k in store.keys()}  # noqa: SIM118 (no __iter__)


def _snapshot_now(daemon: Daemon, log: _Log, monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch, log)
    parts = daemon.partitions
    parts.save_local(parts.local_ends({TopicPartition(TOPIC, 0): 1}))


def test_a_stale_snapshot_and_the_tail_equal_a_full_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _Log()
    first = _daemon(tmp_path)
    for key, value in [("a", 1), ("b", 2), ("c", 3), ("a", 4), ("d", 5)]:
        _write(log, first, key, value)
    assert _restore(first, log, monkeypatch) == {"a": 4, "b": 2, "c": 3, "d": 5}
    _snapshot_now(first, log, monkeypatch)
    assert snapshot_path(tmp_path, LOG, 0).exists()
    # Written after the snapshot (e.g. by another member): updates, a tombstone, a new
    # key, and a record of a layout this build rejects.
    _write(log, first, "a", 6)
    _write(log, first, "b", None)
    _write(log, first, "e", 7)
    log.records.append(("c", b"junk"))
    full = _restore(_daemon(tmp_path / "none"), log, monkeypatch)
    fast = _restore(_daemon(tmp_path), log, monkeypatch)
    assert log.starts[-2:] == [None, 5]  # the second read started at the snapshot's offset
    assert fast == full == {"a": 6, "d": 5, "e": 7}


def _stored(tmp_path: Path, **overrides: object) -> dict[str, object]:
    args: dict[str, object] = dict(
        directory=tmp_path, topic=LOG, partition=0, fingerprint=7, changelog_offset=3,
        keys=["a"], rows=np.ones((1, 2), np.float32), last_ts=np.zeros(1), offset=np.ones(1),
    )  # fmt: skip
    args.update(overrides)
    write_snapshot(**args)  # type: ignore[arg-type]
    return args


def test_a_snapshot_of_another_layout_or_partition_is_refused(tmp_path: Path) -> None:
    _stored(tmp_path)
    assert read_snapshot(tmp_path, LOG, 0, fingerprint=7, width=2) is not None
    with pytest.raises(SnapshotError, match="written for"):
        read_snapshot(tmp_path, LOG, 0, fingerprint=8, width=2)
    with pytest.raises(SnapshotError, match="do not line up"):
        read_snapshot(tmp_path, LOG, 0, fingerprint=7, width=3)
    assert read_snapshot(tmp_path, LOG, 1, fingerprint=7, width=2) is None


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_snapshot_is_refused(tmp_path: Path, damage: str) -> None:
    _stored(tmp_path, rows=np.arange(2000, dtype=np.float32).reshape(1000, 2), keys=[
        f"k{i}" for i in range(1000)], last_ts=np.zeros(1000), offset=np.ones(1000))  # fmt: skip
    path = snapshot_path(tmp_path, LOG, 0)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="unreadable"):
        read_snapshot(tmp_path, LOG, 0, fingerprint=7, width=2)


@pytest.mark.parametrize(
    "bad", [{"rows": np.array([[1.0, np.nan]], np.float32)}, {"last_ts": np.array([1e300])},
            {"last_ts": np.array([np.nan])}, {"offset": np.array([-7])}],
)  # fmt: skip
def test_a_snapshot_with_an_impossible_row_is_refused_whole(
    tmp_path: Path, bad: dict[str, np.ndarray]
) -> None:
    _stored(tmp_path, last_ts=np.array([-5e10]))  # old: fine
    assert read_snapshot(tmp_path, LOG, 0, fingerprint=7, width=2) is not None
    _stored(tmp_path, **bad)
    with pytest.raises(SnapshotError, match="impossible values"):
        read_snapshot(tmp_path, LOG, 0, fingerprint=7, width=2)


def test_an_impossible_tail_record_drops_the_snapshot_row_as_a_full_read_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _Log()
    first = _daemon(tmp_path)
    _write(log, first, "a", 1)
    _write(log, first, "b", 2)
    _restore(first, log, monkeypatch)
    _snapshot_now(first, log, monkeypatch)
    _write(log, first, "a", np.inf)  # written after the snapshot, impossible
    full = _restore(_daemon(tmp_path / "none"), log, monkeypatch)
    fast = _restore(_daemon(tmp_path), log, monkeypatch)
    assert log.starts[-1] == 2 and fast == full == {"b": 2}


def test_an_old_snapshot_is_refused(tmp_path: Path) -> None:
    _stored(tmp_path)
    with pytest.raises(SnapshotError, match="old"):
        read_snapshot(
            tmp_path, LOG, 0, 7, 2, now=os.path.getmtime(tmp_path / f"{LOG}-0.snap") + 1e6
        )


def test_the_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stored(tmp_path, changelog_offset=3)

    def crash(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        _stored(tmp_path, changelog_offset=9)
    snap = read_snapshot(tmp_path, LOG, 0, fingerprint=7, width=2)
    assert snap is not None and snap.changelog_offset == 3  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == [f"{LOG}-0.snap"]  # no temp file left


def test_unusable_snapshots_mean_a_full_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = _Log()
    daemon = _daemon(tmp_path)
    _write(log, daemon, "a", 1)
    layout = daemon.engine.store.layout
    rows = np.full((1, layout.width), 9, np.float32)
    # Beyond the log's end (the changelog was recreated): ignored, loudly.
    write_snapshot(tmp_path, LOG, 0, layout.fingerprint, 50, ["z"], rows, [0.0], [0])
    assert _restore(daemon, log, monkeypatch) == {"a": 1} and log.starts == [None]
    assert "outside the log's offsets" in caplog.text
    # Damaged: ignored, loudly.
    snapshot_path(tmp_path, LOG, 0).write_bytes(b"PK\x03\x04 not a snapshot")
    assert _restore(_daemon(tmp_path), log, monkeypatch) == {"a": 1} and log.starts[-1] is None
    assert "unreadable" in caplog.text


def test_no_snapshot_of_a_partition_with_unwritten_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _Log()
    daemon = _daemon(tmp_path)
    _write(log, daemon, "a", 1)
    _restore(daemon, log, monkeypatch)
    store = daemon.engine.store
    store.dirty[store.slot("a")] = True  # changed since the changelog last had it
    _snapshot_now(daemon, log, monkeypatch)
    assert not snapshot_path(tmp_path, LOG, 0).exists()
