"""Start-up refusals for the Kafka settings: combinations kafka-python or the broker would
refuse only after start-up (then retried forever as "cannot reach Kafka"), or would
silently ignore. Each problem is one line naming the setting to change.

>>> from streamlstm.config import KafkaSettings
>>> kafka_problems(KafkaSettings.model_construct(**{**KafkaSettings().model_dump(),
...     "output_topic": "events", "input_topic": "events"}))[0].split(":")[0]
'kafka.output_topic'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamlstm.config import KafkaSettings

#: kafka-python's defaults the daemon does not override (consumer/producer/admin
#: ``request_timeout_ms`` and ``connections_max_idle_ms``); its consumer requires
#: ``fetch_max_wait_ms < request_timeout_ms < connections_max_idle_ms``.
KAFKA_REQUEST_TIMEOUT_MS = 30_000
KAFKA_CONNECTIONS_MAX_IDLE_MS = 540_000
#: How to get the confluent client (the ``confluent`` extra).
INSTALL_CONFLUENT = "pip install 'streamlstm[confluent]'"
#: Python modules kafka-python needs for a compression codec (``kafka.codec``).
_CODEC_MODULES = {"snappy": ("snappy",), "zstd": ("zstandard",), "lz4": ("lz4", "lz4f")}


def kafka_problems(k: KafkaSettings) -> list[str]:
    """One line per bad combination of Kafka settings, each naming the setting to change."""
    import importlib.util

    problems = []
    for server in k.bootstrap_servers.split(","):
        host, colon, port = server.strip().rpartition(":")
        if not colon:
            host, port = port, "9092"
        if not host or host.endswith(":") or not port.isdigit() or not 0 < int(port) < 65536:
            problems.append(
                f"kafka.bootstrap_servers: expected a comma-separated host:port list "
                f"(got {k.bootstrap_servers!r})"
            )
            break
    if k.fetch_max_wait_ms >= KAFKA_REQUEST_TIMEOUT_MS:
        problems.append(
            f"kafka.fetch_max_wait_ms: must be below kafka-python's request timeout "
            f"({KAFKA_REQUEST_TIMEOUT_MS} ms) (got {k.fetch_max_wait_ms})"
        )
    if k.heartbeat_interval_ms >= k.session_timeout_ms:
        problems.append(
            f"kafka.heartbeat_interval_ms: must be below kafka.session_timeout_ms "
            f"({k.session_timeout_ms}) (got {k.heartbeat_interval_ms})"
        )
    topics = {"input_topic": k.input_topic, "output_topic": k.output_topic}
    topics["dead_letter_topic"] = k.dead_letter_topic
    names = list(topics)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if topics[a] == topics[b]:
                problems.append(
                    f"kafka.{b}: must differ from kafka.{a} (both {topics[a]!r}: the daemon "
                    "would read its own output)"
                )
    sasl = k.security_protocol.startswith("SASL_")
    if sasl and k.sasl_mechanism is None:
        problems.append(
            f"kafka.sasl_mechanism: must be set when kafka.security_protocol is "
            f"{k.security_protocol}"
        )
    if not sasl:
        for name in ("sasl_mechanism", "sasl_username", "sasl_password"):
            if getattr(k, name) is not None:
                problems.append(
                    f"kafka.{name}: set, but kafka.security_protocol is {k.security_protocol} "
                    "(it would be ignored: use SASL_SSL or SASL_PLAINTEXT, or remove it)"
                )
    if k.sasl_mechanism == "OAUTHBEARER":
        problems.append(
            "kafka.sasl_mechanism: OAUTHBEARER needs a token provider object, which "
            "streamlstm's settings cannot give; use PLAIN or SCRAM-SHA-256/512"
        )
    elif sasl and k.sasl_mechanism is not None:
        for name in ("sasl_username", "sasl_password"):
            if getattr(k, name) is None:
                problems.append(f"kafka.{name}: required for SASL {k.sasl_mechanism}")
    if k.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(k, name) is not None:
                problems.append(
                    f"kafka.{name}: set, but kafka.security_protocol is {k.security_protocol} "
                    "(it would be ignored: use SSL or SASL_SSL, or remove it)"
                )
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(k, name)
        if path is not None and not path.is_file():
            problems.append(f"kafka.{name}: no such file ({str(path)!r})")
    if k.ssl_keyfile is not None and k.ssl_certfile is None:
        problems.append("kafka.ssl_certfile: required when kafka.ssl_keyfile is set")
    if k.producer_acks == "0" and not k.allow_unsafe_acks:
        problems.append(
            'kafka.producer_acks: "0" lets input offsets be committed for outputs the '
            'broker may never have stored; use "all" or "1", or set '
            "kafka.allow_unsafe_acks = true (got '0')"
        )
    if k.client == "confluent":
        if importlib.util.find_spec("confluent_kafka") is None:
            problems.append(
                "kafka.client: confluent needs the confluent-kafka package, which is not "
                f"installed: {INSTALL_CONFLUENT}"
            )
        return problems  # librdkafka has its own codecs
    modules = _CODEC_MODULES.get(k.compression_type, ())
    if modules and not any(importlib.util.find_spec(m) is not None for m in modules):
        problems.append(
            f"kafka.compression_type: {k.compression_type} needs the Python package "
            f"{modules[0]!r}, which is not installed"
        )
    return problems
