"""What an event must be to enter the engine: the types of its fields and their ranges.

:class:`streamlstm.events.Decoder` parses each message, checks every object it holds with
:func:`validate_event`, then checks the ranges of the whole batch at once with
:func:`range_failures`. The rules live here, apart from parsing and batching, so that each
bound reads beside the reason it exists, and so that other readers of events (CSV files in
:mod:`streamlstm.offline.eventfiles`) apply the same ones. A failure names one of
:data:`streamlstm.events.REASONS`.

Beyond types and shapes, events the engine cannot represent are rejected:

* ``bad_key``: a key that is not valid Unicode text (a lone surrogate escape such as
  ``"\\ud800"``), so it could never be encoded into an output record.
* ``bad_ts``: a time before ``min_ts`` (default: year 1, so pre-1970 history passes),
  after :data:`MAX_TS` (the last second of year 9999: a millisecond timestamp lands there),
  or, when
  ``max_future_seconds`` is given (the daemon), later than that far past the wall clock.
  One such event would advance event time and evict every key by TTL. There is no
  bound on history: backtests and backfills replay old events.
* ``bad_value``: ``|v| > MAX_ABS_VALUE`` in ``values`` or ``target`` (see there).

>>> validate_event({"key": "a", "ts": "1970-01-01T00:00:02", "values": 3}, width=1)
('a', 2.0, [3], None)
"""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np

MAX_KEY_BYTES = 256
# The engine keeps per-key statistics in float32 (max 3.4e38) and squares differences of
# values: (x - mean)**2, (x - prediction)**2, summed into variances and errors. With
# |v| <= 1e15 a squared difference is at most (2e15)**2 = 4e30, which leaves a headroom of
# about 1e8 (sums over many events, predictions overshooting the inputs) before float32
# overflows to inf and the key's outputs turn to NaN for good. Float32 keeps 7 significant
# digits, so a value this large is already only approximately what was sent.
MAX_ABS_VALUE = 1e15
# Default lower bound of ``ts``: the first second of year 1, the earliest time a calendar
# (and Python's datetime) can name. History is never refused; only the impossible is.
MIN_TS = datetime(1, 1, 1, tzinfo=UTC).timestamp()  # -62135596800
MAX_TS = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()  # 253402300799

#: One row of a batch that failed a range check: its index, reason and detail.
RangeFailure = tuple[int, str, str]


class InvalidEvent(Exception):
    """Raised inside validation; callers turn it into a :class:`~streamlstm.events.Rejection`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_ts(raw: Any) -> float:
    """Epoch seconds from a number or an ISO-8601 string (naive times are UTC)."""
    kind = type(raw)
    if kind is float or kind is int:
        ts = float(raw)
    elif kind is str:
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError:
            raise InvalidEvent("bad_type", f"ts {raw[:40]!r} is not ISO-8601") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ts = moment.timestamp()
    else:
        raise InvalidEvent("bad_type", "ts must be epoch seconds or an ISO-8601 string")
    if not math.isfinite(ts):
        raise InvalidEvent("non_finite", "ts is not finite")
    return ts


def _numbers(raw: Any, width: int, name: str) -> list[float]:
    if type(raw) is not list:
        if width == 1 and type(raw) in (int, float):
            raw = [raw]
        else:
            raise InvalidEvent("bad_type", f"{name} must be a list of numbers")
    if len(raw) != width:
        raise InvalidEvent("wrong_width", f"{name} has {len(raw)} numbers, expected {width}")
    for v in raw:
        kind = type(v)
        if kind is not float and kind is not int:
            raise InvalidEvent("bad_type", f"{name} holds a {kind.__name__}, expected numbers")
    return raw


def validate_event(
    obj: Any, width: int, lenient: bool = True
) -> tuple[str, float, list[float], list[float] | None]:
    """Key, time, values and target (or None) of one parsed event, or :class:`InvalidEvent`.

    ``lenient`` says the object came from Python's json rather than orjson, so its key may
    hold a lone surrogate that orjson would have refused. Ranges of numbers are left to
    :func:`range_failures`, which checks a whole batch at once.
    """
    if type(obj) is not dict:
        raise InvalidEvent("not_object", f"array element is a {type(obj).__name__}, not an object")
    try:
        key = obj["key"]
        raw_ts = obj["ts"]
        raw_values = obj["values"]
    except KeyError as missing:
        raise InvalidEvent("missing_field", f"field {missing.args[0]!r} is missing") from None
    if type(key) is not str or not key:
        raise InvalidEvent("bad_type", "key must be a non-empty string")
    if lenient:  # orjson refuses lone surrogates; Python's json lets them through
        try:
            key.encode()
        except UnicodeEncodeError:
            raise InvalidEvent("bad_key", "key is not valid Unicode (lone surrogate)") from None
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidEvent("key_too_long", f"key is longer than {MAX_KEY_BYTES} bytes")
    t = parse_ts(raw_ts)
    vals = _numbers(raw_values, width, "values")
    raw_target = obj.get("target")
    target = None if raw_target is None else _numbers(raw_target, width, "target")
    return key, t, vals, target


def range_failures(
    ts: np.ndarray,
    values: np.ndarray,
    target: np.ndarray | None,
    given: np.ndarray | None,
    *,
    min_ts: float,
    max_future_seconds: float | None,
) -> list[RangeFailure]:
    """The rows of a validated batch whose numbers the engine cannot hold, in row order.

    Vectorised (one pass over the batch, not one per event), one reason per row, first
    match wins: non-finite (NaN, Infinity, or beyond float32) > too large for the engine
    (``bad_value``) > bad time. ``values`` and ``target`` are float64 ``[N, F]`` (target
    rows without a target, where ``given`` is False, are not checked).
    """
    abs_v = np.abs(values)
    non_finite = ~(abs_v < 3.4e38).all(axis=1)
    too_big = (abs_v > MAX_ABS_VALUE).any(axis=1)
    if target is not None and given is not None:
        abs_t = np.abs(target)
        non_finite |= given & ~(abs_t < 3.4e38).all(axis=1)
        too_big |= given & (abs_t > MAX_ABS_VALUE).any(axis=1)
    hi = MAX_TS
    if max_future_seconds is not None:
        hi = min(hi, time.time() + max_future_seconds)
    bad_ts = (ts < min_ts) | (ts > hi)
    bad = non_finite | too_big | bad_ts
    if not bad.any():
        return []
    failures: list[RangeFailure] = []
    for i in np.flatnonzero(bad):
        if non_finite[i]:
            failures.append((int(i), "non_finite", "values or target hold a non-finite number"))
        elif too_big[i]:
            detail = f"values or target beyond +-{MAX_ABS_VALUE:g} (see MAX_ABS_VALUE)"
            failures.append((int(i), "bad_value", detail))
        else:
            detail = f"ts {ts[i]!r} outside [{min_ts!r}, {hi!r}]"
            failures.append((int(i), "bad_ts", detail))
    return failures
