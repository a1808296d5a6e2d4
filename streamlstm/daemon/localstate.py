"""Local snapshots of a partition's key rows: a restart reads only the changelog's tail.

Optional (``state.dir``; off by default, since a container's disk is often thrown away
with it and the changelog alone is always correct). One file per changelog partition,
``<topic>-<partition>.snap``: an uncompacted ``.npz`` (numpy, no pickle; zip CRCs catch a
flipped or truncated file) of the partition's keys, rows, last event times and input
offsets, the row layout fingerprint, and the *changelog offset* ``X`` it reflects.
Written with :func:`streamlstm.learning.checkpoint.write_atomic` (temp, fsync, rename).

Why snapshot + tail equals a full read: a snapshot is written only right after a
checkpoint acknowledged every row of the partition (none dirty, no tombstone pending), so
its rows are exactly the newest changelog value of each key, and ``X`` is the log end
measured after that, before this member leaves the group (a new owner's later records
must be read as tail, never counted below ``X``). For any key, the full read's answer
is its last record; if the key has a record at or above ``X`` the tail gives that same
record, otherwise its last record is below ``X`` and is what the snapshot holds. An
``X`` that is too *low* only makes the tail longer (still correct); so every doubt
(offset beyond the log end or below its start, another layout, a damaged file, too
old) means: ignore it, read all.

Too old: compaction deletes a tombstone after ``delete.retention.ms`` (Kafka's default:
24 h), and a snapshot older than that could bring back a key evicted since. Snapshots
older than :data:`MAX_AGE_SECONDS` are therefore ignored.

>>> import tempfile
>>> folder = tempfile.mkdtemp()
>>> rows = np.ones((2, 3), np.float32)
>>> _ = write_snapshot(folder, "in.state", 0, 7, 42, ["a", "b"], rows, np.zeros(2), np.ones(2))
>>> snap = read_snapshot(folder, "in.state", 0, fingerprint=7, width=3)
>>> snap.keys, snap.changelog_offset
(['a', 'b'], 42)
>>> parts = apply_tail(snap, ["c"], rows[:1], np.zeros(1), np.ones(1), gone=["a"])
>>> [part[0] for part in parts]
[['b'], ['c']]
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamlstm.io.changelog import Check, plausible
from streamlstm.learning.checkpoint import remove_stale_temp_files, write_atomic

FORMAT = 1
#: Half of Kafka's default ``delete.retention.ms`` (24 h): see the module's docstring.
MAX_AGE_SECONDS = 12 * 3600.0


class SnapshotError(ValueError):
    """A local snapshot that must not be used (the restore reads the whole changelog)."""


@dataclass
class LocalSnapshot:
    keys: list[str]
    rows: np.ndarray  # float32 [N, width]
    last_ts: np.ndarray  # float64 [N]
    offset: np.ndarray  # int64 [N], the input offset each row reflects
    changelog_offset: int  # X: the changelog end its rows were acknowledged up to


def snapshot_path(directory: str | Path, topic: str, partition: int) -> Path:
    return Path(directory) / f"{topic}-{partition}.snap"


def write_snapshot(
    directory: str | Path,
    topic: str,
    partition: int,
    fingerprint: int,
    changelog_offset: int,
    keys: list[str],
    rows: np.ndarray,
    last_ts: np.ndarray,
    offset: np.ndarray,
) -> Path:
    """Write the snapshot of ``topic[partition]`` atomically; returns its path."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    encoded = [k.encode("utf-8") for k in keys]
    buffer = io.BytesIO()
    np.savez(
        buffer,
        meta=np.array([FORMAT, partition, changelog_offset], np.int64),
        fingerprint=np.array([fingerprint], np.uint64),
        topic=np.frombuffer(topic.encode("utf-8"), np.uint8),
        key_lengths=np.fromiter(map(len, encoded), np.int64, len(encoded)),
        key_bytes=np.frombuffer(b"".join(encoded), np.uint8),
        rows=np.ascontiguousarray(rows, np.float32),
        last_ts=np.asarray(last_ts, np.float64),
        offset=np.asarray(offset, np.int64),
    )
    path = write_atomic(snapshot_path(folder, topic, partition), buffer.getbuffer(), ".snap")
    remove_stale_temp_files(folder)  # left by a writer killed mid-write
    return path


def read_snapshot(
    directory: str | Path,
    topic: str,
    partition: int,
    fingerprint: int,
    width: int,
    now: float | None = None,
    check: Check = plausible,
) -> LocalSnapshot | None:
    """The snapshot of ``topic[partition]``; None if there is none. Raises
    :class:`SnapshotError` for one that exists but must not be used, also one with a row
    the changelog's decoder would refuse (``check``, as
    :func:`~streamlstm.io.changelog.plausible`): a snapshot is never trusted in part."""
    path = snapshot_path(directory, topic, partition)
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if age > MAX_AGE_SECONDS:
        raise SnapshotError(f"{path} is {age / 3600:.1f} h old (tombstones may be compacted)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        fmt, part, changelog_offset = (int(v) for v in arrays["meta"])
        found = (fmt, part, bytes(arrays["topic"]).decode(), int(arrays["fingerprint"][0]))
        lengths, blob = arrays["key_lengths"], bytes(arrays["key_bytes"])
        rows = arrays["rows"].astype(np.float32, copy=False)
        last_ts = arrays["last_ts"].astype(np.float64, copy=False)
        offset = arrays["offset"].astype(np.int64, copy=False)
    except Exception as exc:  # truncated, flipped, not ours: never trusted
        raise SnapshotError(f"{path} is unreadable: {type(exc).__name__}: {exc}") from exc
    if found != (FORMAT, partition, topic, fingerprint):
        raise SnapshotError(
            f"{path} was written for (format, partition, topic, layout) {found}, "
            f"not {(FORMAT, partition, topic, fingerprint)}"
        )
    n = len(lengths)
    if rows.shape != (n, width) or len(last_ts) != n or len(offset) != n:
        raise SnapshotError(f"{path}: arrays of {n} keys do not line up (row width {width})")
    if int(lengths.sum()) != len(blob) or changelog_offset < 0:
        raise SnapshotError(f"{path}: inconsistent key bytes or changelog offset")
    bad = int((~check(rows, last_ts, offset)).sum())
    if bad:
        raise SnapshotError(f"{path}: {bad} rows hold impossible values (NaN, time, offset)")
    ends = np.cumsum(lengths).tolist()
    keys = [blob[a:b].decode("utf-8") for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    return LocalSnapshot(keys, rows, last_ts, offset, changelog_offset)


def apply_tail(
    snap: LocalSnapshot,
    keys: list[str],
    rows: np.ndarray,
    last_ts: np.ndarray,
    offset: np.ndarray,
    gone: list[str],
) -> list[tuple[list[str], np.ndarray, np.ndarray, np.ndarray]]:
    """The rows to load: the snapshot's keys the tail does not mention, then the tail's
    (two parts, so a large snapshot is not copied again); keys in ``gone`` (tombstoned, or
    last written in a layout this build rejects) start afresh, as after a full read."""
    drop = set(keys).union(gone)
    keep = np.fromiter((k not in drop for k in snap.keys), bool, len(snap.keys))
    if keep.all():
        base = (snap.keys, snap.rows, snap.last_ts, snap.offset)
    else:
        index = np.flatnonzero(keep)
        base = ([snap.keys[i] for i in index.tolist()], snap.rows[index],
                snap.last_ts[index], snap.offset[index])  # fmt: skip
    return [base, (list(keys), rows, last_ts, offset)]
