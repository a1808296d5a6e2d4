"""The state changelog: one compacted record per stream key, the key's row as of an offset.

Record key = the stream key (UTF-8), partition = the input partition the key's events
come from (written explicitly: the changelog has the input's partition count, and a
member restoring input partition ``p`` reads changelog partition ``p`` only). The value
is a fixed binary layout, little-endian, no padding::

    magic "SL" (2) | version (1) | layout fingerprint (8) | last event time f64 (8)
    | input offset the row reflects i64 (8) | the row, float32 x width

A value whose length, magic, version or fingerprint is not the expected one (an upgrade
changed the row layout; a foreign writer; a truncated record) is *rejected*: that key
starts afresh and is counted, it is never misread. So is a value of the right layout
that no daemon writes (:func:`plausible`: a NaN or infinity in the row, an event time
past ``max_ts`` or before year 1, an offset below -1), which would poison the key for
good; old event times are normal and pass. ``None`` (a tombstone) marks a key evicted
(TTL or capacity). No torch here: rows travel as numpy arrays.

Why the daemon may write a row (:mod:`streamlstm.daemon.statelog`): a row written here
only ever reflects events whose outputs were already acknowledged, and input offsets
are committed only after the rows are. So after any crash the restored state is at or
ahead of the committed offset, and every event it reflects already has its output: the
re-read events at or below a key's stored offset are skipped, the rest are predicted.

>>> rows = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> blobs = encode(7, rows, np.array([1.5, 2.5]), np.array([10, 11]))
>>> len(blobs[0]) == record_size(3)
True
>>> out = decode([blobs[1], b"junk", blobs[0]], fingerprint=7, width=3)
>>> out.ok.tolist(), out.offset.tolist(), out.rows[0].tolist()
([True, False, True], [11, 10], [3.0, 4.0, 5.0])
>>> decode(blobs, fingerprint=8, width=3).ok.tolist()  # another layout: never misread
[False, False]
>>> poisoned = encode(7, np.full((1, 3), np.nan, np.float32), np.zeros(1), np.zeros(1))
>>> out = decode(poisoned + blobs, fingerprint=7, width=3)
>>> out.ok.tolist(), out.invalid
([False, True, True], 1)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamlstm.io.client import PartitionReader
from streamlstm.io.reader import EndNotReached, read_to_end
from streamlstm.validation import MAX_TS, MIN_TS

log = logging.getLogger(__name__)

MAGIC = 0x4C53  # b"SL" little-endian
VERSION = 1
#: Clock difference tolerated between the member that wrote a row and the one restoring
#: it, on top of ``engine.max_future_seconds`` (see :func:`max_restored_ts`).
CLOCK_SKEW_SECONDS = 3600.0
_HEADER = [
    ("magic", "<u2"),
    ("version", "u1"),
    ("fingerprint", "<u8"),
    ("last_ts", "<f8"),
    ("offset", "<i8"),
]


def record_dtype(width: int) -> np.dtype:
    """The value layout of a row of ``width`` float32s (packed, little-endian)."""
    return np.dtype([*_HEADER, ("row", "<f4", (width,))])


def record_size(width: int) -> int:
    """Bytes of one changelog value: 27 of header, 4 per float of the row."""
    return record_dtype(width).itemsize


def encode(
    fingerprint: int, rows: np.ndarray, last_ts: np.ndarray, offset: np.ndarray
) -> list[bytes]:
    """One value per row of ``rows`` ([N, width] float32)."""
    n, width = rows.shape
    records = np.empty(n, dtype=record_dtype(width))
    records["magic"] = MAGIC
    records["version"] = VERSION
    records["fingerprint"] = fingerprint
    records["last_ts"] = last_ts
    records["offset"] = offset
    records["row"] = rows
    data = records.tobytes()
    size = records.dtype.itemsize
    return [data[i : i + size] for i in range(0, n * size, size)]


@dataclass
class Decoded:
    """Values decoded in bulk: ``ok[i]`` says whether value ``i`` was readable and
    plausible; the arrays hold those only, in order. ``invalid``: how many of the others
    had this layout but impossible values (the rest were another layout)."""

    ok: np.ndarray  # bool [N]
    rows: np.ndarray  # float32 [n_ok, width]
    last_ts: np.ndarray  # float64 [n_ok]
    offset: np.ndarray  # int64 [n_ok]
    invalid: int = 0


#: A check of restored rows, last event times and offsets: the mask of those to keep.
Check = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def plausible(
    rows: np.ndarray,
    last_ts: np.ndarray,
    offset: np.ndarray,
    max_ts: float = MAX_TS,
    halves: slice | None = None,
) -> np.ndarray:
    """Mask of restored rows a key may start from: what the engine can have written (a
    finite row, an event time it accepts up to ``max_ts``, an offset; -1 is "none yet").
    ``halves``: columns holding float16 pairs (a float16 infinity is a finite float32).

    >>> plausible(np.array([[1.0], [np.inf], [1.0], [1.0]]), np.array([-1e10, 0, 1e13, 0]),
    ...           np.array([5, 5, 5, -2])).tolist()
    [True, False, False, False]
    >>> pair = np.array([[0.0, np.inf]], np.float16).view(np.float32)
    >>> plausible(pair, np.zeros(1), np.zeros(1)), plausible(pair, np.zeros(1), np.zeros(1),
    ...     halves=slice(0, 1))
    (array([ True]), array([False]))
    """
    ok = (
        np.isfinite(rows).all(axis=1)
        & (last_ts >= MIN_TS)
        & (last_ts <= max_ts)  # NaN fails both
        & (offset >= -1)
    )
    if halves is not None and len(rows):
        packed = np.ascontiguousarray(rows[:, halves], dtype="<f4").view("<f2")
        ok &= np.isfinite(packed).all(axis=1)
    return ok


def max_restored_ts(max_future_seconds: float | None, now: float | None = None) -> float:
    """The latest last event time a restored row may hold: the engine accepted no event
    later than ``max_future_seconds`` past its clock (with :data:`CLOCK_SKEW_SECONDS`
    between members' clocks), and none after year 9999 at all."""
    if max_future_seconds is None:
        return MAX_TS
    now = time.time() if now is None else now
    return min(MAX_TS, now + max_future_seconds + CLOCK_SKEW_SECONDS)


def decode(values: list[bytes], fingerprint: int, width: int, check: Check = plausible) -> Decoded:
    """Decode values of one layout; anything else, or any value ``check`` refuses (see
    :func:`plausible`), is rejected (``ok`` False), never raised."""
    dtype = record_dtype(width)
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    ok = lengths == dtype.itemsize
    sized = [values[i] for i in np.flatnonzero(ok).tolist()] if not ok.all() else values
    records = np.frombuffer(b"".join(sized), dtype=dtype)
    valid = (
        (records["magic"] == MAGIC)
        & (records["version"] == VERSION)
        & (records["fingerprint"] == np.uint64(fingerprint))
    )
    sane = check(records["row"].reshape(len(records), width), records["last_ts"],
                 records["offset"])  # fmt: skip
    invalid = int((valid & ~sane).sum())
    valid &= sane
    ok[ok] = valid
    records = records[valid]
    return Decoded(
        ok,
        records["row"].astype(np.float32, copy=True).reshape(len(records), width),
        records["last_ts"].astype(np.float64),
        records["offset"].astype(np.int64),
        invalid,
    )


def groups(
    topic: str, keys: list[str], partitions: list[int], values: list[bytes | None]
) -> list[tuple[str, list[bytes | None], list[bytes | None], None, list[int]]]:
    """Changelog records as one producer group with explicit partitions (see
    :mod:`streamlstm.io.producer`)."""
    encoded: list[bytes | None] = [k.encode() for k in keys]
    return [(topic, encoded, values, None, partitions)]


class RestoreError(RuntimeError):
    """A changelog partition could not be read to its end in time."""


@dataclass
class Restored:
    """The newest value of every live key of one changelog partition."""

    keys: list[str] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    records: int = 0  # records read (every version of every key, tombstones included)
    bytes: int = 0
    end: int = 0  # the offset after the last record read (``start`` if none)
    start: int = 0  # the first offset read (above 0: compaction or retention removed some)
    deleted: list[str] = field(default_factory=list)  # keys whose newest record is a tombstone


class ChangelogReader:
    """Reads changelog partitions from the start, outside the group, through ``reader``
    (which it then owns and closes): the daemon passes the one ``kafka.client`` names
    (:func:`~streamlstm.io.client.make_reader`), a tool any other.

    The end is the high watermark the fetches report
    (:func:`~streamlstm.io.reader.read_to_end`). Works on a log that was never
    compacted: the last record of each key wins, a tombstone deletes.
    """

    def __init__(self, topic: str, reader: PartitionReader) -> None:
        self.topic = topic
        self.reader = reader

    def partitions(self) -> set[int] | None:
        """The changelog topic's partitions (None if the broker does not know it)."""
        return self.reader.partitions(self.topic)

    def read(
        self,
        partition: int,
        timeout_s: float = 60.0,
        progress: Callable[[], None] | None = None,
        start: int | None = None,
    ) -> Restored:
        """Every live key of ``partition`` with its newest value; ``progress()`` is called
        after every fetch (the daemon's liveness: a long restore is not a hung loop).
        From ``start`` (a local snapshot's offset; check it with :meth:`bounds` first)
        only the tail is read, and ``deleted`` names the keys it tombstoned."""
        reader = self.reader
        reader.assign(self.topic, {partition: start})
        latest: dict[bytes, bytes | None] = {}
        out = Restored(start=start or 0)
        first = True
        last = -1

        def take(records: list[Any]) -> None:
            nonlocal first, last
            for rec in records:
                if first:
                    out.start, first = rec.offset, False
                latest[rec.key] = rec.value
                out.records += 1
                out.bytes += len(rec.value) if rec.value is not None else 0
                last = rec.offset

        try:
            read_to_end(reader, take, timeout_s, progress)
        except EndNotReached as exc:
            raise RestoreError(
                f"{self.topic}[{partition}] not read to its end in {timeout_s:.0f}s "
                f"({out.records} records read)"
            ) from exc
        finally:
            reader.assign(self.topic, {})
        out.end = max(last + 1, start or 0)
        for key, value in latest.items():
            if key is None:
                continue
            if value is not None:
                out.keys.append(key.decode("utf-8", "replace"))
                out.values.append(value)
            else:
                out.deleted.append(key.decode("utf-8", "replace"))
        return out

    def bounds(self, partition: int) -> tuple[int, int] | None:
        """The first and end offsets of changelog ``partition`` (None if unknown)."""
        return self.reader.bounds(self.topic, partition)

    def log_start(self, topic: str, partition: int) -> int | None:
        """The first offset still in ``topic[partition]`` (None if unknown)."""
        bounds = self.reader.bounds(topic, partition)
        return None if bounds is None else bounds[0]

    def close(self) -> None:
        self.reader.close()
