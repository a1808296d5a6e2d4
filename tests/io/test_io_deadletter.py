"""Dead-letter records: the original unchanged, or the failed array element alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from streamlstm.events import Decoder
from streamlstm.io.deadletter import dead_letters, header


@dataclass
class Record:
    value: bytes
    key: bytes | None = b"k"
    partition: int = 1
    offset: int = 0
    headers: list = field(default_factory=list)


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
