"""``streamlstm produce``: synthetic and file events reach the topic, packed and in key order."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from conftest import KafkaTools

from streamlstm.cli import main
from streamlstm.config import load_settings
from streamlstm.devtools.loadgen import MALFORMED, Producer, make_producer, synthetic_events
from streamlstm.devtools.synthetic import SyntheticStream

pytestmark = pytest.mark.integration


def _kafka(bootstrap: str):
    return load_settings(overrides={"kafka.bootstrap_servers": bootstrap}).kafka


def test_batched_messages_keep_each_key_in_one_partition_in_order(kafka_tools: KafkaTools) -> None:
    topic = f"prod-{uuid.uuid4().hex[:8]}"
    kafka_tools.create({topic: 3})
    stream = SyntheticStream(n_keys=20, width=3, seed=1, start_ts=0.0)
    producer = make_producer(_kafka(kafka_tools.bootstrap))
    try:
        summary = Producer(producer, topic, batch=5, bad_every=7).run(
            synthetic_events(stream, 400), progress=False
        )
    finally:
        producer.close(timeout=5)
    assert summary.events == 400
    records = kafka_tools.read(topic, summary.messages + summary.malformed)
    assert len(records) == summary.messages + summary.malformed
    bad = [r.value for r in records if r.value in MALFORMED]
    assert len(bad) == summary.malformed == summary.messages // 7
    partitions: dict[str, set[int]] = defaultdict(set)
    ts: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.value in MALFORMED:
            continue
        events = orjson.loads(r.value)
        assert isinstance(events, list) and 1 <= len(events) <= 5
        for e in events:
            partitions[e["key"]].add(r.partition)
            ts[e["key"]].append(e["ts"])
    assert sum(len(v) for v in ts.values()) == 400
    assert all(len(p) == 1 for p in partitions.values())
    assert all(v == sorted(v) and len(v) == 20 for v in ts.values())


def test_rate_is_respected(kafka_tools: KafkaTools) -> None:
    topic = f"rate-{uuid.uuid4().hex[:8]}"
    kafka_tools.create({topic: 1})
    producer = make_producer(_kafka(kafka_tools.bootstrap))
    started = time.monotonic()
    try:
        from streamlstm.devtools.loadgen import chunks_for_rate

        stream = SyntheticStream(n_keys=5, width=2, seed=0)
        Producer(producer, topic, rate=500).run(
            chunks_for_rate(synthetic_events(stream, 500), 500), progress=False
        )
    finally:
        producer.close(timeout=5)
    assert time.monotonic() - started >= 0.9  # 500 events at 500/s take about a second


def test_cli_produces_a_jsonl_file(kafka_tools: KafkaTools, tmp_path: Path) -> None:
    topic = f"file-{uuid.uuid4().hex[:8]}"
    kafka_tools.create({topic: 2})
    path = tmp_path / "events.jsonl"
    lines = [
        orjson.dumps({"key": f"s{i % 3}", "ts": float(i), "values": [i, 2.0]}) for i in range(30)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n{broken\n")
    code = main(
        [
            "produce",
            str(path),
            "--bootstrap",
            kafka_tools.bootstrap,
            "--topic",
            topic,
            "--rate",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    records = kafka_tools.read(topic, 30)  # the producer is done: read to the end
    assert len(records) == 30  # the broken line is skipped, not sent
    got = sorted((orjson.loads(r.value)["key"], orjson.loads(r.value)["ts"]) for r in records)
    assert got == sorted((f"s{i % 3}", float(i)) for i in range(30))
    assert all(r.key == orjson.loads(r.value)["key"].encode() for r in records)
