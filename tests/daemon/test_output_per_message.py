"""``kafka.output_per_message``: one JSON array of prediction records per input message."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from conftest import POISON, poisoned_daemon, polled_payloads

from streamlstm.io.deadletter import header
from streamlstm.io.sink import per_message


def _event(key: str, ts: float) -> dict[str, Any]:
    return {"key": key, "ts": ts, "values": [ts, -ts]}


def _record() -> SimpleNamespace:
    return SimpleNamespace(key=None)


def test_consecutive_events_of_a_message_make_one_array_in_order() -> None:
    keys, values = per_message(
        [0, 0, 0, 1, 3, 3],
        [b"a", b"b", b"c", b"d", b"e", b"f"],
        [b"1", b"2", b"3", b"4", b"5", b"6"],
        [SimpleNamespace(key=b"m0"), _record(), _record(), SimpleNamespace(key=b"m3")],
    )
    assert keys == [b"m0", b"d", b"m3"]  # the message's key, else its first event's
    assert values == [b"[1,2,3]", b"[4]", b"[5,6]"]
    assert per_message([], [], [], []) == ([], [])


def test_an_array_past_the_size_limit_is_split_in_order() -> None:
    values = [b'{"v":%d}' % i for i in range(10)]  # 7 bytes each
    keys, arrays = per_message([0] * 10, [b"k"] * 10, values, [_record()], max_bytes=25)
    assert [len(a) for a in arrays] == [25, 25, 25, 9]  # 3 records fit in 25 bytes
    assert [r for a in arrays for r in orjson.loads(a)] == [{"v": i} for i in range(10)]
    assert keys == [b"k"] * 4
    # One record past the limit still goes, alone.
    assert per_message([0, 0], [b"k"] * 2, [b"x" * 30, b"1"], [_record()], max_bytes=24)[1] == [
        b"[" + b"x" * 30 + b"]",
        b"[1]",
    ]


def _split(groups: list) -> tuple[list[bytes | None], list[bytes], list]:
    out = [g for g in groups if g[0] == "out"]
    assert len(out) <= 1
    keys, values = (out[0][1], out[0][2]) if out else ([], [])
    dead = [h for g in groups if g[0] != "out" for h in g[3]]
    return keys, values, dead


@pytest.mark.parametrize("message_keyed", [False, True])
def test_per_message_output_holds_the_default_records_one_array_per_message(
    message_keyed: bool,
) -> None:
    messages = [
        [_event("a", 1.0), _event("b", 1.0), _event("c", 1.0)],
        _event("a", 2.0),  # a single object: still an array of one
        [{"key": "x"}, _event("b", 2.0), _event(POISON, 2.0), _event("c", 2.0)],
        [{"key": "y"}],  # every element rejected: no output message
        [_event(POISON, 3.0)],  # every element failed in the engine: no output message
        [_event("c", 3.0), _event("a", 3.0)],
    ]
    payloads = [orjson.dumps(m) for m in messages]
    kafka_keys = [b"m%d" % i if message_keyed else None for i in range(len(messages))]
    (default, sink_d), (grouped, sink_g) = (
        poisoned_daemon(),
        poisoned_daemon(**{"kafka.output_per_message": "true"}),
    )
    default._process(polled_payloads(payloads, kafka_keys))
    grouped._process(polled_payloads(payloads, kafka_keys))
    ticket_d, groups_d = sink_d.sent[-1]
    ticket_g, groups_g = sink_g.sent[-1]

    _, records, dead_d = _split(groups_d)
    keys, arrays, dead_g = _split(groups_g)
    arrays_decoded = [orjson.loads(a) for a in arrays]
    assert all(isinstance(a, list) and a for a in arrays_decoded)
    assert [r for a in arrays_decoded for r in a] == [orjson.loads(r) for r in records]
    assert [[(r["key"], r["ts"]) for r in a] for a in arrays_decoded] == [
        [("a", 1.0), ("b", 1.0), ("c", 1.0)],
        [("a", 2.0)],
        [("b", 2.0), ("c", 2.0)],
        [("c", 3.0), ("a", 3.0)],
    ]
    first = [b"a", b"a", b"b", b"c"]
    assert keys == ([b"m0", b"m1", b"m2", b"m5"] if message_keyed else first)
    # Dead letters, counts and offsets do not change with the output's shape.
    assert dead_g == dead_d
    assert [header(h, "streamlstm.reason") for h in dead_g].count("internal_error") == 2
    assert ticket_g.predictions == ticket_d.predictions == 8
    assert ticket_g.dead_letter_reasons == ticket_d.dead_letter_reasons
    assert ticket_g.ends == ticket_d.ends
    assert np.array_equal(ticket_g.event_ts, ticket_d.event_ts)
