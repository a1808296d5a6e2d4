"""Decoding: good events in columns, every bad one rejected with its reason and counted."""

from __future__ import annotations

import math

import orjson
import pytest

from streamlstm.events import REASONS, Decoder

GOOD = {"key": "k", "ts": 1.5, "values": [1.0, 2.0]}


def enc(obj: object) -> bytes:
    return orjson.dumps(obj)


CASES = {
    "not_json": b'{"key": "k", ',
    "not_object": b'"just a string"',
    "missing_field": enc({"key": "k", "values": [1, 2]}),
    "bad_type": enc({"key": "k", "ts": 1, "values": [1, "2"]}),
    "wrong_width": enc({"key": "k", "ts": 1, "values": [1, 2, 3]}),
    "non_finite": b'{"key": "k", "ts": 1, "values": [NaN, 2]}',
    "key_too_long": enc({"key": "x" * 257, "ts": 1, "values": [1, 2]}),
    "too_large": enc({"key": "k", "ts": 1, "values": [1, 2], "pad": "x" * 2000}),
}


@pytest.mark.parametrize("reason", REASONS)
def test_every_reason_is_produced_and_counted(reason: str) -> None:
    decoder = Decoder(width=2, max_message_bytes=1000)
    batch, rejected = decoder.decode([enc(GOOD), CASES[reason], enc(GOOD)])
    assert len(batch) == 2
    assert [r.reason for r in rejected] == [reason]
    assert rejected[0].message == 1 and rejected[0].detail
    assert decoder.rejected == {reason: 1}


def test_every_reason_has_a_case() -> None:
    assert set(CASES) == set(REASONS)


def test_array_message_keeps_good_elements_and_names_bad_ones() -> None:
    decoder = Decoder(width=2)
    message = enc([GOOD, {"key": "k", "ts": 2}, 7, {**GOOD, "ts": 3}])
    batch, rejected = decoder.decode([message])
    assert batch.ts.tolist() == [1.5, 3.0]
    assert batch.source.tolist() == [0, 0]
    assert [(r.element, r.reason) for r in rejected] == [(1, "missing_field"), (2, "not_object")]


def test_iso_timestamps_and_targets() -> None:
    batch, rejected = Decoder(width=2).decode(
        [
            enc({"key": "a", "ts": "2024-01-01T00:00:00Z", "values": [1, 2], "target": [3, 4]}),
            enc({"key": "b", "ts": "2024-01-01 01:00:00", "values": [1, 2]}),
        ]
    )
    assert not rejected
    assert batch.ts.tolist() == [1704067200.0, 1704070800.0]
    assert batch.target is not None
    assert batch.target[0].tolist() == [3.0, 4.0] and all(math.isnan(v) for v in batch.target[1])


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"key": "", "ts": 1, "values": [1, 2]}, "bad_type"),
        ({"key": 5, "ts": 1, "values": [1, 2]}, "bad_type"),
        ({"key": "k", "ts": "yesterday", "values": [1, 2]}, "bad_type"),
        ({"key": "k", "ts": True, "values": [1, 2]}, "bad_type"),
        ({"key": "k", "ts": 1, "values": [True, 2]}, "bad_type"),
        ({"key": "k", "ts": 1, "values": "1,2"}, "bad_type"),
        ({"key": "k", "ts": 1, "values": [1e39, 2]}, "non_finite"),
        ({"key": "k", "ts": 1, "values": [1, 2], "target": [1]}, "wrong_width"),
        ({"key": "é" * 129, "ts": 1, "values": [1, 2]}, "key_too_long"),
    ],
)
def test_field_rules(event: dict, reason: str) -> None:
    _, rejected = Decoder(width=2).decode([enc(event)])
    assert [r.reason for r in rejected] == [reason]


def test_empty_payload_is_rejected_not_raised() -> None:
    batch, rejected = Decoder(width=2).decode([b"", None])
    assert len(batch) == 0 and [r.reason for r in rejected] == ["not_json", "not_json"]
