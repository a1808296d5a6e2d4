"""The settings' sections: one pydantic model per section, with its defaults and checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from streamlstm.validation import MIN_TS


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line naming the field."""


class Section(BaseModel):
    """Base of every section: unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaSettings(Section):
    """Where events come from and where predictions go."""

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Comma-separated host:port list of Kafka brokers."
    )
    client: Literal["kafka-python", "confluent"] = Field(
        "kafka-python",
        description="The Kafka client library: kafka-python (pure Python, installed with "
        "streamlstm) or confluent (librdkafka through confluent-kafka: `pip install "
        "'streamlstm[confluent]'`; faster). Same settings, same commit protocol; see the "
        'README\'s "Choosing the Kafka client".',
    )
    input_topic: str = Field("events", min_length=1, description="Topic the events are read from.")
    output_topic: str = Field(
        "predictions", min_length=1, description="Topic the prediction records are written to."
    )
    dead_letter_topic: str = Field(
        "events.dlq", min_length=1, description="Topic for records that fail decoding/validation."
    )
    group_id: str = Field("streamlstm", min_length=1, description="Consumer group id.")
    client_id: str = Field("streamlstm", min_length=1, description="Client id sent to brokers.")
    create_topics: bool = Field(True, description="Create missing topics at start-up.")
    partitions: int = Field(3, ge=1, description="Partitions for topics created at start-up.")
    replication_factor: int = Field(1, ge=1, description="Replication for created topics.")
    session_timeout_ms: int = Field(10_000, ge=1000, description="Consumer session timeout.")
    heartbeat_interval_ms: int = Field(2_000, ge=100, description="Consumer heartbeat interval.")
    poll_timeout_ms: int = Field(100, ge=0, description="Longest wait for records in one poll.")
    fetch_max_wait_ms: int = Field(
        25, ge=0, description="Longest a fetch waits on the broker for data (bounds latency)."
    )
    commit_interval_ms: int = Field(1_000, ge=0, description="How often offsets are committed.")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a new consumer group starts reading."
    )
    max_partition_fetch_bytes: int = Field(
        1_048_576, ge=1024, description="Most bytes fetched per partition per request."
    )
    output_per_message: bool = Field(
        False,
        description="Write one output message per input message: a JSON array of its "
        "prediction records in input order (always an array, even for one event), keyed by "
        "the input message's key (its first event's key when it has none). For producers "
        "that send events in arrays: the output then costs what the input costs. False: one "
        "record per event. Dead letters are unchanged; `streamlstm backtest` still writes "
        "one record a line. An array past 1 MB is split into consecutive arrays.",
    )
    producer_linger_ms: int = Field(5, ge=0, description="Producer batching delay.")
    producer_acks: Literal["all", "1", "0"] = Field(
        "all",
        description="Acknowledgements the producer waits for (`0` needs "
        "`kafka.allow_unsafe_acks`: outputs could be lost after their offsets are committed).",
    )
    allow_unsafe_acks: bool = Field(
        False,
        description='Allow `producer_acks = "0"`: the producer reports every record as '
        "delivered at once, so input offsets are committed for outputs the broker may "
        "never have stored.",
    )
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Compression of produced batches."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Broker transport security."
    )
    ssl_cafile: Path | None = Field(None, description="CA bundle for TLS.")
    ssl_certfile: Path | None = Field(None, description="Client certificate for TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client private key for TLS.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = (
        Field(
            None,
            description="SASL mechanism, when security_protocol uses SASL (OAUTHBEARER needs "
            "a token provider object, which a settings file cannot give: refused).",
        )
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password.")

    @model_validator(mode="after")
    def _check_kafka(self) -> KafkaSettings:
        """Combinations kafka-python or the broker would refuse only after start-up (then
        retried forever as "cannot reach Kafka"), or would silently ignore."""
        from streamlstm.config.kafka_checks import kafka_problems

        for problem in kafka_problems(self):
            raise ValueError(problem)
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """Connection and security settings in kafka-python's keyword names."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",")],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = str(value)
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return kwargs


class ModelSettings(Section):
    """The recurrent network."""

    input_size: int | None = Field(
        None, ge=1, le=4096, description="Width of `values`; replay infers it from the file."
    )
    hidden_size: int = Field(64, ge=1, le=4096, description="Units per recurrent layer.")
    num_layers: int = Field(2, ge=1, le=16, description="Stacked recurrent layers.")
    cell: Literal["lstm", "gru"] = Field("lstm", description="Recurrent cell type.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout between layers (training).")
    inputs: Literal["level", "change"] = Field(
        "level",
        description="What the network sees: normalised values, or their change since the "
        "key's last event (robust when levels drift).",
    )
    seed: int = Field(0, ge=0, description="Seed for weight initialisation.")
    quantize: bool = Field(False, description="Int8 dynamic quantization for CPU inference.")


