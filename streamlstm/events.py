"""Event schema and fast decoding of Kafka message payloads into columnar batches.

A message is one JSON object or a JSON array of them::

    {"key": "pump-17", "ts": 1764250000.25, "values": [0.41, 12.0, 3.3]}

Decoding never raises: every event that cannot be used becomes a :class:`Rejection`
with a reason code from :data:`REASONS`, so the caller can dead-letter it.

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
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

REASONS = (
    "not_json",
    "not_object",
    "missing_field",
    "bad_type",
    "wrong_width",
    "non_finite",
    "key_too_long",
    "too_large",
)
MAX_KEY_BYTES = 256


@dataclass(slots=True)
class Rejection:
    """One unusable event: where it came from, why, and a short human message."""

    message: int  # index of the message in the decoded sequence
    element: int | None  # index inside a JSON array message, None for the whole message
    reason: str
    detail: str


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
    """Decodes payloads of a fixed feature width and counts rejections by reason."""

    def __init__(self, width: int, max_message_bytes: int = 1_048_576) -> None:
        self.width = width
        self.max_message_bytes = max_message_bytes
        self.rejected: Counter[str] = Counter()

    def decode(self, payloads: Sequence[bytes | None]) -> tuple[EventBatch, list[Rejection]]:
        """Decode messages in order; return the good events and the rejections."""
        keys: list[str] = []
        ts: list[float] = []
        values: list[list[float]] = []
        targets: list[list[float] | None] = []
        source: list[int] = []
        elements: list[int | None] = []
        rejections: list[Rejection] = []

        for m, payload in enumerate(payloads):
            if payload is None or len(payload) == 0:
                rejections.append(Rejection(m, None, "not_json", "empty message"))
                continue
            if len(payload) > self.max_message_bytes:
                detail = f"{len(payload)} bytes > limit {self.max_message_bytes}"
                rejections.append(Rejection(m, None, "too_large", detail))
                continue
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError:
                doc = _lenient_json(payload)  # NaN/Infinity literals: rejected as non_finite below
                if doc is _NOT_JSON:
                    rejections.append(Rejection(m, None, "not_json", "payload is not valid JSON"))
                    continue
            if type(doc) is dict:
                items: Sequence[tuple[Any, int | None]] = ((doc, None),)
            elif type(doc) is list:
                items = [(item, i) for i, item in enumerate(doc)]
            else:
                detail = f"expected an object or array, got {type(doc).__name__}"
                rejections.append(Rejection(m, None, "not_object", detail))
                continue
            for obj, element in items:
                try:
                    key, t, vals, target = self._validate(obj)
                except InvalidEvent as bad:
                    rejections.append(Rejection(m, element, bad.reason, bad.detail))
                    continue
                keys.append(key)
                ts.append(t)
                values.append(vals)
                targets.append(target)
                source.append(m)
                elements.append(element)

        batch = self._to_batch(keys, ts, values, targets, source, elements, rejections)
        self.rejected.update(r.reason for r in rejections)
        return batch, rejections

    def _validate(self, obj: Any) -> tuple[str, float, list[float], list[float] | None]:
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
        value_arr = np.array(values, dtype=np.float64).reshape(n, self.width)
        target_arr = None
        if any(t is not None for t in targets):
            nan_row = [math.nan] * self.width
            target_arr = np.array([nan_row if t is None else t for t in targets], np.float64)
        # Non-finite numbers (NaN, Infinity, or values beyond float32) are rejected whole.
        finite = np.isfinite(value_arr).all(axis=1) & (np.abs(value_arr) < 3.4e38).all(axis=1)
        if target_arr is not None:
            given = ~np.isnan(target_arr).all(axis=1)
            finite &= ~given | np.isfinite(target_arr).all(axis=1)
        src = np.array(source, dtype=np.int64)
        if not finite.all():
            for i in np.flatnonzero(~finite):
                detail = "values or target hold a non-finite number"
                rejections.append(Rejection(int(src[i]), elements[i], "non_finite", detail))
            keep = np.flatnonzero(finite)
            keys = [keys[i] for i in keep]
            ts = [ts[i] for i in keep]
            value_arr, src = value_arr[keep], src[keep]
            target_arr = None if target_arr is None else target_arr[keep]
            rejections.sort(key=lambda r: r.message)
        return EventBatch(
            keys=keys,
            ts=np.array(ts, dtype=np.float64),
            values=value_arr.astype(np.float32),
            target=None if target_arr is None else target_arr.astype(np.float32),
            source=src,
        )


_NOT_JSON = object()


def _lenient_json(payload: bytes) -> Any:
    """Python's json accepts NaN/Infinity, which many producers emit; orjson does not."""
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return _NOT_JSON
