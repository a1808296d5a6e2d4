"""Topic creation at start-up (``kafka.create_topics``)."""

from __future__ import annotations

import logging
from typing import Any

from streamlstm.config import KafkaSettings

log = logging.getLogger(__name__)
_TOPIC_ALREADY_EXISTS = 36


def ensure_topics(
    kafka: KafkaSettings,
    timeout_s: float = 10.0,
    connect_s: float = 3.0,
    changelog_topic: str | None = None,
) -> None:
    """Create the input, output and dead-letter topics unless they exist, and then the
    compacted state changelog (``changelog_topic``) with the input's partition count.

    Existing topics are left as they are; new ones get ``kafka.partitions`` partitions.
    An unreachable broker fails after ``connect_s`` (the daemon retries with backoff).
    """
    kwargs = kafka.client_kwargs()
    bootstrap = ",".join(kwargs.pop("bootstrap_servers"))
    topics = dict.fromkeys(
        (kafka.input_topic, kafka.output_topic, kafka.dead_letter_topic), kafka.partitions
    )
    common = {
        "replication_factor": kafka.replication_factor,
        "timeout_s": timeout_s,
        "bootstrap_timeout_ms": int(connect_s * 1000),
        **kwargs,
    }
    create_topics(bootstrap, topics, **common)
    if changelog_topic:
        partitions = partition_count(bootstrap, kafka.input_topic, **common) or kafka.partitions
        create_topics(
            bootstrap,
            {changelog_topic: partitions},
            configs={changelog_topic: COMPACTED},
            exact=True,
            **common,
        )


# A changelog keeps the newest record of each key; a tombstone goes after a day.
COMPACTED = {"cleanup.policy": "compact", "delete.retention.ms": "86400000"}


def partition_count(bootstrap: str, topic: str, **client_kwargs: Any) -> int | None:
    """Partitions of ``topic`` (None if the broker does not say)."""
    from kafka import KafkaAdminClient

    client_kwargs.pop("replication_factor", None)
    timeout_s = client_kwargs.pop("timeout_s", 10.0)
    client_kwargs.setdefault("request_timeout_ms", int(timeout_s * 1000))
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, **client_kwargs)
    try:
        for desc in admin.describe_topics([topic]):
            if desc["name"] == topic and desc["partitions"]:
                return len(desc["partitions"])
        return None
    finally:
        admin.close()


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
        configs={topic: {"cleanup.policy": "compact"}},
        bootstrap_timeout_ms=int(connect_s * 1000),
        **kwargs,
    )


def create_topics(
    bootstrap: str,
    topics: dict[str, int],
    *,
    replication_factor: int = -1,
    timeout_s: float = 30.0,
    configs: dict[str, dict[str, str]] | None = None,
    exact: bool = False,
    **client_kwargs: Any,
) -> None:
    """Create ``topics`` (name -> partition count) unless they already exist.

    ``replication_factor=-1`` takes the broker's default. Extra keyword arguments
    go to :class:`kafka.KafkaAdminClient` (security settings, client_id, ...). An
    existing topic is left as it is (a warning is logged if it has fewer
    partitions than asked for; with ``exact``, an error when the count differs at all).
    ``configs``: topic configurations by topic name (e.g. ``cleanup.policy``).
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
                "configs": (configs or {}).get(name, {}),
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
                if exact and have != want:
                    log.error(
                        "topic %r has %d partitions, but must have %d (one per input "
                        "partition): keys of the others are not kept",
                        desc["name"],
                        have,
                        want,
                    )
                elif have < want:
                    log.warning(
                        "topic %r exists with %d partitions (asked for %d)",
                        desc["name"],
                        have,
                        want,
                    )
    finally:
        admin.close()
