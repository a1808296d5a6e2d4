"""``kafka.output_per_message`` against a real broker: one array per input message.

Two daemons read the same input topic (array messages, a single object, a malformed
element), one per output mode; the per-message output holds the default output's records,
one message per input message, in input order.
"""

from __future__ import annotations

import threading
import uuid

import orjson
import pytest
from conftest import KafkaTools, wait_for

from streamlstm.daemon import Daemon

pytestmark = pytest.mark.integration

MESSAGES = 12
WIDTH = 5


def _event(key: str, ts: float) -> dict:
    return {"key": key, "ts": ts, "values": [ts, -ts]}


def _messages() -> list[tuple[bytes | None, list[dict]]]:
    """(Kafka key, events) per input message; every third is unkeyed."""
    out: list[tuple[bytes | None, list[dict]]] = []
    for m in range(MESSAGES):
        events = [_event(f"k{(m + i) % 7}", 100.0 + m) for i in range(WIDTH)]
        out.append((None if m % 3 == 0 else b"msg-%d" % (m % 4), events))
    out.append((b"single", [_event("k1", 200.0)]))  # sent as a plain object
    return out


def test_one_output_message_per_input_message_with_the_default_records(
    kafka_tools: KafkaTools, client: str
) -> None:
    prefix = f"pm-{uuid.uuid4().hex[:10]}"
    tools = kafka_tools
    tools.create({f"{prefix}-in": 2, f"{prefix}-out": 2, f"{prefix}-arr": 2, f"{prefix}-dlq": 2})
    messages = _messages()
    payloads = [(k, orjson.dumps(ev)) for k, ev in messages[:-1]]
    payloads.append((messages[-1][0], orjson.dumps(messages[-1][1][0])))
    payloads.insert(4, (b"bad", orjson.dumps([{"key": "x"}])))  # rejected: no output
    # One partition: a key's events spread over partitions would be read in an order
    # that differs between the two daemons, and so would its predictions.
    tools.produce(f"{prefix}-in", payloads, partition=0)

    common = {
        "kafka.input_topic": f"{prefix}-in",
        "metrics.enabled": "false",
        "kafka.client": client,
    }
    default = Daemon(tools.settings(prefix, **common))
    grouped = Daemon(
        tools.settings(
            prefix,
            **common,
            **{
                "kafka.output_topic": f"{prefix}-arr",
                "kafka.group_id": f"{prefix}-arr-group",
                "kafka.output_per_message": "true",
                # Its own changelog: one shared with the other daemon would skip the events.
                "state.changelog_topic": f"{prefix}-arr-state",
            },
        )
    )
    threads = [threading.Thread(target=d.run, daemon=True) for d in (default, grouped)]
    for t in threads:
        t.start()
    try:
        events = sum(len(ev) for _, ev in messages)
        for d in (default, grouped):
            wait_for(lambda d=d: d.live.predictions >= events, 90, what="every prediction")
        flat = tools.read(f"{prefix}-out", events)
        arrays = tools.read(f"{prefix}-arr", len(messages))
    finally:
        for d in (default, grouped):
            d.request_stop()
        for t in threads:
            t.join(timeout=15)

    assert len(flat) == events and len(arrays) == len(messages)
    docs = [orjson.loads(r.value) for r in arrays]
    assert all(isinstance(doc, list) for doc in docs)  # a single object too
    sent = {(k, tuple((e["key"], e["ts"]) for e in ev)) for k, ev in messages}
    got = set()
    for record, doc in zip(arrays, docs, strict=True):
        got.add((record.key, tuple((r["key"], r["ts"]) for r in doc)))
    # Each input message's events, in input order, keyed by the message's key (or the
    # first event's key when it had none).
    assert got == {(k or ev[0][0].encode(), ev) for k, ev in sent}

    def by_event(records: list[dict]) -> list[dict]:
        return sorted(records, key=lambda r: (r["key"], r["ts"]))

    records = [r for doc in docs for r in doc]
    assert by_event(records) == by_event([orjson.loads(r.value) for r in flat])
