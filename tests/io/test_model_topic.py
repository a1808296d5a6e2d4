"""The model topic's bytes on the real broker: created once, read from the beginning to the
high watermark, then followed with zero-timeout polls. Nothing relies on compaction (the
embedded broker may never compact): the follower keeps the newest few records itself."""

from __future__ import annotations

import time
import uuid

import pytest
from conftest import KafkaTools, wait_for
from kafka import KafkaProducer

from streamlstm.config import load_settings
from streamlstm.io.admin import ensure_model_topic
from streamlstm.io.modeltopic import KEEP_RECORDS, MODEL_KEY, ModelFollower, ModelPublisher

pytestmark = pytest.mark.integration


def test_a_follower_reads_the_newest_records_then_follows(
    kafka_tools: KafkaTools, client: str
) -> None:
    topic = f"model-{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        overrides={"kafka.bootstrap_servers": kafka_tools.bootstrap, "kafka.client": client}
    )
    ensure_model_topic(settings.kafka, topic)
    ensure_model_topic(settings.kafka, topic)  # exists: left as it is
    publisher = ModelPublisher(settings, topic)
    acks: list[BaseException | None] = []
    for version in range(1, 7):
        publisher.publish(f"v{version}".encode(), version, acks.append)
    publisher.producer.flush(timeout=30)
    other = KafkaProducer(bootstrap_servers=kafka_tools.bootstrap)
    other.send(topic, key=MODEL_KEY, value=None)  # a tombstone
    other.send(topic, key=b"something-else", value=b"not weights")
    other.flush(timeout=30)
    other.close(timeout=5)
    assert acks == [None] * 6

    follower = ModelFollower(settings, topic)
    try:
        newest = follower.read_to_end(30)
        assert follower.caught_up()  # judged by the fetched high watermark
        assert newest == [f"v{v}".encode() for v in range(7 - KEEP_RECORDS, 7)]
        assert follower.poll(0) == []
        publisher.publish(b"v7", 7, acks.append)
        started = time.monotonic()
        arrived = wait_for(lambda: follower.poll(0), 10, interval=0.02, what="v7 to arrive")
        assert arrived == [b"v7"] and time.monotonic() - started < 5
    finally:
        follower.close()
        publisher.close()
