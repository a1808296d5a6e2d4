"""Decoding: good events in columns, every bad one rejected with its reason and counted."""

from __future__ import annotations

import math
import time

import numpy as np
import orjson
import pytest

from streamlstm.events import REASONS, Decoder
from streamlstm.validation import MAX_ABS_VALUE

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
    "bad_key": b'{"key": "\\ud800", "ts": 1, "values": [1, 2]}',
    "bad_ts": enc({"key": "k", "ts": 1.7e12, "values": [1, 2]}),
    "bad_value": enc({"key": "k", "ts": 1, "values": [1e20, 2]}),
    "internal_error": b"",  # cannot be produced from input; see test_unexpected_errors_...
}


@pytest.mark.parametrize("reason", [r for r in REASONS if r != "internal_error"])
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
        ({"key": "k", "ts": 1, "values": [1e39, 2]}, "non_finite"),  # beyond float32
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


def test_key_of_256_bytes_is_accepted_and_257_rejected() -> None:
    events = [
        {"key": "x" * 256, "ts": 1, "values": [1, 2]},
        {"key": "é" * 128, "ts": 1, "values": [1, 2]},
    ]
    batch, rejected = Decoder(width=2).decode([enc(e) for e in events])
    assert len(batch) == 2 and not rejected
    _, rejected = Decoder(width=2).decode([enc({"key": "x" * 257, "ts": 1, "values": [1, 2]})])
    assert [r.reason for r in rejected] == ["key_too_long"]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[" * 5000 + b"]" * 5000, "not_json"),  # RecursionError in the stdlib fallback
        (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b', "x": NaN}', "not_json"),
        (
            b'{"key": "k", "ts": ' + b"9" * 400 + b', "values": [1, 2]}',
            "non_finite",
        ),  # inf, as a float
        (b'{"key": "k", "ts": 1' + b"0" * 20 + b', "values": [1, 2]}', "bad_ts"),  # > int64
        (b'{"key": "k", "ts": 1, "values": [' + b"9" * 400 + b", 2]}", "non_finite"),
        (
            b'{"key": "k", "ts": 1, "values": [1, 2], "target": [-' + b"9" * 400 + b", 2]}",
            "non_finite",
        ),
        (b'{"key": "k", "ts": 1, "values": [' + b"9" * 5000 + b", 2]}", "non_finite"),
        (b'{"key": "\\ud800", "ts": 1, "values": [1, 2]}', "bad_key"),
        (b'{"key": "a\\udfff", "ts": 1, "values": [NaN, 2]}', "bad_key"),
        (b'{"key": "k", "ts": "\\ud800", "values": [1, 2]}', "bad_type"),
    ],
)
def test_hostile_messages_are_rejected_not_raised(payload: bytes, reason: str) -> None:
    decoder = Decoder(width=2)
    batch, rejected = decoder.decode([payload, enc(GOOD)])
    assert len(batch) == 1 and batch.keys == ["k"]
    assert [(r.message, r.reason) for r in rejected] == [(0, reason)]


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"key": "k", "ts": 1.7e12, "values": [1, 2]}, "bad_ts"),  # milliseconds
        ({"key": "k", "ts": -1e12, "values": [1, 2]}, "bad_ts"),  # before year 1
        ({"key": "k", "ts": 1, "values": [1e20, 2]}, "bad_value"),
        ({"key": "k", "ts": 1, "values": [1, -1e16]}, "bad_value"),
        ({"key": "k", "ts": 1, "values": [1, 2], "target": [1e20, 2]}, "bad_value"),
        ({"key": "k", "ts": 1, "values": 1e39}, "bad_type"),
    ],
)
def test_range_rules(event: dict, reason: str) -> None:
    _, rejected = Decoder(width=2).decode([enc(event)])
    assert [r.reason for r in rejected] == [reason]


def test_values_at_the_bound_are_kept() -> None:
    bound = MAX_ABS_VALUE
    batch, rejected = Decoder(width=2).decode(
        [enc({"key": "k", "ts": 0, "values": [bound, -bound], "target": [bound, 0]})]
    )
    assert not rejected and batch.values.tolist() == [[np.float32(bound), np.float32(-bound)]]


