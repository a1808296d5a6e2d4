"""Per-batch telemetry, acknowledgement accounting and partition hand-over, without a broker.

The daemon runs on fakes of the producer and the consumer here; the rebalance listener
is the real one (``streamlstm.io.source._Listener``), driven by hand as kafka-python
would drive it: revoke everything, then assign the new set (eager protocol), or lose.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from conftest import FakeSource, unit_daemon_settings
from kafka import TopicPartition

import streamlstm.daemon.loop as loop
from streamlstm.config import Settings
from streamlstm.daemon import Daemon
from streamlstm.drift import DETECTORS
from streamlstm.io import Polled
from streamlstm.io.source import _Listener

TOPIC = "in"


def _settings(**overrides: str) -> Settings:
    return unit_daemon_settings(TOPIC, **overrides)


def _fake_sink() -> Any:
    """Every send is acknowledged at once (no frame stays outstanding)."""
    return SimpleNamespace(
        output_topic="out",
        send=lambda ticket, groups: None,
        send_records=lambda ticket, sends: None,
        poll_acks=lambda: None,
        flush=lambda timeout_s: True,
        close=lambda timeout_s=0.0: None,
    )


def _polled(keys: list[str], partitions: list[int], values: np.ndarray) -> Polled:
    """One poll of events ``keys[i]`` on ``partitions[i]``, offsets counted per partition."""
    payloads: list[bytes | None] = []
    offsets: list[int] = []
    seen: dict[int, int] = {}
    for i, (key, p) in enumerate(zip(keys, partitions, strict=True)):
        doc = {"key": key, "ts": float(i), "values": [float(values[i])]}
        payloads.append(orjson.dumps(doc))
        offsets.append(seen.get(p, 0))
        seen[p] = offsets[-1] + 1
    records = [
        SimpleNamespace(key=k.encode(), headers=[], offset=o)
        for k, o in zip(keys, offsets, strict=True)
    ]
    return Polled(
        topic=TOPIC,
        records=records,
        payloads=payloads,
        partition=np.array(partitions, dtype=np.int64),
        offset=np.array(offsets, dtype=np.int64),
        ends={TopicPartition(TOPIC, p): n for p, n in seen.items()},
        polled_at=0.0,
    )


def _sample(daemon: Daemon, name: str, labels: dict[str, str] | None = None) -> float | None:
    return daemon.metrics.registry.get_sample_value(name, labels or {})


def test_drift_is_counted_with_training_disabled() -> None:
    daemon = Daemon(_settings(**{"drift.ph_threshold": "1.0", "drift.ph_min_instances": "5"}))
    daemon.delivery.sink = _fake_sink()
    values = np.r_[np.sin(np.arange(60) * 0.3), 50 + 10 * np.sin(np.arange(30))]
    daemon._process(_polled(["a"] * len(values), [0] * len(values), values))
    hits = _sample(daemon, "streamlstm_drift_total", {"detector": "page_hinkley"})
    assert hits is not None and hits >= 1
    for detector in DETECTORS:  # every series exists (from the start, at 0)
        assert _sample(daemon, "streamlstm_drift_total", {"detector": detector}) is not None


def test_anomalies_of_tickets_finished_during_a_revoke_are_counted() -> None:
    daemon = Daemon(_settings(**{"engine.anomaly_threshold": "0.0"}))
    daemon.delivery.sink = _fake_sink()
    values = np.r_[np.zeros(10), np.ones(10) * 5]
    polled = _polled(["a"] * 10 + ["b"] * 10, [0] * 10 + [1] * 10, values)
    daemon._process(polled)
    ticket = daemon.delivery.tracker.head()
    assert ticket is not None and ticket.anomalies > 0
    offsets = daemon._on_revoke({TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)})
    assert offsets == {TopicPartition(TOPIC, 0): 10, TopicPartition(TOPIC, 1): 10}
    assert _sample(daemon, "streamlstm_predictions_total") == 20
    assert _sample(daemon, "streamlstm_anomalies_total") == ticket.anomalies


def test_rebalance_callbacks_forget_the_keys_of_partitions_that_moved_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(loop, "make_source", FakeSource)
    monkeypatch.setattr(loop, "Sink", lambda settings: _fake_sink())
    monkeypatch.setattr(loop, "ensure_topics", lambda kafka, **kw: None)
    monkeypatch.setattr(loop.ModelSync, "start", lambda self, stop=None: False)  # no broker
    daemon = Daemon(_settings())
    assert daemon._connect()
    listener = _Listener(daemon.source)  # type: ignore[arg-type]
    p0, p1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)

    def rebalance(*steps: tuple[str, set[TopicPartition]]) -> None:
        for method, partitions in steps:
            asyncio.run(getattr(listener, f"on_partitions_{method}")(partitions))

    rebalance(("assigned", {p0, p1}))
    daemon._process(_polled(["a", "b", "c"], [0, 1, 1], np.ones(3)))
    daemon.metrics.consumer_lag.labels("1").set(3)
    assert sorted(daemon.engine.store.keys()) == ["a", "b", "c"]

    rebalance(("revoked", {p0, p1}), ("assigned", {p0, p1}))  # given straight back
    assert sorted(daemon.engine.store.keys()) == ["a", "b", "c"]

    rebalance(("revoked", {p0, p1}), ("assigned", {p0}))  # partition 1 moved on
    assert daemon.engine.store.keys() == ["a"]
    assert 'streamlstm_consumer_lag{partition="1"}' not in daemon.metrics.exposition().decode()

    rebalance(("lost", {p0}))  # membership expired: the new owner starts from the changelog
    assert daemon.engine.store.keys() == []
