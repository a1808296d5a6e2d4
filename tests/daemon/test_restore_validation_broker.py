"""Crafted changelog records on a real broker: the restore reads them through the real
reader and decoder, loads the plausible ones and rejects (counts) the impossible ones."""

from __future__ import annotations

import logging
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import KafkaTools

from streamlstm.daemon import Daemon
from streamlstm.io import TopicPartition, ensure_topics
from streamlstm.io.changelog import encode

pytestmark = [pytest.mark.integration]


def test_impossible_changelog_records_are_not_restored(
    kafka_tools: KafkaTools, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = kafka_tools.settings(
        f"poison-{uuid.uuid4().hex[:8]}", **{"kafka.client": client, "metrics.enabled": "false"}
    )
    changelog = settings.changelog_topic
    assert changelog is not None
    ensure_topics(settings.kafka, changelog_topic=changelog)
    daemon = Daemon(settings)
    store = daemon.engine.store
    rows = np.full((4, store.layout.width), 0.25, np.float32)
    rows[2, 0] = np.inf
    ts = np.array([-1e9, time.time(), 0.0, 1.764e12])  # old, now, -, milliseconds
    values = encode(store.layout.fingerprint, rows, ts, np.arange(4))
    keys = [b"old", b"now", b"inf", b"ms"]
    kafka_tools.produce(changelog, list(zip(keys, values, strict=True)), partition=0)
    source = SimpleNamespace(topic=settings.kafka.input_topic, committed=lambda tp: None)
    try:
        daemon.partitions.assigned({TopicPartition(settings.kafka.input_topic, 0)})
        with caplog.at_level(logging.INFO, logger="streamlstm.daemon.partitions"):
            daemon.partitions.restore(source)  # type: ignore[arg-type]
    finally:
        daemon.partitions.close()
    assert sorted(store.keys()) == ["now", "old"]
    assert daemon.metrics.changelog_rejected._value.get() == 2
    assert "2 records hold impossible values" in caplog.text
