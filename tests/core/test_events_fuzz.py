"""Fuzzing the decoder: no input escapes as an exception, every message is accounted for.

Arbitrary bytes, and hostile JSON built on purpose: deep nesting, integers of hundreds of
digits, lone surrogates, NaN/Infinity literals, wrong types, arrays of good and bad
elements. The examples are derandomised, so CI sees the same inputs every run.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlstm.events import REASONS, Decoder, EventBatch, Rejection
from streamlstm.io.deadletter import dead_letters
from streamlstm.validation import MAX_ABS_VALUE

WIDTH = 2
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DEEP = "@@DEEP@@"  # placeholder for nesting too deep to build as Python objects


@dataclass
class Record:
    value: bytes | None
    key: bytes | None = b"k"
    partition: int = 0
    offset: int = 0
    headers: list = field(default_factory=list)


# -- strategies -------------------------------------------------------------------------

good_keys = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)
good_values = st.lists(
    st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-(10**6), 10**6),
    min_size=WIDTH,
    max_size=WIDTH,
)
good_events = st.fixed_dictionaries(
    {"key": good_keys, "ts": st.floats(0, 2e9) | st.integers(0, 2 * 10**9), "values": good_values}
)

atoms = (
    st.none()
    | st.booleans()
    | st.integers(-(10**400), 10**400)
    | st.floats()  # NaN, Infinity, 1e308 ...
    | st.text(max_size=20)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)  # lone surrogates
    | st.sampled_from([DEEP, "2024-01-01T00:00:00Z", "0001-01-01", "9999-12-31T23:59:59-23:59"])
)
json_values = st.recursive(
    atoms,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
hostile_events = st.fixed_dictionaries(
    {},
    optional={
        "key": json_values | good_keys | st.text(min_size=250, max_size=300),
        "ts": json_values | st.floats(-1e13, 1e13),
        "values": json_values | st.lists(atoms, min_size=WIDTH, max_size=WIDTH) | good_values,
        "target": json_values | st.lists(atoms, min_size=WIDTH, max_size=WIDTH),
    },
)
elements = st.tuples(st.just(True), good_events) | st.tuples(
    st.just(False), hostile_events | json_values
)


def to_text(obj: object, depth: int) -> bytes:
    """JSON as a careless producer writes it: NaN literals, surrogate escapes, any int."""
    text = json.dumps(obj)  # allow_nan, ensure_ascii: lone surrogates become \\udXXX escapes
    return text.replace(json.dumps(DEEP), "[" * depth + "1" + "]" * depth).encode()


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, list[dict] | None]:
    """A message and, when it is an array, which elements are known good (else None)."""
    depth = draw(st.sampled_from([1, 100, 1100, 5000]))
    shape = draw(st.sampled_from(["object", "array", "huge_array", "atom", "cut"]))
    if shape == "object":
        good, obj = draw(elements)
        return to_text(obj, depth), [obj] if good else None
    if shape in ("array", "huge_array"):
        items = draw(st.lists(elements, max_size=8))
        if shape == "huge_array":
            items = items * 200  # up to 1,600 elements
        doc = [obj for _, obj in items]
        return to_text(doc, depth), [obj if good else None for good, obj in items]
    if shape == "atom":
        return to_text(draw(json_values), depth), None
    whole = to_text(draw(st.lists(elements, min_size=1, max_size=3)), depth)
    return whole[: draw(st.integers(0, max(len(whole) - 1, 0)))], None


# -- checks -----------------------------------------------------------------------------


def check_total(payloads: list[bytes | None], batch: EventBatch, rejected: list[Rejection]) -> None:
    """Each message: events, or rejections with known reasons; never both for a whole one."""
    assert all(r.reason in REASONS for r in rejected)
    assert not [r for r in rejected if r.reason == "internal_error"], rejected[:3]
    assert len(batch.keys) == len(batch.ts) == len(batch.values) == len(batch.source)
    assert batch.values.dtype == np.float32 and np.isfinite(batch.values).all()
    assert (np.abs(batch.values) <= np.float32(MAX_ABS_VALUE)).all()
    events = np.bincount(batch.source, minlength=len(payloads))
    by_message: dict[int, list[Rejection]] = defaultdict(list)
    for r in rejected:
        by_message[r.message].append(r)
        assert r.detail
    for m in range(len(payloads)):
        whole = [r for r in by_message[m] if r.element is None]
        assert events[m] or by_message[m] or empty_array(payloads[m]), f"message {m} vanished"
        if whole:
            assert len(whole) == 1 and events[m] == 0 and len(by_message[m]) == 1
        per_element = [r.element for r in by_message[m] if r.element is not None]
        assert len(per_element) == len(set(per_element))
        for r in by_message[m][:20]:
            if r.element is not None and r.payload is not None:
                json.loads(r.payload)  # the element on its own is JSON


def empty_array(payload: bytes | None) -> bool:
    """``[]`` holds no events: nothing to predict and nothing to dead-letter."""
    try:
        return orjson.loads(payload or b"0") == []
    except orjson.JSONDecodeError:
        return False


def check_good_events(
    payload: bytes, known: list[dict | None], batch: EventBatch, rejected: list[Rejection]
) -> None:
    """Known-good elements are all kept, in order, with their exact numbers."""
    if any(r.element is None for r in rejected):
        return  # the message failed whole (too deep, too large): no element was used
    bad = {r.element for r in rejected}
    assert not bad & {i for i, obj in enumerate(known) if obj is not None}, rejected[:3]
    kept = [i for i in range(len(known)) if i not in bad]
    assert len(batch) == len(kept)
    for row, i in enumerate(kept):
        obj = known[i]
        if obj is None:
            continue
        assert batch.keys[row] == obj["key"]
        assert batch.ts[row] == float(obj["ts"])
        assert batch.values[row].tolist() == [float(np.float32(v)) for v in obj["values"]]


def check_dead_letters(payloads: list[bytes | None], rejected: list[Rejection]) -> None:
    records = [Record(p, offset=i) for i, p in enumerate(payloads)]
    sends, reasons = dead_letters("in", "dlq", records, rejected, max_bytes=4096)
    assert reasons == [r.reason for r in rejected]
    for _, key, value, headers in sends:
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
        assert size <= 4096


# -- tests ------------------------------------------------------------------------------


@FUZZ
@given(st.lists(st.binary(max_size=300) | st.none(), max_size=6))
def test_arbitrary_bytes_never_raise(payloads: list[bytes | None]) -> None:
    batch, rejected = Decoder(WIDTH, max_message_bytes=200).decode(payloads)
    check_total(payloads, batch, rejected)
    check_dead_letters(payloads, rejected)


@settings(FUZZ, max_examples=200)  # the costliest inputs: fewer of them
@given(st.lists(messages(), min_size=1, max_size=4))
def test_hostile_json_never_raises_and_good_events_round_trip(
    drawn: list[tuple[bytes, list[dict | None] | None]],
) -> None:
    payloads: list[bytes | None] = [p for p, _ in drawn]
    decoder = Decoder(WIDTH, max_message_bytes=1 << 20)
    batch, rejected = decoder.decode(payloads)
    check_total(payloads, batch, rejected)
    assert sum(decoder.rejected.values()) == len(rejected)
    for m, (payload, known) in enumerate(drawn):
        if known is None or not payload.startswith(b"["):
            continue  # not an array (the single-object case is checked below)
        rows = np.flatnonzero(batch.source == m)
        check_good_events(payload, known, batch.take(rows), [r for r in rejected if r.message == m])
    for m, (payload, known) in enumerate(drawn):
        if known is not None and payload.startswith(b"{") and len(known) == 1:
            (obj,) = known
            rows = np.flatnonzero(batch.source == m)
            assert len(rows) == 1 and batch.keys[rows[0]] == obj["key"]
            assert math.isclose(batch.ts[rows[0]], float(obj["ts"]))
    check_dead_letters(payloads, rejected)


@FUZZ
@given(good_events)
def test_good_events_round_trip_alone(event: dict) -> None:
    batch, rejected = Decoder(WIDTH).decode([orjson.dumps(event)])
    assert not rejected
    assert batch.keys == [event["key"]] and batch.ts.tolist() == [float(event["ts"])]
    assert batch.values.tolist() == [[float(np.float32(v)) for v in event["values"]]]


def test_sixteen_thousand_bad_elements_parse_once(monkeypatch) -> None:
    """Decoding and dead-lettering an array of 16k bad elements parses the message once."""
    import streamlstm.events as events

    calls = []
    real = orjson.loads

    def counting(payload: bytes) -> object:
        calls.append(len(payload))
        return real(payload)

    monkeypatch.setattr(events.orjson, "loads", counting)
    monkeypatch.setattr(json, "loads", counting)
    message = orjson.dumps([{"key": "k", "ts": 1, "values": [1, "x"]}] * 16_000)
    records = [Record(message)]
    batch, rejected = Decoder(WIDTH).decode([message])
    sends, reasons = dead_letters("in", "dlq", records, rejected)
    assert len(batch) == 0 and len(sends) == 16_000 and set(reasons) == {"bad_type"}
    assert len(calls) == 1