class EngineSettings(Section):
    """The micro-batch step."""

    max_batch: int = Field(2048, ge=1, le=1_000_000, description="Most events per micro-batch.")
    torch_threads: int = Field(1, ge=1, le=256, description="Intra-op threads for inference.")
    fused: bool = Field(
        True,
        description="Run the step through the fused kernels (packed LSTM weights, state "
        "updated in place in the gathered rows); false: the plain reference path. Both give "
        "the same outputs to float32 rounding. Float LSTMs only; others use the plain path.",
    )
    input_clip: float = Field(
        10.0, gt=0, description="Normalised inputs are clipped to +-this many standard deviations."
    )
    max_step: float | None = Field(
        None,
        gt=0,
        description="Cap on how far a prediction moves from the key's last values, in "
        "multiples of its typical step-to-step change (None: no cap).",
    )
    season_events: int | None = Field(
        None,
        ge=2,
        le=10_000,
        description="The keys' seasonal period in events (24: hourly data with a daily "
        "cycle): adds a seasonal-naive forecaster (the value one period ago) to each "
        "key's combination, at 4 bytes per value per event of the period (None: none).",
    )
    anomaly_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Anomaly score at or above which an event is an alarm (0.5: fresh evidence "
        "with a tail probability below 1e-5).",
    )
    max_message_bytes: int = Field(
        1_048_576, ge=64, description="Larger messages are rejected as `too_large`."
    )
    min_ts: float = Field(
        MIN_TS,
        description="Events before this time (epoch seconds) are rejected as `bad_ts`. "
        "Old events are legitimate (backfills, replays, pre-1970 history); the default, "
        "the start of year 1, only rejects times no calendar names.",
    )
    max_future_seconds: float | None = Field(
        86_400.0,
        ge=0,
        description="Events further than this ahead of the wall clock are rejected as "
        "`bad_ts` (one would advance event time and evict every key by TTL; a timestamp "
        "in milliseconds is far in the future). None: no bound against the clock "
        "(times after year 9999 are always rejected). Offline replay never uses it.",
    )


class StateSettings(Section):
    """The keyed state store."""

    max_keys: int = Field(1_000_000, ge=1, description="Keys kept; beyond it LRU keys go first.")
    ttl_seconds: float = Field(
        86_400.0, gt=0, description="Keys idle this long in event time are evicted."
    )
    initial_capacity: int = Field(1024, ge=1, description="Slots preallocated at start.")
    recurrent_dtype: Literal["float16", "float32"] = Field(
        "float16",
        description="How a key's row stores its recurrent state: float16 halves the bytes "
        "per key (the step computes in float32 and rounds once when it stores the state).",
    )
    scaler_window: int = Field(
        10_000,
        ge=2,
        description="Per-key normalisation is exact over the first N events, then exponential.",
    )
    anomaly_short_alpha: float = Field(
        0.5, gt=0, le=1, description="Smoothing of the short error window (anomaly score)."
    )
    anomaly_long_alpha: float = Field(
        0.001,
        gt=0,
        le=1,
        description="Smoothing of the long error window (anomaly score): about 1/alpha "
        "events, long enough to span several cycles of a key's usual rhythm.",
    )
    anomaly_min_events: int = Field(
        20, ge=1, description="Errors a key needs before its anomaly score leaves 0."
    )
    changelog: bool = Field(
        True,
        description="Daemon: keep every key's row in a compacted changelog topic, restored "
        "on restart and rebalance (off: keys start afresh after either).",
    )
    changelog_topic: str = Field(
        "",
        description="The changelog topic (empty: `<kafka.group_id>.<kafka.input_topic>.state`: "
        "one per consumer group, so two jobs reading one input never share key state).",
    )
    restore_timeout_seconds: float = Field(
        120.0, gt=0, description="Most time to read one changelog partition when restoring."
    )
    dir: Path | None = Field(
        None,
        description="Daemon: a local snapshot per partition, written at shutdown, so a "
        "restart reads only the changelog's tail (unset: off, the changelog alone).",
    )


