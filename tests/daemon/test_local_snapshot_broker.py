"""``state.dir`` on a real broker: a graceful stop writes snapshots, the restart loads
them and reads only the changelog's tail, and its predictions equal a clean single pass."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import KafkaTools, daemon_overrides, run_until_predicted

from streamlstm.config import load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch
from streamlstm.io import ensure_topics

pytestmark = [pytest.mark.integration]

KEYS, STEPS = 20, 10


def _values(k: int, step: int) -> list[float]:
    return [round(float(np.sin(step * 0.4 + k)) * (1 + k % 3), 4), float(k % 5)]


def _events(steps: range) -> list[tuple[bytes, bytes]]:
    return [
        (
            f"k{k}".encode(),
            orjson.dumps({"key": f"k{k}", "ts": 1000.0 + s, "values": _values(k, s)}),
        )
        for s in steps
        for k in range(KEYS)
    ]


def test_a_restart_from_local_snapshots_equals_a_clean_pass(
    kafka_tools: KafkaTools, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"snap-{uuid.uuid4().hex[:8]}"
    overrides = {
        **daemon_overrides(prefix),
        "kafka.bootstrap_servers": kafka_tools.bootstrap,
        "metrics.enabled": "false",
        "state.dir": str(tmp_path),
    }
    settings = load_settings(overrides=overrides)
    ensure_topics(settings.kafka, changelog_topic=settings.changelog_topic)
    half = STEPS // 2
    kafka_tools.produce(settings.kafka.input_topic, _events(range(half)))
    run_until_predicted(settings, KEYS * half)
    assert sorted(p.name for p in tmp_path.glob("*.snap"))  # written by the graceful stop
    kafka_tools.produce(settings.kafka.input_topic, _events(range(half, STEPS)))
    with caplog.at_level(logging.INFO, logger="streamlstm.daemon.partitions"):
        run_until_predicted(settings, KEYS * (STEPS - half))
    assert "from a local snapshot and" in caplog.text
    assert "local snapshot ignored" not in caplog.text
    got = {}
    for r in kafka_tools.read(settings.kafka.output_topic, KEYS * STEPS):
        d = orjson.loads(r.value)
        got[(d["key"], d["ts"])] = (d["prediction"], d["error"], d["anomaly_score"])
    engine = Engine.from_settings(settings)
    for step in range(STEPS):
        batch = EventBatch.from_arrays(
            [f"k{k}" for k in range(KEYS)],
            [1000.0 + step] * KEYS,
            [_values(k, step) for k in range(KEYS)],
        )
        for r in engine.process(batch).records():
            want = (r["prediction"], r["error"], r["anomaly_score"])
            have = got[(r["key"], r["ts"])]
            for a, b in zip(have, want, strict=True):
                assert (a is None) == (b is None)
                if a is not None:
                    assert np.allclose(a, b, rtol=0, atol=1e-4), (r["key"], r["ts"])
