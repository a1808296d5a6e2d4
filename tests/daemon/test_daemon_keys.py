"""Records keyed by another key than their events' own are counted (no key label)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import orjson
from kafka import TopicPartition

from streamlstm.config import load_settings
from streamlstm.daemon import Daemon
from streamlstm.io import Polled, Ticket


def _event(key: str) -> dict:
    return {"key": key, "ts": 1000.0, "values": [1.0, 2.0]}


def _polled(messages: list[tuple[bytes | None, object]]) -> Polled:
    records = [
        SimpleNamespace(key=k, value=orjson.dumps(v), headers=[], partition=0, offset=i)
        for i, (k, v) in enumerate(messages)
    ]
    n = len(records)
    return Polled(
        "in",
        records,
        [r.value for r in records],
        np.zeros(n, np.int64),
        np.arange(n, dtype=np.int64),
        {TopicPartition("in", 0): n},
        0.0,
    )


# (record key, message); mismatches: the "b"-keyed "a" event and two array elements.
MESSAGES: list[tuple[bytes | None, object]] = [
    (b"a", _event("a")),
    (b"b", _event("a")),
    (None, _event("c")),
    (b"a", [_event("a"), _event("b"), {"key": "a"}, _event("c")]),
    (None, [_event("x"), _event("y")]),
    (b"\xff", _event("a")),
]


def test_polled_counts_events_keyed_by_another_key() -> None:
    polled = _polled(MESSAGES)
    source = np.array([0, 1, 2, 3, 3, 3, 4, 4, 5])  # the missing_field element is gone
    keys = [k.encode() for k in ["a", "a", "c", "a", "b", "c", "x", "y", "a"]]
    assert polled.key_mismatches(source, keys) == 4
    assert polled.key_mismatches(source[:0], []) == 0
    # As many events as records, yet not one per record: an array beside a rejection.
    polled = _polled([(b"a", [_event("a"), _event("a")]), (b"z", 42), (b"c", _event("c"))])
    assert polled.key_mismatches(np.array([0, 0, 2]), [b"a", b"a", b"c"]) == 0


def test_the_daemon_counts_key_mismatches() -> None:
    settings = load_settings(
        overrides={"model.input_size": "2", "model.hidden_size": "4", "training.enabled": "false"}
    )
    daemon = Daemon(settings)
    sent: list[tuple[Ticket, list]] = []
    daemon.delivery.sink = SimpleNamespace(  # type: ignore[assignment]
        output_topic="out", send=lambda ticket, groups: sent.append((ticket, groups))
    )
    daemon._process(_polled(MESSAGES))
    assert sent[0][0].predictions == 9
    text = daemon.metrics.exposition().decode()
    assert "streamlstm_key_partition_mismatch_total 4.0" in text