class TrainingSettings(Section):
    """Fine-tuning while the stream runs (see ``streamlstm.learning.gate``)."""

    enabled: bool = Field(True, description="Fine-tune the model while events arrive.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where fine-tuning runs (auto: cuda when present)."
    )
    executor: Literal["process", "thread"] = Field(
        "process", description="Daemon: fine-tune in a child process (no GIL contention) or thread."
    )
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="Intra-op threads for training (None: cores - inference)."
    )
    first_run_events: int = Field(
        256,
        ge=1,
        description="Events before the first fine-tuning run (and least between runs).",
    )
    interval_growth: float = Field(
        0.25, gt=0, description="Fine-tune again when the events seen have grown by this share."
    )
    interval_events: int = Field(20_000, ge=1, description="Most events between two runs.")
    interval_seconds: float | None = Field(
        None,
        gt=0,
        description="Also fine-tune once this much time has passed since the last run, if "
        "events arrived (None: off; replay counts it in event time).",
    )
    replay_bytes: int = Field(64 * 2**20, ge=2**16, description="Memory budget of the buffer.")
    window: int = Field(64, ge=2, description="Steps per replay window (burn-in included).")
    burn_in: int = Field(8, ge=0, description="Steps run without gradient before a window.")
    tbptt_steps: int = Field(32, ge=1, description="Truncated BPTT chunk length.")
    batch_windows: int = Field(64, ge=1, description="Windows per training batch.")
    steps_per_run: int = Field(
        50, ge=1, description="Optimiser steps (one per TBPTT chunk) per fine-tuning run."
    )
    recency_half_life: float = Field(
        0.25, gt=0, description="Sampling weight halves every this share of the buffer's rows."
    )
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    clip_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping.")
    lr_patience: int = Field(
        3, ge=0, description="Rejected runs in a row before the learning rate backs off."
    )
    lr_factor: float = Field(0.5, gt=0, lt=1, description="LR multiplier on plateau.")
    min_learning_rate: float = Field(1e-5, gt=0, description="LR floor.")
    early_stop_patience: int = Field(
        10, ge=1, description="Steps without a better smoothed training loss before a run stops."
    )
    validation_windows: int = Field(
        64,
        ge=1,
        description="Most windows the validation gate scores (rows newer than the candidate).",
    )
    run_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="Daemon: a fine-tuning run still going after this long is cancelled "
        "(its child process killed and restarted), so a hung run cannot stop fine-tuning.",
    )
    checkpoint_dir: Path | None = Field(None, description="Where checkpoints are written/read.")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept.")
    model_topic: str | None = Field(
        None,
        min_length=1,
        description="Daemon: compacted topic the trainer publishes adopted weights to and "
        "every member adopts them from (None: `<kafka.group_id>.<kafka.input_topic>.model`).",
    )
    seed: int = Field(0, ge=0, description="Seed for sampling and training.")


class DriftSettings(Section):
    """Detectors over the prediction-error stream (see ``streamlstm.drift``)."""

    enabled: bool = Field(True, description="Run drift detectors.")
    adwin_delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence (global).")
    adwin_block: int = Field(
        256, ge=1, description="Scored events per ADWIN sample (their mean std-unit error)."
    )
    ph_delta: float = Field(0.005, ge=0, description="Page-Hinkley magnitude (per key).")
    ph_threshold: float = Field(50.0, gt=0, description="Page-Hinkley threshold (per key).")
    ph_alpha: float = Field(0.9999, gt=0, le=1, description="Page-Hinkley forgetting factor.")
    ph_min_instances: int = Field(30, ge=1, description="Events before a key can drift.")
    ph_mode: Literal["up", "down", "both"] = Field(
        "up", description="Page-Hinkley direction: rising errors (up), falling, or both."
    )
    finetune_on_drift: bool = Field(True, description="Start fine-tuning at once on drift.")


class MetricsSettings(Section):
    """The Prometheus endpoint."""

    enabled: bool = Field(True, description="Serve /metrics, /healthz and /readyz.")
    host: str = Field("0.0.0.0", description="Address the HTTP endpoint binds.")
    port: int = Field(9400, ge=0, le=65535, description="Port of the HTTP endpoint (0: any).")
    liveness_seconds: float = Field(
        60.0,
        gt=0,
        description="/healthz fails once the loop has not turned this long (longer than the "
        "worst normal stall: the producer process takes up to ~35 s to start).",
    )


class LogSettings(Section):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    json_format: bool = Field(False, description="One JSON object per log line.")
