"""An input topic recreated under a group with a changelog: its events are new to the
restored keys, whose offsets point into the old log. Skipping the new events at or below
those offsets as "re-read" would drop them silently; the fetched end says they are not."""

from __future__ import annotations

import logging
import uuid

import orjson
import pytest
from conftest import KafkaTools, daemon_overrides, run_until_predicted

from streamlstm.config import load_settings
from streamlstm.io import ensure_topics

pytestmark = [pytest.mark.integration]

KEYS = 20


def _events(steps: range) -> list[tuple[bytes, bytes]]:
    return [
        (f"k{k}".encode(), orjson.dumps({"key": f"k{k}", "ts": 1000.0 + s, "values": [s, k]}))
        for s in steps
        for k in range(KEYS)
    ]


def test_a_recreated_input_topic_has_none_of_its_events_skipped(
    kafka_tools: KafkaTools, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = f"recreated-{uuid.uuid4().hex[:8]}"
    overrides = {
        **daemon_overrides(prefix, client=client),
        "kafka.bootstrap_servers": kafka_tools.bootstrap,
        "metrics.enabled": "false",
        "state.changelog_topic": f"{prefix}.state",  # what the recreated topic's name gives
    }
    old = load_settings(overrides=overrides)
    ensure_topics(old.kafka, changelog_topic=old.changelog_topic)
    kafka_tools.produce(old.kafka.input_topic, _events(range(5)))
    run_until_predicted(old, KEYS * 5)  # the keys' rows reflect offsets up to ~60 of the old log

    # The same group and changelog on a fresh log (offsets from 0 again): the topic as
    # deleting and creating it leaves it.
    new = load_settings(overrides={**overrides, "kafka.input_topic": f"{prefix}-in2"})
    ensure_topics(new.kafka, changelog_topic=new.changelog_topic)
    kafka_tools.produce(new.kafka.input_topic, _events(range(5, 7)))
    with caplog.at_level(logging.INFO, logger="streamlstm.daemon.partitions"):
        daemon = run_until_predicted(new, KEYS * 2)
    assert daemon.metrics.restored_keys._value.get() == KEYS  # the state came back
    assert daemon.metrics.events_skipped._value.get() == 0
    assert "their events are not in it (the input topic was recreated" in caplog.text
    records = kafka_tools.read(new.kafka.output_topic, KEYS * 7)  # both runs' outputs
    answered = sorted((d["key"], d["ts"]) for d in map(orjson.loads, (r.value for r in records)))
    assert len(answered) == KEYS * 7
    assert [a for a in answered if a[1] >= 1005.0] == sorted(
        (f"k{k}", 1000.0 + s) for s in (5, 6) for k in range(KEYS)
    )