def test_non_finite_target_is_rejected() -> None:
    payload = b'{"key": "k", "ts": 1, "values": [1, 2], "target": [Infinity, 2]}'
    _, rejected = Decoder(width=2).decode([payload])
    assert [r.reason for r in rejected] == ["non_finite"]


def test_future_bound_is_against_the_wall_clock_and_history_is_kept() -> None:
    now = time.time()
    decoder = Decoder(width=2, max_future_seconds=3600)
    events = [
        {"key": "old", "ts": 86_400, "values": [1, 2]},  # a 1970 backfill
        {"key": "1900", "ts": -2_208_988_800, "values": [1, 2]},  # pre-epoch history
        {"key": "year 1", "ts": "0001-01-01T00:00:00Z", "values": [1, 2]},
        {"key": "recent", "ts": now - 10 * 365 * 86_400, "values": [1, 2]},
        {"key": "soon", "ts": now + 1800, "values": [1, 2]},
        {"key": "later", "ts": now + 7200, "values": [1, 2]},
    ]
    batch, rejected = decoder.decode([enc(e) for e in events])
    assert batch.keys == ["old", "1900", "year 1", "recent", "soon"]
    assert [(r.message, r.reason) for r in rejected] == [(5, "bad_ts")]
    # No wall-clock bound (offline files): only impossible times are rejected.
    batch, rejected = Decoder(width=2).decode([enc(e) for e in events])
    assert len(batch) == 6 and not rejected


def test_min_ts_is_configurable() -> None:
    batch, rejected = Decoder(width=2, min_ts=0).decode([enc({**GOOD, "ts": -5})])
    assert len(batch) == 0 and [r.reason for r in rejected] == ["bad_ts"]


def test_each_message_is_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import streamlstm.events as events

    calls = []
    real = events.orjson.loads

    def counting(payload: bytes) -> object:
        calls.append(len(payload))
        return real(payload)

    monkeypatch.setattr(events.orjson, "loads", counting)
    bad = (
        [{"key": "k", "ts": 1}] * 2000 + [GOOD] + [{"key": "k", "ts": 1, "values": [1e20, 1]}] * 10
    )
    batch, rejected = Decoder(width=2).decode([enc(bad), enc(GOOD)])
    assert len(batch) == 2 and len(rejected) == 2010
    assert len(calls) == 2
    # The rejection carries its element, so a dead letter needs no second parse.
    assert orjson.loads(rejected[0].payload) == {"key": "k", "ts": 1}
    assert orjson.loads(rejected[-1].payload)["values"] == [1e20, 1]
    assert [r.element for r in rejected] == [*range(2000), *range(2001, 2011)]


def test_unexpected_errors_become_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import streamlstm.validation as validation

    def broken(raw: object) -> float:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(validation, "parse_ts", broken)
    decoder = Decoder(width=2)
    batch, rejected = decoder.decode([enc(GOOD), enc([GOOD, GOOD])])
    assert len(batch) == 0
    assert [(r.message, r.element, r.reason) for r in rejected] == [
        (0, None, "internal_error"),
        (1, 0, "internal_error"),
        (1, 1, "internal_error"),
    ]
    assert "ZeroDivisionError" in rejected[0].detail
    assert decoder.rejected == {"internal_error": 3}


def test_decoder_from_settings_takes_the_engine_bounds() -> None:
    from streamlstm.config import load_settings

    defaults = Decoder.from_settings(load_settings(overrides={"model.input_size": "2"}))
    assert (defaults.width, defaults.max_message_bytes) == (2, 1_048_576)
    assert (defaults.min_ts, defaults.max_future_seconds) == (-62_135_596_800.0, 86_400.0)
    settings = load_settings(
        overrides={
            "model.input_size": "2",
            "engine.min_ts": "-100",
            "engine.max_future_seconds": "60",
            "engine.max_message_bytes": "4096",
        }
    )
    decoder = Decoder.from_settings(settings)
    assert (decoder.min_ts, decoder.max_future_seconds, decoder.max_message_bytes) == (
        -100.0,
        60.0,
        4096,
    )
    now = time.time()
    batch, rejected = decoder.decode(
        [enc({**GOOD, "ts": -50}), enc({**GOOD, "ts": now + 120}), enc({**GOOD, "ts": now})]
    )
    assert len(batch) == 2 and [(r.message, r.reason) for r in rejected] == [(1, "bad_ts")]
