"""``streamlstm run`` as a process: SIGTERM, restart without re-predicting, a late broker."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest
from conftest import (
    KafkaTools,
    daemon_overrides,
    http_get,
    logged_metrics_port,
    start_daemon,
    wait_for,
)

from streamlstm.devtools.broker import BrokerError, EmbeddedBroker, find_tansu, free_port

pytestmark = pytest.mark.integration


def _daemon(bootstrap: str, prefix: str, log: Path) -> tuple[subprocess.Popen, int]:
    """A daemon whose metrics server binds port 0; the port it got, from its log."""
    proc = start_daemon(bootstrap, daemon_overrides(prefix), log)
    try:
        return proc, logged_metrics_port(log, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def _events(keys: int, steps: int, t0: float) -> list[tuple[bytes, bytes]]:
    out = []
    for step in range(steps):
        for k in range(keys):
            key = f"k{k}"
            out.append(
                (key.encode(), orjson.dumps({"key": key, "ts": t0 + step, "values": [k, step]}))
            )
    return out


def _stop(proc: subprocess.Popen) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("daemon did not exit within 15s of SIGTERM")
    return code, time.monotonic() - started


def _ready(port: int) -> bool:
    return http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200


def _log_messages(log: Path) -> list[str]:
    messages = []
    for line in log.read_bytes().splitlines():
        try:
            messages.append(orjson.loads(line)["message"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            continue
    return messages


def test_sigterm_exits_0_and_restart_does_not_repredict(
    kafka_tools: KafkaTools, tmp_path: Path
) -> None:
    prefix = f"p-{uuid.uuid4().hex[:10]}"
    kafka_tools.create({f"{prefix}-in": 2, f"{prefix}-out": 2, f"{prefix}-dlq": 2})
    log = tmp_path / "first.log"
    first, port = _daemon(kafka_tools.bootstrap, prefix, log)
    try:
        wait_for(lambda: _ready(port), 60, what="first daemon ready")
        kafka_tools.produce(f"{prefix}-in", _events(10, 20, 1000.0))
        kafka_tools.read(f"{prefix}-out", 200)
        code, seconds = _stop(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 0, log.read_text()
    assert seconds < 10
    assert "stopped" in _log_messages(log)

    kafka_tools.produce(f"{prefix}-in", _events(10, 5, 2000.0))
    second, port = _daemon(kafka_tools.bootstrap, prefix, tmp_path / "second.log")
    try:
        wait_for(lambda: _ready(port), 60, what="second daemon ready")
        kafka_tools.read(f"{prefix}-out", 250)
        code, _ = _stop(second)  # flushed: every output it ever sends is in the topic now
        outputs = kafka_tools.read(f"{prefix}-out", 250)  # to the end: repeats included
    finally:
        if second.poll() is None:
            second.kill()
    assert code == 0
    seen = [(r.key, orjson.loads(r.value)["ts"]) for r in outputs]
    assert len(seen) == 250, "committed events were predicted again (or some are missing)"
    assert len(set(seen)) == 250


def test_daemon_started_before_the_broker_catches_up(
    kafka_tools: KafkaTools, tmp_path: Path
) -> None:
    try:
        find_tansu()
    except BrokerError as exc:
        pytest.skip(str(exc))
    prefix = f"late-{uuid.uuid4().hex[:8]}"
    # The daemon must know the broker's address before the broker exists, so this one
    # port is chosen in advance (a race with other processes, unlike port 0).
    broker_port = free_port()
    bootstrap = f"127.0.0.1:{broker_port}"
    log = tmp_path / "daemon.log"
    proc, metrics_port = _daemon(bootstrap, prefix, log)
    try:
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{metrics_port}/healthz")[0] == 200,
            30,
            what="/healthz while the broker is down",
        )
        wait_for(
            lambda: any(m.startswith("cannot reach Kafka") for m in _log_messages(log)),
            30,
            what="the daemon to log that it cannot reach Kafka",
        )
        assert proc.poll() is None  # still running, retrying
        assert http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 503
        with EmbeddedBroker(broker_port):
            late = KafkaTools(bootstrap)
            wait_for(lambda: _ready(metrics_port), 60, what="daemon ready once the broker is up")
            late.produce(f"{prefix}-in", _events(5, 10, 1000.0))
            outputs = late.read(f"{prefix}-out", 50)
            assert len(outputs) == 50
            code, _ = _stop(proc)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
