"""Every Prometheus metric of streamlstm, in one place, and the HTTP endpoint that serves them.

Names follow Prometheus conventions: base units in the name (``_seconds``, ``_bytes``),
``_total`` on counters. Labels are bounded (topic, partition, reason, cause, detector,
result); a stream key is never a label, since keys are unbounded.

Each :class:`Metrics` owns its own registry, so several daemons (or tests) can live in
one process. The endpoint serves ``/metrics``, ``/healthz`` (the process is alive) and
``/readyz`` (partitions assigned and the broker reachable, as set by the daemon).
``/healthz`` fails (503, with the reason) when the daemon says it is stuck: a loop that
no longer turns is a process to restart, even if its HTTP thread still answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from streamlstm import __version__

# Batches of a few to tens of thousands of events; latencies from 100 µs to a minute.
disable_created_metrics()  # `_created` series double the exposition and nobody graphs them

_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
_FAST_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_LATENCY_BUCKETS = (1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_FINETUNE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """All metrics of one daemon, registered in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("streamlstm_build", "Version of streamlstm.", registry=r)
        self.build_info.info({"version": __version__})

        # Input and output.
        self.events = Counter(
            "streamlstm_events", "Events decoded from the input topic.", ["topic"], registry=r
        )
        self.events_rejected = Counter(
            "streamlstm_events_rejected",
            "Events that failed decoding or validation, sent to the dead-letter topic.",
            ["reason"],
            registry=r,
        )
        self.predictions = Counter(
            "streamlstm_predictions", "Prediction records acknowledged by the broker.", registry=r
        )
        self.anomalies = Counter(
            "streamlstm_anomalies",
            "Events whose anomaly score reached engine.anomaly_threshold.",
            registry=r,
        )
        self.key_partition_mismatch = Counter(
            "streamlstm_key_partition_mismatch",
            "Events whose Kafka record key differs from their JSON key (unkeyed records are "
            "not counted), and held keys arriving on another partition. Producers must key "
            "records by the stream key: otherwise one key's events reach several "
            "partitions and members, and its state splits.",
            registry=r,
        )
        self.dead_letters = Counter(
            "streamlstm_dead_letters",
            "Records written to the dead-letter topic.",
            ["reason"],
            registry=r,
        )

        # The engine.
        self.batch_size = Histogram(
            "streamlstm_batch_size", "Events per micro-batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "streamlstm_inference_seconds",
            "Engine time per micro-batch (score, normalise, step).",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.event_latency_seconds = Histogram(
            "streamlstm_event_latency_seconds",
            "From the event's ts to its prediction acknowledged by the broker.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.processing_latency_seconds = Histogram(
            "streamlstm_processing_latency_seconds",
            "From the record being polled to its prediction acknowledged by the broker.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "streamlstm_consumer_lag",
            "Records between the consumer's position and the partition's high watermark.",
            ["partition"],
            registry=r,
        )
        self.keys = Gauge("streamlstm_keys", "Stream keys held in the state store.", registry=r)
        self.state_bytes = Gauge(
            "streamlstm_state_bytes", "Memory of the keyed state store.", registry=r
        )
        self.state_evictions = Counter(
            "streamlstm_state_evictions",
            "Keys evicted from the state store.",
            ["cause"],
            registry=r,
        )
        self.state_resets = Counter(
            "streamlstm_state_resets",
            "Key rows reset to a fresh key's row (non_finite: a NaN or an infinity in it).",
            ["cause"],
            registry=r,
        )
        self.commits = Counter(
            "streamlstm_commits", "Offset commits that the broker accepted.", registry=r
        )
        self.commit_failures = Counter(
            "streamlstm_commit_failures", "Offset commits that failed.", registry=r
        )
        # Durable key state: the changelog, restores, rebalances.
        self.changelog_records = Counter(
            "streamlstm_changelog_records",
            "Key rows (and tombstones of evicted keys) acknowledged by the state changelog.",
            registry=r,
        )
        self.changelog_bytes = Counter(
            "streamlstm_changelog_bytes",
            "Bytes of key rows (values) acknowledged by the state changelog.",
            registry=r,
        )
        self.changelog_rejected = Counter(
            "streamlstm_changelog_rejected",
            "Changelog records not restored because their layout (version, fingerprint, "
            "size) is not this build's or their values are impossible (NaN or infinity, "
            "an event time in the far future): those keys start afresh.",
            registry=r,
        )
        self.state_commit_seconds = Histogram(
            "streamlstm_state_commit_seconds",
            "From taking the changed rows to the changelog acknowledging them (the input "
            "offsets are committed right after).",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.restore_seconds = Histogram(
            "streamlstm_restore_seconds",
            "Time to restore one input partition's keys from the changelog.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.restored_keys = Counter(
            "streamlstm_restored_keys", "Keys restored from the changelog.", registry=r
        )
        self.events_skipped = Counter(
            "streamlstm_events_skipped",
            "Re-read events already reflected in their key's restored state: not applied "
            "again, no output written again (their outputs were acknowledged before).",
            registry=r,
        )
        self.rebalances = Counter(
            "streamlstm_rebalances", "Partition assignments received from the group.", registry=r
        )
        self.partitions_owned = Gauge(
            "streamlstm_partitions_owned", "Input partitions this member holds.", registry=r
        )
        self.broker_errors = Counter(
            "streamlstm_broker_errors",
            "Errors talking to the broker (the daemon retries with backoff).",
            ["operation"],
            registry=r,
        )
        self.model_version = Gauge(
            "streamlstm_model_version", "Version of the weights serving predictions.", registry=r
        )
        self.ready = Gauge(
            "streamlstm_ready",
            "1 when partitions are assigned and the broker reachable.",
            registry=r,
        )

        # Learning and drift.
        self.forecaster_lead_share = Gauge(
            "streamlstm_forecaster_lead_share",
            "Share of the live keys whose forecast combination each forecaster leads "
            "(network, persistence, ewma; seasonal with engine.season_events).",
            ["forecaster"],
            registry=r,
        )
        self.finetune_runs = Counter(
            "streamlstm_finetune_runs",
            "Fine-tuning runs by outcome (adopted, rejected by the validation gate, failed).",
            ["result"],
            registry=r,
        )
        self.finetune_seconds = Histogram(
            "streamlstm_finetune_seconds",
            "Duration of fine-tuning runs.",
            buckets=_FINETUNE_BUCKETS,
            registry=r,
        )
        self.finetune_loss = Gauge(
            "streamlstm_finetune_loss", "Training loss of the last fine-tuning run.", registry=r
        )
        self.validation_loss = Gauge(
            "streamlstm_validation_loss",
            "Held-out loss of the serving weights at the last validation.",
            registry=r,
        )
        self.replay_bytes = Gauge(
            "streamlstm_replay_bytes", "Memory held by the replay buffer.", registry=r
        )
        self.trainer_up = Gauge(
            "streamlstm_trainer_up",
            "1 while the fine-tuning worker is running; 0 while it is dead or backing off "
            "before a restart (and when fine-tuning is disabled or this member does not "
            "hold the trainer role).",
            registry=r,
        )
        self.trainer_restarts = Counter(
            "streamlstm_trainer_restarts",
            "Fine-tuning workers restarted after dying or overrunning "
            "training.run_timeout_seconds.",
            registry=r,
        )
        self.trainer_role = Gauge(
            "streamlstm_trainer_role",
            "1 on the one member that fine-tunes (the owner of input partition 0, with "
            "training.enabled), 0 on the others.",
            registry=r,
        )
        self.model_records = Counter(
            "streamlstm_model_records",
            "Model-topic records: published (this member's trainer adopted them), adopted "
            "(swapped in), rejected (integrity or architecture check failed), stale (not "
            "newer than the weights served).",
            ["result"],
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "streamlstm_checkpoint_failures",
            "Adopted weights whose checkpoint could not be written (they are served anyway).",
            registry=r,
        )
        self.drift = Counter("streamlstm_drift", "Drift detections.", ["detector"], registry=r)
        self.last_model_update = Gauge(
            "streamlstm_last_model_update_timestamp_seconds",
            "Unix time the serving weights last changed.",
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text format of all metrics, as served on /metrics."""
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """Observe every value of ``values`` at once (one lock per bucket, not per value).

    Thousands of events per batch would cost a Python call each through ``observe``;
    this bins them with numpy and adds the counts. Relies on prometheus-client's
    histogram layout (non-cumulative ``_buckets`` over ``_upper_bounds``, ``_sum``);
    falls back to ``observe`` if that ever changes.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(buckets) != len(bounds):
        for v in values.tolist():
            histogram.observe(v)
        return
    index = np.searchsorted(np.asarray(bounds), values, side="left")
    counts = np.bincount(index, minlength=len(bounds))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(float(counts[i]))
    total.inc(float(values.sum()))


IDLE_TIMEOUT_SECONDS = 10.0  # a connection silent this long is closed (each holds a thread)


class MetricsServer:
    """HTTP endpoint: /metrics, /healthz, /readyz. Runs in a daemon thread.

    ``ready`` answers /readyz; ``unhealthy`` returns why the process is stuck (or None),
    which fails /healthz.
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        ready: Callable[[], bool] | None = None,
        unhealthy: Callable[[], str | None] | None = None,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
    ) -> None:
        self.metrics = metrics
        self.ready = ready or (lambda: True)
        self.unhealthy = unhealthy or (lambda: None)
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = idle_timeout  # socket timeout: idle or stalled clients are dropped

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, server.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    why = server.unhealthy()
                    if why is None:
                        self._reply(200, b"ok\n")
                    else:
                        self._reply(503, f"unhealthy: {why}\n".encode())
                elif path == "/readyz":
                    ok = server.ready()
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _reply(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the daemon's log

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
