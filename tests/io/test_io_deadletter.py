"""Dead-letter records: the original unchanged, or the failed array element alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from streamlstm.events import Decoder, Rejection
from streamlstm.io.deadletter import DEFAULT_MAX_BYTES, dead_letters, header


@dataclass
class Record:
    value: bytes
    key: bytes | None = b"k"
    partition: int = 1
    offset: int = 0
    headers: list = field(default_factory=list)


def record_bytes(key: bytes | None, value: bytes | None, headers: list) -> int:
    """Key, value and headers of a record, without Kafka's framing."""
    return len(key or b"") + len(value or b"") + sum(len(k.encode()) + len(v) for k, v in headers)


def test_whole_message_and_element_failures() -> None:
    records = [
        Record(b"{oops", offset=10, headers=[("trace", b"abc")]),
        Record(b'{"key": "a", "ts": 1, "values": [1]}', offset=11),
        Record(
            b'[{"key": "a", "ts": 1, "values": [1]}, {"key": "b", "values": [2]}, 7]', offset=12
        ),
    ]
    batch, rejections = Decoder(width=1).decode([r.value for r in records])
    assert len(batch) == 2
    sends, reasons = dead_letters("events", "events.dlq", records, rejections)
    assert reasons == ["not_json", "missing_field", "not_object"]
    (t0, k0, v0, h0), (_, _, v1, h1), (_, _, v2, h2) = sends
    assert (t0, k0, v0) == ("events.dlq", b"k", b"{oops")
    assert ("trace", b"abc") in h0  # the record's own headers are kept
    assert header(h0, "streamlstm.reason") == "not_json"
    assert header(h0, "streamlstm.topic") == "events"
    assert header(h0, "streamlstm.partition") == "1"
    assert header(h0, "streamlstm.offset") == "10"
    assert header(h0, "streamlstm.error") == "payload is not valid JSON"
    assert header(h0, "streamlstm.element") is None
    assert orjson.loads(v1) == {"key": "b", "values": [2]}
    assert header(h1, "streamlstm.element") == "1" and header(h1, "streamlstm.offset") == "12"
    assert v2 == b"7" and header(h2, "streamlstm.element") == "2"


def test_non_finite_element_keeps_its_literal() -> None:
    records = [
        Record(b'[{"key": "a", "ts": 1, "values": [NaN]}, {"key": "a", "ts": 2, "values": [1]}]')
    ]
    batch, rejections = Decoder(width=1).decode([r.value for r in records])
    sends, reasons = dead_letters("in", "dlq", records, rejections)
    assert len(batch) == 1 and reasons == ["non_finite"]
    assert b"NaN" in sends[0][2] and header(sends[0][3], "streamlstm.element") == "0"


def test_too_large_record_is_dead_lettered_truncated_with_its_size() -> None:
    huge = b'{"key": "a", "ts": 1, "values": [1], "pad": "' + b"x" * (3 << 20) + b'"}'
    records = [Record(huge, key=b"k" * 100, headers=[("trace", b"abc")])]
    _, rejections = Decoder(width=1).decode([r.value for r in records])
    sends, reasons = dead_letters("in", "dlq", records, rejections)
    (_, key, value, headers) = sends[0]
    assert reasons == ["too_large"] and key == b"k" * 100
    assert header(headers, "streamlstm.size") == str(len(huge))
    assert huge.startswith(value) and len(value) > 1_000_000
    assert record_bytes(key, value, headers) <= DEFAULT_MAX_BYTES - 512  # room for framing
    assert ("trace", b"abc") in headers


def test_dead_letter_fits_a_small_bound_even_with_a_huge_key_and_headers() -> None:
    own = [(f"h{i}", b"v" * 1000) for i in range(20)]
    records = [Record(b"{" + b"x" * 50_000, key=b"K" * 30_000, headers=own)]
    _, rejections = Decoder(width=1).decode([r.value for r in records])
    sends, _ = dead_letters("in", "dlq", records, rejections, max_bytes=8192)
    (_, key, value, headers) = sends[0]
    assert record_bytes(key, value, headers) <= 8192 - 512
    assert header(headers, "streamlstm.reason") == "not_json"
    assert header(headers, "streamlstm.size") == str(len(records[0].value))
    assert value and records[0].value.startswith(value)


def test_small_records_are_copied_unchanged_without_a_size_header() -> None:
    records = [Record(b"{oops")]
    _, rejections = Decoder(width=1).decode([r.value for r in records])
    ((_, _, value, headers),) = dead_letters("in", "dlq", records, rejections)[0]
    assert value == b"{oops" and header(headers, "streamlstm.size") is None


def test_element_dead_letters_do_not_parse_the_message_again(monkeypatch) -> None:
    import json

    good = {"key": "a", "ts": 1, "values": [1]}
    message = orjson.dumps([good, *[{"key": "b", "ts": 1}] * 3000, {**good, "values": [1e20]}])
    records = [Record(message)]
    _, rejections = Decoder(width=1).decode([message])

    def forbidden(*args: object, **kwargs: object) -> object:
        raise AssertionError("dead letters must not re-parse the message")

    monkeypatch.setattr(orjson, "loads", forbidden)
    monkeypatch.setattr(json, "loads", forbidden)
    sends, reasons = dead_letters("in", "dlq", records, rejections)
    monkeypatch.undo()
    assert reasons == ["missing_field"] * 3000 + ["bad_value"]
    assert orjson.loads(sends[0][2]) == {"key": "b", "ts": 1}
    assert orjson.loads(sends[-1][2])["values"] == [1e20]
    assert header(sends[-1][3], "streamlstm.element") == "3001"


def test_hostile_elements_and_details_still_encode() -> None:
    message = b'[{"key": "\\ud800", "ts": 1, "values": [1]}, {"key": "a", "ts": 1, "values": [1]}]'
    records = [Record(message)]
    batch, rejections = Decoder(width=1).decode([message])
    assert len(batch) == 1
    rejections.append(Rejection(0, None, "internal_error", "bad \ud800 detail"))
    rejections.append(Rejection(0, 1, "internal_error", "no payload"))  # whole message stands in
    sends, reasons = dead_letters("in", "dlq", records, rejections)
    assert reasons == ["bad_key", "internal_error", "internal_error"]
    assert orjson.loads(sends[0][2].replace(b"\\ud800", b"?")) == {
        "key": "?",
        "ts": 1,
        "values": [1],
    }
    assert header(sends[1][3], "streamlstm.error").startswith("bad ")
    assert sends[2][2] == message and header(sends[2][3], "streamlstm.element") == "1"
