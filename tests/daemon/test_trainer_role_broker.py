"""Two members, one trainer, one model: on the real broker, with ``streamlstm run`` processes.

Both members run with training on and a schedule that adopts within seconds. Exactly one
of them (the owner of input partition 0) trains; the other serves the weights the trainer
publishes to the model topic, from the next batch after they arrive: its first prediction
under a version follows the trainer's first one by less than a commit interval (output
records' broker timestamps). Killing the trainer (SIGKILL, its children included) moves
partition 0, and with it the role, to the other member, which then trains itself, from
the newest weights.

Nothing here leans on the broker compacting the model topic (the members keep the newest
valid record, however many there are) or on ``end_offsets()``.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
from conftest import (
    KafkaTools,
    crash_daemon,
    daemon_overrides,
    http_get,
    logged_metrics_port,
    start_daemon,
    wait_for,
)
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

KEYS = 8  # k0..k3 on input partition 0 (the trainer's), k4..k7 on partition 1
TICK_SECONDS = 0.04
COMMIT_MS = 1000
TRAINING = {  # small runs, often: an adoption within seconds of the first events
    "training.enabled": "true",
    "training.executor": "thread",  # no child process to start (seconds on a busy machine)
    "training.torch_threads": "1",
    "training.first_run_events": "64",
    "training.interval_events": "400",
    "training.interval_seconds": "1",
    "training.window": "16",
    "training.burn_in": "4",
    "training.tbptt_steps": "8",
    "training.batch_windows": "8",
    "training.validation_windows": "8",
    "training.steps_per_run": "6",
    "training.learning_rate": "0.01",
    "training.replay_bytes": str(2**20),
}


def _flow(topic: str, bootstrap: str, stop: threading.Event, errors: list) -> None:
    """Sine waves, one per key, each key always on the same input partition."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    try:
        step = 0
        while not stop.is_set():
            for k in range(KEYS):
                x = step * 0.2 + k
                doc = {"key": f"k{k}", "ts": 1000.0 + step, "values": [math.sin(x), math.cos(x)]}
                producer.send(
                    topic, key=f"k{k}".encode(), value=orjson.dumps(doc), partition=k * 2 // KEYS
                )
            step += 1
            stop.wait(TICK_SECONDS)
    except BaseException as exc:
        errors.append(exc)
    finally:
        producer.close(timeout=5)


def _scrape(port: int) -> dict[str, float]:
    """Samples by name with their labels, e.g. ``streamlstm_model_records_total{published}``."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(s.labels.values())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class _Watch:
    """Scrapes a member's ``streamlstm_model_version`` in a thread: when it first showed
    each version (ms since the epoch, as record timestamps are)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.first: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> _Watch:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):  # each scrape costs the member a little GIL
            version = _scrape(self.port).get("streamlstm_model_version")
            if version is not None:
                self.first.setdefault(int(version), time.time() * 1000)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class _Outputs:
    """Output records: per model version, the first record timestamp on each side; and
    the model topic's records: per version, when the trainer published it."""

    def __init__(self, bootstrap: str, topic: str, model_topic: str) -> None:
        """Once the members run: they create the model topic."""
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self.model = TopicPartition(model_topic, 0)
        tps = [TopicPartition(topic, p) for p in range(2)]
        self.consumer.assign([*tps, self.model])
        self.consumer.seek_to_beginning(*tps, self.model)
        self.first: dict[tuple[int, int], int] = {}  # (input partition, version) -> ms
        self.published: dict[int, int] = {}  # version -> ms

    def poll(self) -> None:
        for tp, records in self.consumer.poll(timeout_ms=100).items():
            for r in records:
                if tp == self.model:
                    version = int(dict(r.headers)["version"])
                    self.published.setdefault(version, r.timestamp)
                    continue
                doc = orjson.loads(r.value)
                side = int(doc["key"][1:]) * 2 // KEYS
                seen = self.first.get((side, doc["model_version"]))
                if seen is None or r.timestamp < seen:
                    self.first[(side, doc["model_version"])] = r.timestamp

    def first_at_least(self, side: int, version: int) -> int | None:
        times = [t for (s, v), t in self.first.items() if s == side and v >= version]
        return min(times) if times else None


