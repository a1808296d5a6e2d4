"""Topic creation at start-up (``kafka.create_topics``)."""

from __future__ import annotations

from streamlstm.broker import create_topics
from streamlstm.config import KafkaSettings


def ensure_topics(kafka: KafkaSettings, timeout_s: float = 10.0, connect_s: float = 3.0) -> None:
    """Create the input, output and dead-letter topics unless they exist.

    Existing topics are left as they are; new ones get ``kafka.partitions`` partitions.
    An unreachable broker fails after ``connect_s`` (the daemon retries with backoff).
    """
    kwargs = kafka.client_kwargs()
    bootstrap = ",".join(kwargs.pop("bootstrap_servers"))
    topics = dict.fromkeys(
        (kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic), kafka.partitions
    )
    create_topics(
        bootstrap,
        topics,
        replication_factor=kafka.replication_factor,
        timeout_s=timeout_s,
        bootstrap_timeout_ms=int(connect_s * 1000),
        **kwargs,
    )
