"""Event schema and fast decoding of Kafka message payloads into columnar batches.

A message is one JSON object or a JSON array of them::

    {"key": "pump-17", "ts": 1764250000.25, "values": [0.41, 12.0, 3.3]}

Decoding is total: it never raises. Every event that cannot be used becomes a
:class:`Rejection` with a reason code from :data:`REASONS`, so the caller can dead-letter
it; anything unexpected while decoding one message or one array element is rejected as
``internal_error`` instead of escaping. Each message is parsed once; a rejected array
element carries its own re-serialised JSON (:attr:`Rejection.payload`).

What an event must be (types, widths, and the ranges the engine can represent: keys,
times, magnitudes) is :mod:`streamlstm.validation`; this module parses, batches and
reports.

>>> decoder = Decoder(width=2)
>>> batch, rejected = decoder.decode([b'{"key": "a", "ts": 1, "values": [1, 2]}', b'{oops'])
>>> batch.keys, batch.values.tolist(), [r.reason for r in rejected]
(['a'], [[1.0, 2.0]], ['not_json'])
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from streamlstm.validation import MIN_TS, InvalidEvent, range_failures, validate_event

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
        validate, width = validate_event, self.width

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
                        key, t, vals, target = validate(doc, width, lenient)
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
                            key, t, vals, target = validate(obj, width, lenient)
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
        """The validated rows as columns, less those out of range (added to ``rejections``,
        which end up sorted by message and element): ranges are checked once per batch."""
        n = len(keys)
        src = np.array(source, dtype=np.int64)
        try:
            value_arr = np.array(values, dtype=np.float64).reshape(n, self.width)
            ts_arr = np.array(ts, dtype=np.float64).reshape(n)
            target_arr: np.ndarray | None = None
            given: np.ndarray | None = None  # rows that carry a target
            if any(t is not None for t in targets):
                nan_row = [math.nan] * self.width
                target_arr = np.array([nan_row if t is None else t for t in targets], np.float64)
                given = np.array([t is not None for t in targets])
        except Exception as exc:  # cannot happen for validated rows; never raise anyway
            for i in range(n):
                rejections.append(_internal(int(src[i]), elements[i], exc))
            rejections.sort(key=_order)
            return EventBatch([], np.zeros(0), np.zeros((0, self.width), np.float32), None, src[:0])

        failures = range_failures(
            ts_arr,
            value_arr,
            target_arr,
            given,
            min_ts=self.min_ts,
            max_future_seconds=self.max_future_seconds,
        )
        if failures:
            bad = np.zeros(n, dtype=bool)
            for i, reason, detail in failures:
                bad[i] = True
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
