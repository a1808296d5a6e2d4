"""Decoder promises at their edges: decoding is total, every rejection names its message,
element, reason and a readable detail, array elements keep their own fields."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest

import streamlstm.events as events
import streamlstm.validation as validation
from streamlstm.events import Decoder, EventBatch, Rejection
from streamlstm.validation import MAX_TS, InvalidEvent

GOOD = {"key": "k", "ts": 1.5, "values": [1.0, 2.0]}


def enc(obj: object) -> bytes:
    return orjson.dumps(obj)


BAD = [
    b"",
    b"{",
    b"7",
    enc({"key": "k", "values": [1, 2]}),
    enc({"key": "", "ts": 1, "values": [1, 2]}),
    enc({"key": "k", "ts": [1], "values": [1, 2]}),
    enc({"key": "k", "ts": "soon", "values": [1, 2]}),
    b'{"key": "k", "ts": NaN, "values": [1, 2]}',
    enc({"key": "k", "ts": 1, "values": "1,2"}),
    enc({"key": "k", "ts": 1, "values": [1, 2, 3]}),
    enc({"key": "k", "ts": 1, "values": [1, "2"]}),
    enc({"key": "k", "ts": 1, "values": [1, 2], "target": 3}),
    b'{"key": "\\ud800", "ts": 1, "values": [1, 2]}',
    enc({"key": "x" * 300, "ts": 1, "values": [1, 2]}),
    enc({"key": "k", "ts": -1e12, "values": [1, 2]}),
    enc({"key": "k", "ts": 1, "values": [1e20, 2]}),
    enc([5, {"key": "k"}]),
]


def test_every_rejection_names_its_message_and_a_readable_detail() -> None:
    batch, rejected = Decoder(width=2, max_message_bytes=1000).decode([*BAD, enc(GOOD)])
    assert batch.keys == ["k"] and batch.source.tolist() == [len(BAD)]
    assert [r.message for r in rejected] == [*range(len(BAD) - 1), len(BAD) - 1, len(BAD) - 1]
    for r in rejected:
        assert isinstance(r.detail, str) and r.detail, r
    assert str(InvalidEvent("bad_type", "why")) == "why"


def test_a_message_of_exactly_the_size_limit_is_accepted() -> None:
    payload = enc(GOOD)
    batch, rejected = Decoder(width=2, max_message_bytes=len(payload)).decode([payload])
    assert len(batch) == 1 and not rejected
    _, rejected = Decoder(width=2, max_message_bytes=len(payload) - 1).decode([payload])
    assert [r.reason for r in rejected] == ["too_large"]


def test_one_byte_messages_are_parsed_not_taken_for_empty() -> None:
    _, rejected = Decoder(width=2).decode([b"7", b"{"])
    assert [(r.message, r.reason) for r in rejected] == [(0, "not_object"), (1, "not_json")]


def test_a_single_number_is_the_values_of_a_width_one_event() -> None:
    batch, rejected = Decoder(width=1).decode([enc({"key": "k", "ts": 1, "values": 3.5})])
    assert not rejected and batch.values.tolist() == [[3.5]]
    _, rejected = Decoder(width=2).decode([enc({"key": "k", "ts": 1, "values": 3.5})])
    assert [r.reason for r in rejected] == ["bad_type"]


def test_naive_iso_times_are_utc_whatever_the_machine_time_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        naive, aware = validation.parse_ts("2024-01-01T01:00:00"), "2024-01-01T01:00:00+02:00"
        assert naive == 1704070800.0
        assert validation.parse_ts(aware) == 1704070800.0 - 7200
    finally:
        monkeypatch.undo()
        time.tzset()


def test_array_elements_keep_their_own_key_target_and_order_of_rejections() -> None:
    message = enc(
        [
            {"key": "x", "ts": 1, "values": [1e20, 0]},  # range failure: found after parsing
            {"key": "y", "ts": 2},  # field failure: found while parsing
            {"key": "z", "ts": 3, "values": [1, 2], "target": [5, 6]},
            {"key": "w", "ts": 4, "values": [3, 4]},
        ]
    )
    batch, rejected = Decoder(width=2).decode([message])
    assert batch.keys == ["z", "w"]
    assert batch.target is not None and batch.target[0].tolist() == [5.0, 6.0]
    assert [(r.element, r.reason) for r in rejected] == [(0, "bad_value"), (1, "missing_field")]


def test_a_bug_inside_an_array_element_is_its_own_internal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(raw: object) -> float:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(validation, "parse_ts", broken)
    _, rejected = Decoder(width=2).decode([enc([GOOD, {**GOOD, "key": "q"}])])
    assert [(r.message, r.element) for r in rejected] == [(0, 0), (0, 1)]
    for r, key in zip(rejected, ("k", "q"), strict=True):
        assert r.reason == "internal_error" and r.detail == "ZeroDivisionError: bug"
        assert r.payload is not None and orjson.loads(r.payload)["key"] == key


def test_a_bug_outside_validation_is_an_internal_error_of_the_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = events.orjson.loads

    def loads(payload: bytes) -> object:
        if payload == b'"boom"':
            raise RuntimeError("parser bug")
        return real(payload)

    monkeypatch.setattr(events.orjson, "loads", loads)
    batch, rejected = Decoder(width=2).decode([enc(GOOD), b'"boom"', enc(GOOD)])
    assert len(batch) == 2
    assert rejected == [Rejection(1, None, "internal_error", "RuntimeError: parser bug")]


def test_an_exception_that_cannot_be_printed_still_gives_a_detail() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    r = events._internal(3, 1, Unprintable(), b"{}")
    assert (r.message, r.element, r.reason, r.detail, r.payload) == (
        3,
        1,
        "internal_error",
        "Unprintable",
        b"{}",
    )
    long = events._internal(0, None, ValueError("x" * 500))
    assert len(long.detail) == 200


def test_building_the_batch_never_raises_either() -> None:
    """The columnar step is total too: rows it cannot shape become internal errors."""
    decoder = Decoder(width=2)
    rejections: list[Rejection] = []
    batch = decoder._to_batch(
        ["a", "b"], [1.0, 2.0], [[1.0], [2.0]], [None, None], [4, 2], [None, 7], rejections
    )
    assert len(batch) == 0 and batch.values.shape == (0, 2) and batch.ts.shape == (0,)
    assert batch.values.dtype == np.float32
    assert batch.keys == [] and batch.target is None and batch.source.tolist() == []
    assert [(r.message, r.element, r.reason) for r in rejections] == [
        (2, 7, "internal_error"),
        (4, None, "internal_error"),
    ]
    assert all(r.detail.startswith("ValueError") for r in rejections)


def test_from_settings_width_defaults_to_one_without_an_input_size() -> None:
    from streamlstm.config import load_settings

    settings = load_settings()
    assert settings.model.input_size is None
    assert Decoder.from_settings(settings).width == 1


def test_a_batch_slice_keeps_its_targets_and_sources() -> None:
    batch = EventBatch.from_arrays(["a", "b", "c"], [1, 2, 3], [[1], [2], [3]], [[9], [8], [7]])
    part = batch.take(slice(1, 3))
    assert part.keys == ["b", "c"] and part.source.tolist() == [1, 2]
    assert part.target is not None and part.target.tolist() == [[8.0], [7.0]]
    bare = EventBatch(["a", "b"], np.zeros(2), np.zeros((2, 1), np.float32))
    assert bare.take(slice(0, 1)).source.tolist() == []


def test_a_target_does_not_hide_bad_values_and_a_bad_target_only_its_own_row() -> None:
    messages = [
        b'{"key": "k", "ts": 1, "values": [NaN, 2], "target": [1, 2]}',
        enc({"key": "k", "ts": 1, "values": [1e20, 2], "target": [1, 2]}),
        enc({"key": "k", "ts": 1, "values": [1, 2], "target": [1e20, 2]}),
        enc({"key": "good", "ts": 2, "values": [1, 2], "target": [3, 4]}),
        enc({"key": "plain", "ts": 3, "values": [5, 6]}),
    ]
    batch, rejected = Decoder(width=2).decode(messages)
    assert [(r.message, r.reason) for r in rejected] == [
        (0, "non_finite"),
        (1, "bad_value"),
        (2, "bad_value"),
    ]
    assert all(r.payload is None for r in rejected)  # whole messages: the message stands in
    assert batch.keys == ["good", "plain"] and batch.source.tolist() == [3, 4]
    assert batch.values.dtype == np.float32 and batch.target is not None
    assert batch.target.dtype == np.float32
    assert batch.target[0].tolist() == [3.0, 4.0] and np.isnan(batch.target[1]).all()


def test_a_range_failed_element_is_written_back_with_its_fields() -> None:
    elements = [
        {"key": "a", "ts": 1.0, "values": [1e20, 2.0], "target": [1.0, 2.0]},
        {"key": "b", "ts": 2.0, "values": [1e20, 2.0]},
    ]
    _, rejected = Decoder(width=2).decode([enc(elements)])
    assert [orjson.loads(r.payload) for r in rejected] == elements


def test_the_last_second_of_year_9999_is_a_valid_time() -> None:
    batch, rejected = Decoder(width=2).decode([enc({**GOOD, "ts": MAX_TS})])
    assert len(batch) == 1 and not rejected
    assert Decoder(width=2).max_message_bytes == 1_048_576  # the documented default


def test_a_rejected_elements_dead_letter_keeps_the_nan_literal_the_sender_used() -> None:
    message = b'[{"key": "a", "ts": 1, "values": [NaN, 1, 2]}, {"key": "b", "ts": 1}]'
    _, rejected = Decoder(width=2, max_message_bytes=1000).decode([message])
    by_element = {r.element: r for r in rejected}
    assert by_element[0].reason == "wrong_width"
    assert by_element[0].payload is not None and b"NaN" in by_element[0].payload
