"""The daemon against a real broker: predictions, dead letters and /metrics.

One scenario runs once per Kafka client (a daemon thread, good and malformed records on
the input topic); each test checks one property of what came out.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass

import orjson
import pytest
from conftest import KafkaTools, http_get, wait_for
from prometheus_client.parser import text_string_to_metric_families

from streamlstm.daemon import Daemon
from streamlstm.events import REASONS
from streamlstm.io.deadletter import header

pytestmark = pytest.mark.integration

KEYS = 12
STEPS = 10
ARRAYS = 6  # array messages of ARRAY_WIDTH events (keys arr-0..)
ARRAY_WIDTH = 4


def _event(key: str, ts: float, v: float = 1.0) -> dict:
    return {"key": key, "ts": ts, "values": [v, -v]}


# Malformed messages with the reason each must be dead-lettered for.
MALFORMED = [
    (b"{not json", "not_json"),
    (b'{"key": "m", "values": [1, 2]}', "missing_field"),
    (b'{"key": "m", "ts": 1, "values": [1, 2, 3]}', "wrong_width"),
    (b'{"key": "m", "ts": 1, "values": ["a", 2]}', "bad_type"),
    (b'{"key": "m", "ts": 1, "values": [NaN, 2]}', "non_finite"),
    (b"42", "not_object"),
    (b'{"key": "m", "ts": 1, "values": [1, 2], "pad": "' + b"x" * 3000 + b'"}', "too_large"),
]
# An array with one bad element: its good elements are predicted, the bad one alone
# is dead-lettered with the element header.
MIXED = [_event("mix", 1.0), {"key": "mix", "ts": 2.0}, _event("mix", 3.0)]


@dataclass
class Scenario:
    tools: KafkaTools
    daemon: Daemon
    prefix: str
    inputs: list  # input records as read back
    outputs: list
    dead: list
    metrics_text: str
    good: int
    sent_keys: dict[str, list[float]]  # key -> ts in send order
    readyz_while_running: int


@pytest.fixture(scope="module")
def scenario(kafka_tools: KafkaTools, client: str) -> Scenario:
    import uuid

    prefix = f"d-{uuid.uuid4().hex[:10]}"
    tools = kafka_tools
    settings = tools.settings(
        prefix, **{"engine.max_message_bytes": "2048", "kafka.client": client}
    )
    tools.create({f"{prefix}-in": 2, f"{prefix}-out": 2, f"{prefix}-dlq": 2})

    daemon = Daemon(settings)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_for(daemon.ready, 60, what="daemon ready")
        readyz = http_get(f"http://127.0.0.1:{daemon.metrics_port}/readyz")[0]
        sent: dict[str, list[float]] = defaultdict(list)
        messages: list[tuple[bytes | None, bytes]] = []
        bad = iter(MALFORMED)
        for step in range(STEPS):
            for k in range(KEYS):
                key, ts = f"key-{k:02d}", 1000.0 + step
                messages.append((key.encode(), orjson.dumps(_event(key, ts, step + k))))
                sent[key].append(ts)
            for value, _ in [next(bad, (None, None))]:
                if value is not None:  # malformed records between the good ones
                    messages.append((b"m", value))
        tools.produce(f"{prefix}-in", messages)
        arrays = []
        for j in range(ARRAYS):
            events = [_event(f"arr-{i}", 2000.0 + j) for i in range(ARRAY_WIDTH)]
            arrays.append((None, orjson.dumps(events)))
            for e in events:
                sent[e["key"]].append(e["ts"])
        arrays.append((None, orjson.dumps(MIXED)))
        sent["mix"] += [1.0, 3.0]
        tools.produce(f"{prefix}-in", arrays, partition=0)  # one partition: order kept

        good = KEYS * STEPS + ARRAYS * ARRAY_WIDTH + 2
        expected_dead = len(MALFORMED) + 1
        url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"

        def scraped() -> str | None:
            text = http_get(url)[1].decode()
            done = f"streamlstm_predictions_total {float(good)}" in text
            # gauges are refreshed once a second: wait for the one with every key
            keys = f"streamlstm_keys {float(KEYS + ARRAY_WIDTH + 1)}" in text
            return text if done and keys and "streamlstm_commits_total 0.0" not in text else None

        text = wait_for(
            scraped, 60, what="metrics to count every prediction, every key and a commit"
        )
        # Every output was acknowledged (repeats included): reading to the topics' ends
        # now sees all there is, with no settle window.
        outputs = tools.read(f"{prefix}-out", good)
        dead = tools.read(f"{prefix}-dlq", expected_dead)
        inputs = tools.read(f"{prefix}-in", len(messages) + len(arrays))
        return Scenario(tools, daemon, prefix, inputs, outputs, dead, text, good, sent, readyz)
    finally:
        daemon.request_stop()
        thread.join(timeout=15)


def test_every_event_yields_one_prediction_in_key_order(scenario: Scenario) -> None:
    outputs = [orjson.loads(r.value) for r in scenario.outputs]
    assert len(outputs) == scenario.good
    by_key: dict[str, list[float]] = defaultdict(list)
    for record, doc in zip(scenario.outputs, outputs, strict=True):
        assert record.key == doc["key"].encode()  # keyed by the stream key
        assert len(doc["prediction"]) == 2
        by_key[doc["key"]].append(doc["ts"])
    assert dict(by_key) == dict(scenario.sent_keys)  # same events, same order per key
    # The first event of a key has nothing to score; every later one does.
    firsts = {doc["key"]: doc for doc in reversed(outputs)}
    assert all(doc["error"] is None for doc in firsts.values())
    assert sum(doc["error"] is not None for doc in outputs) == scenario.good - len(firsts)


def test_malformed_records_are_dead_lettered_with_reason(scenario: Scenario) -> None:
    reasons = Counter(header(r.headers, "streamlstm.reason") for r in scenario.dead)
    expected = Counter(reason for _, reason in MALFORMED) + Counter({"missing_field": 1})
    assert reasons == expected
    topic = f"{scenario.prefix}-in"
    by_coordinate = {(r.partition, r.offset): r for r in scenario.inputs}
    for r in scenario.dead:
        assert header(r.headers, "streamlstm.topic") == topic
        source = by_coordinate[
            (
                int(header(r.headers, "streamlstm.partition")),
                int(header(r.headers, "streamlstm.offset")),
            )
        ]
        assert header(r.headers, "streamlstm.error")
        element = header(r.headers, "streamlstm.element")
        if element is None:  # the whole message failed: copied unchanged
            assert r.value == source.value
            assert r.key == source.key
        else:  # one element of an array: that element alone
            assert element == "1"
            assert orjson.loads(r.value) == MIXED[1]
            assert orjson.loads(source.value) == MIXED


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_counters_match_what_was_sent(scenario: Scenario) -> None:
    samples = _samples(scenario.metrics_text)
    topic = f"{scenario.prefix}-in"
    assert samples[("streamlstm_events_total", (("topic", topic),))] == scenario.good
    assert samples[("streamlstm_predictions_total", ())] == scenario.good
    rejected = {
        dict(labels)["reason"]: v
        for (name, labels), v in samples.items()
        if name == "streamlstm_events_rejected_total"
    }
    dead = {
        dict(labels)["reason"]: v
        for (name, labels), v in samples.items()
        if name == "streamlstm_dead_letters_total"
    }
    expected = Counter(reason for _, reason in MALFORMED) + Counter({"missing_field": 1})
    expected.update(dict.fromkeys(REASONS, 0))  # every reason's series exists from the start
    assert rejected == expected
    assert dead == expected
    assert samples[("streamlstm_event_latency_seconds_count", ())] == scenario.good
    assert samples[("streamlstm_processing_latency_seconds_count", ())] == scenario.good
    assert samples[("streamlstm_commits_total", ())] >= 1
    keys = KEYS + ARRAY_WIDTH + 1
    assert samples[("streamlstm_keys", ())] == keys
    lag = {
        dict(labels)["partition"]
        for (name, labels), _ in samples.items()
        if name == "streamlstm_consumer_lag"
    }
    assert lag == {"0", "1"}
    assert (
        "streamlstm_build_info",
        (("version", __import__("streamlstm").__version__),),
    ) in samples
    # No stream key ever becomes a label value.
    label_values = {v for _, labels in samples for _, v in labels}
    assert not any(v.startswith(("key-", "arr-")) or v == "mix" for v in label_values)


def test_readyz_and_healthz(scenario: Scenario) -> None:
    assert scenario.readyz_while_running == 200
    # A daemon that has not reached a broker is alive but not ready.
    from streamlstm.config import load_settings

    settings = load_settings(
        overrides={
            "kafka.bootstrap_servers": "127.0.0.1:1",
            "model.input_size": "2",
            "metrics.host": "127.0.0.1",
            "metrics.port": "0",
            "training.enabled": "false",
        }
    )
    daemon = Daemon(settings)
    daemon.start_metrics()
    try:
        base = f"http://127.0.0.1:{daemon.metrics_port}"
        assert http_get(base + "/healthz")[0] == 200
        assert http_get(base + "/readyz")[0] == 503
        assert http_get(base + "/nope")[0] == 404
    finally:
        assert daemon.server is not None
        daemon.server.stop()
