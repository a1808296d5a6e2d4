"""The output side: prediction records and dead letters, produced without waiting.

``send`` returns at once with one future per record; the daemon keeps them in a
:class:`~streamlstm.io.offsets.Ticket` and commits offsets only after they resolve.
With ``acks=all`` the producer is idempotent, so retries keep each partition's order:
the predictions of one key (one output partition) appear in the order of its events.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

import orjson
from kafka import KafkaProducer

from streamlstm.config import Settings
from streamlstm.io.offsets import Send

log = logging.getLogger(__name__)

_ACKS: dict[str, int | str] = {"all": "all", "1": 1, "0": 0}


class Predictions(Protocol):
    """What the sink needs of the engine's ``BatchOutput`` (io stays free of torch)."""

    keys: list[str]

    def records(self) -> Iterator[dict[str, Any]]: ...


def encode_predictions(output: Predictions) -> list[bytes]:
    """One JSON document per event (``key, ts, prediction, error, anomaly_score, ...``)."""
    dumps = orjson.dumps
    return [dumps(r) for r in output.records()]


class Sink:
    """A kafka-python producer writing predictions (keyed by stream key) and dead letters."""

    def __init__(self, settings: Settings, bootstrap_timeout_ms: int = 5000) -> None:
        k = settings.kafka
        self.output_topic = k.output_topic
        self.dead_letter_topic = k.dead_letter_topic
        acks = _ACKS[k.producer_acks]
        self.producer = KafkaProducer(
            **k.client_kwargs(),
            acks=acks,
            enable_idempotence=acks == "all",
            linger_ms=k.producer_linger_ms,
            compression_type=None if k.compression_type == "none" else k.compression_type,
            batch_size=256 * 1024,
            # A dead letter is a copy of an input record plus a few headers.
            max_request_size=max(1_048_576, settings.engine.max_message_bytes) + 64 * 1024,
            bootstrap_timeout_ms=bootstrap_timeout_ms,
            metrics_enabled=False,
        )

    def send_predictions(self, output: Predictions) -> tuple[list[Any], list[Send]]:
        """Produce one record per event, keyed by its stream key; futures in event order."""
        topic = self.output_topic
        send = self.producer.send
        values = encode_predictions(output)
        keys = [key.encode() for key in output.keys]
        futures = [send(topic, value=v, key=k) for k, v in zip(keys, values, strict=True)]
        sends: list[Send] = [(topic, k, v, None) for k, v in zip(keys, values, strict=True)]
        return futures, sends

    def send_records(self, sends: list[Send]) -> list[Any]:
        """Produce ready-made records (dead letters, or a repeat of failed sends)."""
        send = self.producer.send
        return [send(t, value=v, key=k, headers=h) for t, k, v, h in sends]

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every record sent so far; False if some are pending."""
        try:
            self.producer.flush(timeout=timeout_s)
        except Exception as exc:  # KafkaTimeoutError: the broker did not answer in time
            log.warning("producer flush did not finish in %.1fs: %s", timeout_s, exc)
            return False
        return True

    def close(self, timeout_s: float = 2.0) -> None:
        try:
            self.producer.close(timeout=timeout_s)
        except Exception as exc:
            log.warning("producer close: %s", exc)
