"""At-least-once through a crash: SIGKILL the daemon mid-stream, restart, nothing is lost.

The producer lingers (``kafka.producer_linger_ms``), and the daemon is killed once its
/metrics say every event was processed (``streamlstm_events_total``) but not every
prediction acknowledged (``streamlstm_predictions_total``): outputs are in flight inside
the killed process. A daemon that committed what it polled (rather than what was
acknowledged) would resume past them, and their predictions would never appear.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest
from conftest import (
    KafkaTools,
    crash_daemon,
    daemon_overrides,
    http_get,
    logged_metrics_port,
    read_to_end,
    start_daemon,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

KEYS, STEPS = 8, 40  # 320 events


def _events() -> list[tuple[bytes, bytes]]:
    out = []
    for step in range(STEPS):
        for k in range(KEYS):
            key = f"k{k}"
            doc = {"key": key, "ts": 1000.0 + step, "values": [k, step]}
            out.append((key.encode(), orjson.dumps(doc)))
    return out


class _Outputs:
    """Reads the output topic from the beginning, accumulating (key, ts) of predictions."""

    def __init__(self, tools: KafkaTools, topic: str, partitions: int) -> None:
        self.reader = tools.reader(topic, partitions=partitions)
        self.records = 0
        self.seen: set[tuple[str, float]] = set()

    def take(self, records: list) -> None:
        for r in records:
            doc = orjson.loads(r.value)
            self.seen.add((doc["key"], doc["ts"]))
            self.records += 1

    def poll(self) -> int:
        self.take(self.reader.poll(0.1))
        return self.records

    def drain(self) -> set[tuple[str, float]]:
        """Everything written so far (nothing else is writing): read up to the end."""
        read_to_end(self.reader, self.take, 30)
        return set(self.seen)

    def close(self) -> None:
        self.reader.close()


def _counters(port: int) -> dict[str, float]:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _in_flight(port: int, events: int) -> tuple[float, float] | None:
    """(processed, acknowledged) once every event was processed, but not all acknowledged."""
    totals = _counters(port)
    processed = totals.get("streamlstm_events_total", 0.0)
    acked = totals.get("streamlstm_predictions_total", 0.0)
    if processed == events:
        if acked >= events:
            pytest.fail("every prediction was acknowledged before the kill: nothing in flight")
        return processed, acked
    return None


def test_every_event_is_predicted_after_a_sigkill_mid_stream(
    kafka_tools: KafkaTools, tmp_path: Path, client: str
) -> None:
    prefix = f"kill-{uuid.uuid4().hex[:10]}"
    kafka_tools.create({f"{prefix}-in": 2, f"{prefix}-out": 2, f"{prefix}-dlq": 2})
    events = _events()
    expected = {(orjson.loads(v)["key"], orjson.loads(v)["ts"]) for _, v in events}
    kafka_tools.produce(f"{prefix}-in", events)
    overrides = {
        **daemon_overrides(prefix, client=client),
        "kafka.producer_linger_ms": "3000",  # outputs wait in the producer: in flight
        "kafka.commit_interval_ms": "100",  # commits run while they wait
        "engine.max_batch": "32",
    }
    outputs = _Outputs(kafka_tools, f"{prefix}-out", 2)
    first = start_daemon(kafka_tools.bootstrap, overrides, tmp_path / "first.log")
    try:
        port = logged_metrics_port(tmp_path / "first.log", first)
        processed, acked = wait_for(
            lambda: _in_flight(port, len(events)), 60, interval=0.02, what="outputs in flight"
        )
        crash_daemon(first)  # SIGKILL, producer process included: no flush, no final commit
        lost = expected - outputs.drain()
        assert lost, "every prediction was out before the crash: the test proved nothing"
        assert processed == len(events) and acked < processed

        overrides["kafka.producer_linger_ms"] = "5"
        second = start_daemon(kafka_tools.bootstrap, overrides, tmp_path / "second.log")
        try:

            def all_predicted() -> bool:
                outputs.poll()
                return expected <= outputs.seen

            wait_for(
                all_predicted,
                60,
                interval=0.0,
                what="every event's prediction (the crash lost some)",
            )
        finally:
            crash_daemon(second)
    finally:
        crash_daemon(first)
        outputs.close()

    missing = expected - outputs.seen
    assert not missing, f"{len(missing)} events were never predicted"
