"""Event schema and fast decoding of Kafka message payloads into columnar batches.

A message is one JSON object or a JSON array of them::

    {"key": "pump-17", "ts": 1764250000.25, "values": [0.41, 12.0, 3.3]}

Decoding is total: it never raises. Every event that cannot be used becomes a
:class:`Rejection` with a reason code from :data:`REASONS`, so the caller can dead-letter
it; anything unexpected while decoding one message or one array element is rejected as
``internal_error`` instead of escaping. Each message is parsed once; a rejected array
element carries its own re-serialised JSON (:attr:`Rejection.payload`).

Beyond types and shapes, the decoder rejects what the engine cannot represent:

* ``bad_key``: a key that is not valid Unicode text (a lone surrogate escape such as
  ``"\\ud800"``), so it could never be encoded into an output record.
* ``bad_ts``: a time before ``min_ts`` (default 0, the epoch), after :data:`MAX_TS`
  (the last second of year 9999: a millisecond timestamp lands there), or, when
  ``max_future_seconds`` is given (the daemon), later than that far past the wall clock.
  One such event would advance event time and evict every key by TTL. There is no
  bound on history: backtests and backfills replay old events.
* ``bad_value``: ``|v| > MAX_ABS_VALUE`` in ``values`` or ``target`` (see there).

>>> decoder = Decoder(width=2)
>>> batch, rejected = decoder.decode([b'{"key": "a", "ts": 1, "values": [1, 2]}', b'{oops'])
>>> batch.keys, batch.values.tolist(), [r.reason for r in rejected]
(['a'], [[1.0, 2.0]], ['not_json'])
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

if TYPE_CHECKING:
    from streamlstm.config import Settings

REASONS = (
    "not_json",
    "not_object",
    "missing_field",
    "bad_type",
    "wrong_width",
    "non_finite",
    "key_too_long",
    "too_large",
    "bad_key",
    "bad_ts",
    "bad_value",
    "internal_error",
)
MAX_KEY_BYTES = 256
# The engine keeps per-key statistics in float32 (max 3.4e38) and squares differences of
# values: (x - mean)**2, (x - prediction)**2, summed into variances and errors. With
# |v| <= 1e15 a squared difference is at most (2e15)**2 = 4e30, which leaves a headroom of
# about 1e8 (sums over many events, predictions overshooting the inputs) before float32
# overflows to inf and the key's outputs turn to NaN for good. Float32 keeps 7 significant
# digits, so a value this large is already only approximately what was sent.
MAX_ABS_VALUE = 1e15
MIN_TS = 0.0  # default lower bound of ``ts``: the epoch (configurable per decoder)
MAX_TS = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()  # 253402300799


@dataclass(slots=True)
class Rejection:
    """One unusable event: where it came from, why, and a short human message."""

    message: int  # index of the message in the decoded sequence
    element: int | None  # index inside a JSON array message, None for the whole message
    reason: str
    detail: str
    # The failed array element as JSON on its own (element rejections only): as parsed;
    # for range failures (non_finite, bad_value, bad_ts) its key, ts (epoch seconds),
    # values and target. None when it cannot be written back (the message stands in).
    payload: bytes | None = None


@dataclass(slots=True)
class EventBatch:
    """Decoded events in columns, in arrival order.

    ``source[i]`` is the index of the message event ``i`` came from, so the Kafka layer
    can map events back to partitions and offsets. ``target`` is None when no event of
    the batch carries one; otherwise rows without a target are NaN.
    """

    keys: list[str]
    ts: np.ndarray  # float64 [N], epoch seconds
    values: np.ndarray  # float32 [N, F]
    target: np.ndarray | None = None  # float32 [N, F]
    source: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64 [N]

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, index: np.ndarray | slice) -> EventBatch:
        """A sub-batch with the rows selected by ``index`` (order kept)."""
        rows = np.arange(len(self.keys))[index]
        return EventBatch(
            keys=[self.keys[i] for i in rows],
            ts=self.ts[rows],
            values=self.values[rows],
            target=None if self.target is None else self.target[rows],
            source=self.source[rows] if len(self.source) else self.source,
        )

    @staticmethod
    def from_arrays(
        keys: list[str], ts: np.ndarray, values: np.ndarray, target: np.ndarray | None = None
    ) -> EventBatch:
        """Build a batch from already-validated arrays (CSV files, benchmarks)."""
        n = len(keys)
        return EventBatch(
            keys=list(keys),
            ts=np.asarray(ts, dtype=np.float64).reshape(n),
            values=np.ascontiguousarray(values, dtype=np.float32).reshape(n, -1),
            target=None if target is None else np.asarray(target, np.float32).reshape(n, -1),
            source=np.arange(n, dtype=np.int64),
        )


class InvalidEvent(Exception):
    """Raised inside validation; callers turn it into a :class:`Rejection`."""

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


class Decoder:
    """Decodes payloads of a fixed feature width and counts rejections by reason.

    ``min_ts`` is the earliest accepted event time; ``max_future_seconds`` (None: no
    bound) rejects times further than that ahead of the wall clock at decode time. The
    daemon passes ``engine.min_ts`` and ``engine.max_future_seconds``; offline files
    leave the wall-clock bound off, so only impossible times are rejected there.
    """

    def __init__(
        self,
        width: int,
        max_message_bytes: int = 1_048_576,
        *,
        min_ts: float = MIN_TS,
        max_future_seconds: float | None = None,
    ) -> None:
        self.width = width
        self.max_message_bytes = max_message_bytes
        self.min_ts = min_ts
        self.max_future_seconds = max_future_seconds
        self.rejected: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, settings: Settings, width: int | None = None) -> Decoder:
        """The daemon's decoder: ``engine.max_message_bytes``, ``engine.min_ts`` and
        ``engine.max_future_seconds``; ``width`` defaults to ``model.input_size``."""
        engine = settings.engine
        return cls(
            width or settings.model.input_size or 1,
            engine.max_message_bytes,
            min_ts=engine.min_ts,
            max_future_seconds=engine.max_future_seconds,
        )

    def decode(self, payloads: Sequence[bytes | None]) -> tuple[EventBatch, list[Rejection]]:
        """Decode messages in order; return the good events and the rejections."""
        keys: list[str] = []
        ts: list[float] = []
        values: list[list[float]] = []
        targets: list[list[float] | None] = []
        source: list[int] = []
        elements: list[int | None] = []
        rejections: list[Rejection] = []
        validate = self._validate

        for m, payload in enumerate(payloads):
            try:
                if payload is None or len(payload) == 0:
                    rejections.append(Rejection(m, None, "not_json", "empty message"))
                    continue
                if len(payload) > self.max_message_bytes:
                    detail = f"{len(payload)} bytes > limit {self.max_message_bytes}"
                    rejections.append(Rejection(m, None, "too_large", detail))
                    continue
                lenient = False
                try:
                    doc = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    doc = _lenient_json(payload)  # NaN/Infinity: rejected as non_finite below
                    if doc is _NOT_JSON:
                        detail = "payload is not valid JSON"
                        rejections.append(Rejection(m, None, "not_json", detail))
                        continue
                    lenient = True
                if type(doc) is dict:
                    try:
                        key, t, vals, target = validate(doc, lenient)
                    except InvalidEvent as bad:
                        rejections.append(Rejection(m, None, bad.reason, bad.detail))
                        continue
                    except Exception as exc:  # last line of defence: a bug, not the input
                        rejections.append(_internal(m, None, exc))
                        continue
                    keys.append(key)
                    ts.append(t)
                    values.append(vals)
                    targets.append(target)
                    source.append(m)
                    elements.append(None)
                elif type(doc) is list:
                    for i, obj in enumerate(doc):
                        try:
                            key, t, vals, target = validate(obj, lenient)
                        except InvalidEvent as bad:
                            payload_i = _dump(obj, lenient)
                            rejections.append(Rejection(m, i, bad.reason, bad.detail, payload_i))
                            continue
                        except Exception as exc:
                            rejections.append(_internal(m, i, exc, _dump(obj, lenient)))
                            continue
                        keys.append(key)
                        ts.append(t)
                        values.append(vals)
                        targets.append(target)
                        source.append(m)
                        elements.append(i)
                else:
                    detail = f"expected an object or array, got {type(doc).__name__}"
                    rejections.append(Rejection(m, None, "not_object", detail))
            except Exception as exc:  # last line of defence
                rejections.append(_internal(m, None, exc))

        batch = self._to_batch(keys, ts, values, targets, source, elements, rejections)
        self.rejected.update(r.reason for r in rejections)
        return batch, rejections

    def _validate(
        self, obj: Any, lenient: bool = True
    ) -> tuple[str, float, list[float], list[float] | None]:
        if type(obj) is not dict:
            raise InvalidEvent(
                "not_object", f"array element is a {type(obj).__name__}, not an object"
            )
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
        vals = _numbers(raw_values, self.width, "values")
        raw_target = obj.get("target")
        target = None if raw_target is None else _numbers(raw_target, self.width, "target")
        return key, t, vals, target

    def _to_batch(
        self,
        keys: list[str],
        ts: list[float],
        values: list[list[float]],
        targets: list[list[float] | None],
        source: list[int],
        elements: list[int | None],
        rejections: list[Rejection],
    ) -> EventBatch:
        n = len(keys)
        src = np.array(source, dtype=np.int64)
        try:
            value_arr = np.array(values, dtype=np.float64).reshape(n, self.width)
            ts_arr = np.array(ts, dtype=np.float64).reshape(n)
            target_arr = None
            if any(t is not None for t in targets):
                nan_row = [math.nan] * self.width
                target_arr = np.array([nan_row if t is None else t for t in targets], np.float64)
                given = np.array([t is not None for t in targets])
        except Exception as exc:  # cannot happen for validated rows; never raise anyway
            for i in range(n):
                rejections.append(_internal(int(src[i]), elements[i], exc))
            rejections.sort(key=_order)
            return EventBatch([], np.zeros(0), np.zeros((0, self.width), np.float32), None, src[:0])

        # Vectorised range checks, one reason per row, first match wins:
        # non-finite (NaN, Infinity, or beyond float32) > too large for the engine > bad time.
        abs_v = np.abs(value_arr)
        non_finite = ~(abs_v < 3.4e38).all(axis=1)
        too_big = (abs_v > MAX_ABS_VALUE).any(axis=1)
        if target_arr is not None:
            abs_t = np.abs(target_arr)
            non_finite |= given & ~(abs_t < 3.4e38).all(axis=1)
            too_big |= given & (abs_t > MAX_ABS_VALUE).any(axis=1)
        hi = MAX_TS
        if self.max_future_seconds is not None:
            hi = min(hi, time.time() + self.max_future_seconds)
        bad_ts = (ts_arr < self.min_ts) | (ts_arr > hi)
        bad = non_finite | too_big | bad_ts
        if bad.any():
            for i in np.flatnonzero(bad):
                if non_finite[i]:
                    reason, detail = "non_finite", "values or target hold a non-finite number"
                elif too_big[i]:
                    reason = "bad_value"
                    detail = f"values or target beyond +-{MAX_ABS_VALUE:g} (see MAX_ABS_VALUE)"
                else:
                    reason = "bad_ts"
                    detail = f"ts {ts_arr[i]!r} outside [{self.min_ts!r}, {hi!r}]"
                element = elements[i]
                payload = None
                if element is not None:
                    # Written back from its validated fields: keeping every parsed message
                    # alive until here would cost the good path (the GC walks them all).
                    event = {"key": keys[i], "ts": ts[i], "values": values[i]}
                    if targets[i] is not None:
                        event["target"] = targets[i]
                    payload = _dump(event, lenient=True)
                rejections.append(Rejection(int(src[i]), element, reason, detail, payload))
            keep = np.flatnonzero(~bad)
            keys = [keys[i] for i in keep]
            ts_arr, value_arr, src = ts_arr[keep], value_arr[keep], src[keep]
            target_arr = None if target_arr is None else target_arr[keep]
            rejections.sort(key=_order)
        return EventBatch(
            keys=keys,
            ts=ts_arr,
            values=value_arr.astype(np.float32),
            target=None if target_arr is None else target_arr.astype(np.float32),
            source=src,
        )


def _order(r: Rejection) -> tuple[int, int]:
    return r.message, -1 if r.element is None else r.element


def _internal(
    message: int, element: int | None, exc: BaseException, payload: bytes | None = None
) -> Rejection:
    try:
        detail = f"{type(exc).__name__}: {exc}"[:200]
    except Exception:
        detail = type(exc).__name__
    return Rejection(message, element, "internal_error", detail, payload)


_NOT_JSON = object()


def _lenient_json(payload: bytes) -> Any:
    """Python's json accepts NaN/Infinity, which many producers emit; orjson does not.

    It also accepts what orjson refuses for good reasons: lone surrogate escapes (the key
    check rejects them), integers of any length (read as floats here, so a 400-digit
    number is ``inf`` and rejected as non-finite, not an OverflowError later) and nesting
    deeper than Python's stack (RecursionError: not JSON we can use).
    """
    try:
        return json.loads(payload, parse_int=float)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _NOT_JSON


def _dump(obj: Any, lenient: bool) -> bytes | None:
    """One parsed element as JSON on its own; None when it cannot be written back."""
    try:
        if not lenient:  # orjson would write NaN as null: keep the literal the sender used
            try:
                return orjson.dumps(obj)
            except orjson.JSONEncodeError:
                pass
        return json.dumps(obj).encode()  # ASCII: lone surrogates stay escapes
    except Exception:
        return None
