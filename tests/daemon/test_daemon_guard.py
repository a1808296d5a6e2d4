"""The engine's last line of defence: a batch that fails is retried event by event."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from conftest import POISON, PoisonEngine, poisoned_daemon, polled_payloads

from streamlstm.io.deadletter import header


def _event(key: str, ts: float) -> dict[str, Any]:
    return {"key": key, "ts": ts, "values": [ts, -ts]}


def _outputs(groups: list) -> tuple[list[dict], list[tuple[bytes | None, list]]]:
    predictions, dead = [], []
    for topic, _keys, values, headers in groups:
        if topic == "out":
            predictions += [orjson.loads(v) for v in values]
        else:
            dead += [(v, h) for v, h in zip(values, headers, strict=True)]
    return predictions, dead


@pytest.mark.parametrize("after", [False, True], ids=["fails-before-applying", "fails-after"])
def test_a_poisoned_event_is_dead_lettered_and_the_rest_predicted(after: bool) -> None:
    daemon, sink = poisoned_daemon(after)
    payloads = []
    for step in range(3):
        for key in ("a", POISON, "b"):
            payloads.append(orjson.dumps(_event(key, 10.0 + step)))
    daemon._process(polled_payloads(payloads))  # does not raise

    ticket, groups = sink.sent[-1]
    predictions, dead = _outputs(groups)
    assert [(p["key"], p["ts"]) for p in predictions] == [
        (k, 10.0 + s) for s in range(3) for k in ("a", "b")
    ]
    assert ticket.predictions == 6 and len(ticket.event_ts) == 6
    assert ticket.dead_letter_reasons == ["internal_error"] * 3
    assert [header(h, "streamlstm.offset") for _, h in dead] == ["1", "4", "7"]
    assert all(header(h, "streamlstm.reason") == "internal_error" for _, h in dead)
    assert all("boom" in (header(h, "streamlstm.error") or "") for _, h in dead)
    # Each key's events keep their order and continue: each one scores the one before.
    # (After a failure past the engine's update, the retry applies "a" a second time:
    # the documented caveat, so its first event already has a forecast to score.)
    errors = [p["error"] for p in predictions if p["key"] == "a"]
    assert (errors[0] is None) != after and None not in errors[1:]

    # The daemon goes on: the next poll is predicted as usual.
    daemon._process(polled_payloads([orjson.dumps(_event("a", 20.0))], start=9))
    predictions, dead = _outputs(sink.sent[-1][1])
    assert [p["key"] for p in predictions] == ["a"] and dead == []
    text = daemon.metrics.exposition().decode()
    assert 'streamlstm_events_rejected_total{reason="internal_error"} 3.0' in text


def test_a_poisoned_array_element_is_dead_lettered_alone_with_its_index() -> None:
    daemon, sink = poisoned_daemon()
    array = [{"key": "x"}, _event("a", 1.0), _event(POISON, 1.0), _event("b", 1.0)]
    daemon._process(polled_payloads([orjson.dumps(array)]))
    predictions, dead = _outputs(sink.sent[-1][1])
    assert [p["key"] for p in predictions] == ["a", "b"]
    by_element = {header(h, "streamlstm.element"): (v, h) for v, h in dead}
    assert set(by_element) == {"0", "2"}
    value, headers = by_element["2"]
    assert header(headers, "streamlstm.reason") == "internal_error"
    assert orjson.loads(value or b"") == _event(POISON, 1.0)


def test_a_poisoned_key_does_not_slow_every_later_batch() -> None:
    daemon, sink = poisoned_daemon()
    engine = daemon.engine
    assert isinstance(engine, PoisonEngine)
    first = [orjson.dumps(_event(k, 1.0)) for k in ("a", POISON, "b")]
    daemon._process(polled_payloads(first))
    assert engine.calls == 1 + 3  # the batch, then each event alone
    # Later: the suspect's events run alone beside one batch of all the others.
    later = [orjson.dumps(_event(f"k{i}", 2.0)) for i in range(50)]
    later.insert(10, orjson.dumps(_event(POISON, 2.0)))
    engine.calls = 0
    daemon._process(polled_payloads(later, start=3))
    assert engine.calls == 2
    predictions, dead = _outputs(sink.sent[-1][1])
    assert [p["key"] for p in predictions] == [f"k{i}" for i in range(50)]  # batch order
    assert [header(h, "streamlstm.offset") for _, h in dead] == ["13"]
    assert daemon.guard.suspects == {POISON: None}