def test_one_member_trains_all_serve_its_weights_and_the_role_moves_on_a_kill(
    kafka_tools: KafkaTools, tmp_path: Path, client: str
) -> None:
    started = time.monotonic()
    prefix = f"role-{uuid.uuid4().hex[:10]}"
    kafka_tools.create({f"{prefix}-in": 2, f"{prefix}-out": 2, f"{prefix}-dlq": 2})
    overrides = {
        **daemon_overrides(prefix, client=client),
        **TRAINING,
        "kafka.commit_interval_ms": str(COMMIT_MS),
        "training.model_topic": f"{prefix}-model",  # created (compacted) by the members
    }
    stop, errors = threading.Event(), []
    flow = threading.Thread(
        target=_flow, args=(f"{prefix}-in", kafka_tools.bootstrap, stop, errors), daemon=True
    )
    outputs: _Outputs | None = None
    watch: _Watch | None = None
    logs = {name: tmp_path / f"{name}.log" for name in "ab"}
    procs = {n: start_daemon(kafka_tools.bootstrap, overrides, log) for n, log in logs.items()}
    try:
        ports = {n: logged_metrics_port(logs[n], procs[n], 60) for n in procs}
        flow.start()

        def settled() -> tuple[str, str] | None:
            """(trainer, other) once both are ready and exactly one holds the role."""
            m = {n: _scrape(p) for n, p in ports.items()}
            if not all(v.get("streamlstm_ready") == 1 for v in m.values()):
                return None
            roles = sorted(m, key=lambda n: -m[n].get("streamlstm_trainer_role", 0))
            ones = [m[n].get("streamlstm_trainer_role") for n in roles]
            return (roles[0], roles[1]) if ones == [1, 0] else None

        trainer, other = wait_for(settled, 60, interval=0.2, what="one trainer, both ready")
        m = _scrape(ports[other])
        runs_before = m.get("streamlstm_finetune_seconds_count", 0)
        # Versions published before the group settled may have been served on both sides by
        # one member (it held both partitions then): judge the first one published after.
        watch = _Watch(ports[other]).start()
        outputs = _Outputs(kafka_tools.bootstrap, f"{prefix}-out", f"{prefix}-model")
        settled_ms = time.time() * 1000

        def published() -> tuple[int, int] | None:
            outputs.poll()
            newer = sorted((v, at) for v, at in outputs.published.items() if at > settled_ms)
            return newer[0] if newer else None

        version, at = wait_for(published, 60, interval=0, what="the trainer to publish")

        def served() -> float | None:
            times = [t for v, t in watch.first.items() if v >= version]
            return min(times) if times else None

        # The other member swaps it in at its next batch: its model_version gauge (set as
        # it processes a batch) shows it. The trainer serves it without the topic.
        gap = wait_for(served, 30, interval=0.02, what="the other member to serve it") - at
        assert gap <= COMMIT_MS, f"v{version}: served by the other member {gap:.0f} ms late"

        def both_served() -> bool:  # and so say the output records, on both sides
            outputs.poll()
            return None not in (
                outputs.first_at_least(0, version),
                outputs.first_at_least(1, version),
            )

        wait_for(both_served, 60, interval=0, what="predictions under it from both members")
        watch.stop()
        m_trainer, m_other = _scrape(ports[trainer]), _scrape(ports[other])
        assert m_other.get("streamlstm_model_records_total{adopted}", 0) >= 1
        assert m_other.get("streamlstm_model_records_total{rejected}", 0) == 0
        # Exactly one trains: the other never ran fine-tuning while the trainer held the role.
        assert m_other.get("streamlstm_trainer_role") == 0
        assert m_other.get("streamlstm_finetune_seconds_count", 0) == runs_before
        assert m_trainer.get("streamlstm_finetune_seconds_count", 0) >= 2
        newest = int(m_trainer["streamlstm_model_version"])

        crash_daemon(procs[trainer])  # SIGKILL: no leaving the group, no flush

        def took_over() -> dict[str, float] | None:
            m = _scrape(ports[other])
            done = m.get("streamlstm_trainer_role") == 1
            return (
                m if done and m.get("streamlstm_finetune_seconds_count", 0) > runs_before else None
            )

        m = wait_for(took_over, 45, interval=0.2, what="the role to move and the other to train")
        assert m["streamlstm_model_version"] >= newest  # it trains from the newest weights
        assert not errors, f"the test producer failed: {errors[0]!r}"
    finally:
        stop.set()
        flow.join(timeout=10) if flow.ident else None
        for proc in procs.values():
            crash_daemon(proc)
        if outputs is not None:
            outputs.consumer.close(autocommit=False)
        if watch is not None:
            watch.stop()
    assert time.monotonic() - started < 120
