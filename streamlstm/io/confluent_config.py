"""streamlstm's Kafka settings in librdkafka's names (``kafka.client = "confluent"``).

One place maps every setting, so both clients mean the same thing by it; the table in
``docs/configuration.md`` ("Choosing the Kafka client") is this module in prose.

>>> from streamlstm.config import KafkaSettings
>>> k = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
...                   sasl_username="u", sasl_password="p")
>>> c = common_config(k)
>>> c["security.protocol"], c["sasl.mechanism"], c["sasl.password"]
('sasl_ssl', 'SCRAM-SHA-512', 'p')
>>> producer_config(k, max_message_bytes=1_048_576)["enable.idempotence"]
True
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamlstm.config import KafkaSettings

#: The eager assignors, as kafka-python's defaults: ``on_assign`` gets the whole new
#: assignment, and a group may mix both clients while it moves from one to the other.
ASSIGNORS = "range,roundrobin"
BATCH_BYTES = 256 * 1024  # as the kafka-python producer's batch_size
DELIVERY_TIMEOUT_MS = 120_000  # kafka-python's delivery_timeout_ms (librdkafka's: 300 s)


def common_config(k: KafkaSettings) -> dict[str, Any]:
    """Connection and security settings (every client: consumer, producer, reader)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": ",".join(s.strip() for s in k.bootstrap_servers.split(",")),
        "client.id": k.client_id,
        "security.protocol": k.security_protocol.lower(),
        "socket.nagle.disable": True,  # kafka-python sets TCP_NODELAY too: latency
        "logger": logging.getLogger("streamlstm.io.librdkafka"),
    }
    for ours, theirs in (
        ("ssl_cafile", "ssl.ca.location"),
        ("ssl_certfile", "ssl.certificate.location"),
        ("ssl_keyfile", "ssl.key.location"),
    ):
        value = getattr(k, ours)
        if value is not None:
            conf[theirs] = str(value)
    if k.sasl_mechanism is not None:
        conf["sasl.mechanism"] = k.sasl_mechanism
        if k.sasl_username is not None:
            conf["sasl.username"] = k.sasl_username
        if k.sasl_password is not None:
            conf["sasl.password"] = k.sasl_password.get_secret_value()
    return conf


def consumer_config(k: KafkaSettings, group_id: str | None = None) -> dict[str, Any]:
    """The daemon's group consumer: nothing committed or stored but by the daemon."""
    return {
        **common_config(k),
        "group.id": group_id or k.group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": k.auto_offset_reset,
        # librdkafka's defaults (45 s) would make a join wait that long on brokers that
        # hold a new group's first JoinGroup for half the session timeout (Tansu).
        "session.timeout.ms": k.session_timeout_ms,
        "heartbeat.interval.ms": k.heartbeat_interval_ms,
        "partition.assignment.strategy": ASSIGNORS,
        "fetch.wait.max.ms": k.fetch_max_wait_ms,
        "max.partition.fetch.bytes": k.max_partition_fetch_bytes,
        "statistics.interval.ms": 1000,  # group state and broker contact for /readyz
    }


def reader_config(k: KafkaSettings, max_fetch_bytes: int, fetch_wait_ms: int) -> dict[str, Any]:
    """A consumer outside any group (changelog, model topic): reports partition ends."""
    return {
        **common_config(k),
        "group.id": "streamlstm-reader",  # required by the client; never joined or committed
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,  # the fetch reached the high watermark
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": fetch_wait_ms,
        "max.partition.fetch.bytes": max_fetch_bytes,
        "fetch.max.bytes": max(max_fetch_bytes, 64 << 20),
        "receive.message.max.bytes": max(max_fetch_bytes, 64 << 20) + 1_000_000,
    }


def producer_config(
    k: KafkaSettings,
    max_message_bytes: int,
    acks: str | None = None,
    idempotent: bool | None = None,
    linger_ms: int | None = None,
) -> dict[str, Any]:
    """The producer: outputs, dead letters, changelog rows (or, with overrides, weights)."""
    acks = acks or k.producer_acks
    return {
        **common_config(k),
        "acks": acks,
        "enable.idempotence": (acks == "all") if idempotent is None else idempotent,
        "linger.ms": k.producer_linger_ms if linger_ms is None else linger_ms,
        "compression.type": k.compression_type,
        "batch.size": BATCH_BYTES,
        "message.max.bytes": max_message_bytes,
        # Keyed records get explicit partitions (murmur2, as the Java clients and
        # kafka-python); this only decides for records without a key.
        "partitioner": "murmur2_random",
        "message.timeout.ms": DELIVERY_TIMEOUT_MS,
    }
