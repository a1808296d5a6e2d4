"""The model topic's bytes: the trainer publishes adopted weights, every member follows.

One compacted partition, one key (:data:`MODEL_KEY`): the newest record is the weights
the group serves. The values are checkpoint bytes that :mod:`streamlstm.learning.checkpoint`
encodes and verifies; this module only moves them (no torch here).

The follower is a consumer outside the consumer group (no group id, nothing committed):
every member reads the whole partition, from the beginning at start-up, then whatever
arrives, polled with a zero timeout between batches so the loop never waits for it.
Whether it has read everything is judged against the high watermark the fetches report
(:mod:`streamlstm.io.reader`), not ``end_offsets()``, which some brokers under-count.
Both run on the client ``kafka.client`` names.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from streamlstm.config import Settings
from streamlstm.io.client import client_name, make_reader
from streamlstm.io.reader import EndNotReached, read_to_end

log = logging.getLogger(__name__)

MODEL_KEY = b"model"
#: Raw records kept while reading the topic from the beginning: the newest valid one is
#: served, so a few older ones cover a newest one that fails its checks (a topic that
#: was never compacted can hold every version ever published).
KEEP_RECORDS = 4
#: Largest weights record (a checkpoint of a big model is tens of MiB); brokers also cap
#: it (``max.message.bytes``), and a refusal is logged as a failed publish.
MAX_RECORD_BYTES = 64 * 2**20


def _weights(records: list[Any]) -> list[bytes]:
    """The weights records among ``records`` (tombstones and other keys skipped)."""
    return [
        r.value for r in records if r.key == MODEL_KEY and isinstance(r.value, bytes) and r.value
    ]


class ModelFollower:
    """Reads the model topic's one partition outside the group."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.reader = make_reader(settings.kafka, max_fetch_bytes=MAX_RECORD_BYTES)
        self.reader.assign(topic, {0: None})
        self.newest: deque[bytes] = deque(maxlen=KEEP_RECORDS)

    def poll(self, timeout_ms: int = 0) -> list[bytes]:
        """Weights records that arrived, oldest first (tombstones and other keys skipped)."""
        values = _weights(self.reader.poll(timeout_ms / 1000))
        self.newest.extend(values)
        return values

    def caught_up(self) -> bool:
        """Read up to the high watermark the last fetch reported (False before any fetch,
        or when the client cannot tell)."""
        try:
            return self.reader.at_end()
        except Exception:
            return False

    def read_to_end(self, timeout_s: float, stop: Callable[[], bool] | None = None) -> list[bytes]:
        """Read from the current position to the high watermark (start-up); returns the
        newest few records, oldest first. Gives up after ``timeout_s``."""
        try:
            keep = self.newest.extend
            read_to_end(self.reader, lambda r: keep(_weights(r)), timeout_s, stop=stop, poll_s=0.1)
        except EndNotReached:
            log.warning(
                "model topic %s not read to its end within %.0fs; newer weights will be "
                "adopted when they arrive",
                self.topic,
                timeout_s,
            )
        return list(self.newest)

    def close(self) -> None:
        self.reader.close()


class ModelPublisher:
    """Produces weights records (acks=all, no idempotence: it must outlive a broker
    restart, and a repeated record is harmless since members adopt only newer versions)."""

    def __init__(self, settings: Settings, topic: str, bootstrap_timeout_ms: int = 5000) -> None:
        k = settings.kafka
        self.topic = topic
        if client_name(k) == "confluent":
            from streamlstm.io.confluent_config import producer_config
            from streamlstm.io.confluent_producer import ConfluentProducer

            conf = producer_config(k, MAX_RECORD_BYTES, acks="all", idempotent=False, linger_ms=0)
            self.producer: Any = ConfluentProducer(conf, serve=True)
            return
        from kafka import KafkaProducer

        self.producer = KafkaProducer(
            **k.client_kwargs(),
            acks="all",
            enable_idempotence=False,
            linger_ms=0,
            max_block_ms=5000,  # the trainer's supervisor sends: never stall it for long
            max_request_size=MAX_RECORD_BYTES,
            compression_type=None if k.compression_type == "none" else k.compression_type,
            bootstrap_timeout_ms=bootstrap_timeout_ms,
            metrics_enabled=False,
        )

    def publish(
        self, value: bytes, version: int, done: Callable[[BaseException | None], None]
    ) -> None:
        """Send one weights record without waiting; ``done(None or error)`` follows."""
        headers = [("version", str(version).encode())]
        try:
            future = self.producer.send(self.topic, key=MODEL_KEY, value=value, headers=headers)
        except Exception as exc:  # too large, closed, no metadata in time
            done(exc)
            return

        def ok(_: Any) -> None:
            done(None)

        future.add_callback(ok)
        future.add_errback(done)

    def close(self, timeout_s: float = 2.0) -> None:
        self.producer.close(timeout=timeout_s)
