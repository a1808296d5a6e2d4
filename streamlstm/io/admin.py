"""Topic creation at start-up (``kafka.create_topics``)."""

from __future__ import annotations

import logging
from typing import Any

from streamlstm.config import KafkaSettings

log = logging.getLogger(__name__)
_TOPIC_ALREADY_EXISTS = 36


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


def ensure_model_topic(
    kafka: KafkaSettings, topic: str, timeout_s: float = 10.0, connect_s: float = 3.0
) -> None:
    """Create the model topic unless it exists: compacted (only the newest weights matter),
    one partition (one writer, and every member reads all of it)."""
    kwargs = kafka.client_kwargs()
    bootstrap = ",".join(kwargs.pop("bootstrap_servers"))
    create_topics(
        bootstrap,
        {topic: 1},
        replication_factor=kafka.replication_factor,
        timeout_s=timeout_s,
        configs={"cleanup.policy": "compact"},
        bootstrap_timeout_ms=int(connect_s * 1000),
        **kwargs,
    )


def create_topics(
    bootstrap: str,
    topics: dict[str, int],
    *,
    replication_factor: int = -1,
    timeout_s: float = 30.0,
    configs: dict[str, str] | None = None,
    **client_kwargs: Any,
) -> None:
    """Create ``topics`` (name -> partition count) unless they already exist.

    ``replication_factor=-1`` takes the broker's default; ``configs`` (e.g.
    ``{"cleanup.policy": "compact"}``) apply to every topic created. Extra keyword arguments
    go to :class:`kafka.KafkaAdminClient` (security settings, client_id, ...). An
    existing topic is left as it is (a warning is logged if it has fewer
    partitions than asked for).
    """
    if not topics:
        return
    from kafka import KafkaAdminClient
    from kafka import errors as kafka_errors

    timeout_ms = int(timeout_s * 1000)
    client_kwargs.setdefault("request_timeout_ms", timeout_ms)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client_kwargs)
    try:
        spec = {
            name: {
                "num_partitions": int(n),
                "replication_factor": replication_factor,
                **({"configs": dict(configs)} if configs else {}),
            }
            for name, n in topics.items()
        }
        result = admin.create_topics(spec, timeout_ms=timeout_ms, raise_errors=False)
        created, existing = [], []
        for topic in result["topics"]:
            code = topic["error_code"]
            if code == 0:
                created.append(topic["name"])
            elif code == _TOPIC_ALREADY_EXISTS:
                existing.append(topic["name"])
            else:
                err = kafka_errors.for_code(code)
                raise err(f"creating topic {topic['name']!r}: {topic.get('error_message')}")
        if created:
            admin.wait_for_topics(created, timeout_ms=timeout_ms)
        if existing:
            for desc in admin.describe_topics(existing):
                have, want = len(desc["partitions"]), topics[desc["name"]]
                if have < want:
                    log.warning(
                        "topic %r exists with %d partitions (asked for %d)",
                        desc["name"],
                        have,
                        want,
                    )
    finally:
        admin.close()
