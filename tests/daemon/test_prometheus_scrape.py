"""A real Prometheus server scrapes the daemon and answers a query for its counter."""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.parse
import uuid
from pathlib import Path

import orjson
import pytest
from conftest import KafkaTools, http_get, require_binary, wait_for

from streamlstm.daemon import Daemon
from streamlstm.devtools.broker import free_port

pytestmark = pytest.mark.integration


def _start_prometheus(binary: str, config: Path, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """Prometheus on a free port; if another process takes the port first, a fresh one.

    Prometheus must be given its port (it does not report one it chose), so a free port
    is probed first; the race with other processes is handled by retrying.
    """
    for attempt in range(3):
        web = free_port()
        log = tmp_path / f"prometheus-{attempt}.log"
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )
        url = f"http://127.0.0.1:{web}/-/ready"
        try:
            wait_for(
                lambda: proc.poll() is not None or http_get(url)[0] == 200,  # noqa: B023
                60,
                what="Prometheus to be ready (or to exit)",
            )
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.poll() is None:
            return proc, web
        if b"address already in use" not in log.read_bytes():
            pytest.fail(f"Prometheus exited with {proc.returncode}: {log.read_text()[-2000:]}")
    pytest.fail("Prometheus found its port taken three times in a row")


def test_prometheus_scrapes_events_total(kafka_tools: KafkaTools, tmp_path: Path) -> None:
    prometheus = require_binary("prometheus")
    prefix = f"prom-{uuid.uuid4().hex[:8]}"
    kafka_tools.create({f"{prefix}-in": 2, f"{prefix}-out": 2, f"{prefix}-dlq": 2})
    daemon = Daemon(kafka_tools.settings(prefix))
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    proc = None
    try:
        wait_for(daemon.ready, 60, what="daemon ready")
        events = [
            (b"k", orjson.dumps({"key": "k", "ts": float(i), "values": [i, 1]})) for i in range(25)
        ]
        kafka_tools.produce(f"{prefix}-in", events)
        kafka_tools.read(f"{prefix}-out", 25)

        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: streamlstm\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{daemon.metrics_port}']\n"
        )
        proc, web = _start_prometheus(prometheus, config, tmp_path)
        query = urllib.parse.quote(f'streamlstm_events_total{{topic="{prefix}-in"}}')

        def answered() -> float | None:
            status, body = http_get(f"http://127.0.0.1:{web}/api/v1/query?query={query}")
            if status != 200:
                return None
            result = json.loads(body)["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        value = wait_for(answered, 60, interval=0.5, what="Prometheus to scrape the daemon")
        assert value == 25
        _, body = http_get(f"http://127.0.0.1:{web}/api/v1/targets")
        targets = json.loads(body)["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        daemon.request_stop()
        thread.join(timeout=15)
