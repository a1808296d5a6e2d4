"""``streamlstm demo``: one command, live figures, dead letters, clean exit on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from conftest import wait_for

from streamlstm.devtools.broker import BrokerError, find_tansu

pytestmark = pytest.mark.integration


def test_demo_shows_live_figures_and_exits_cleanly_on_ctrl_c() -> None:
    try:
        find_tansu()
    except BrokerError as exc:
        pytest.skip(str(exc))
    cmd = [
        sys.executable,
        "-m",
        "streamlstm.cli",
        "demo",
        "--every",
        "2",
        "--rate",
        "500",
        "--keys",
        "20",
        "--bad-every",
        "50",
        "--metrics-port",
        "0",
        "--set",
        "training.enabled=false",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    lines: list[str] = []
    live = re.compile(
        r"events/s\s+latency p50\s+\d+ ms\s+p99\s+\d+ ms\s+keys 20\s+anomalies \d+\s+"
        r"dead letters (\d+)"
    )
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:

        def live_with_dead_letters() -> bool:
            dead = [int(m.group(1)) for line in list(lines) if (m := live.search(line))]
            return len(dead) >= 2 and sum(dead) > 0

        try:
            wait_for(live_with_dead_letters, 90, interval=0.2, what="live figures")
        except pytest.fail.Exception:
            pytest.fail("no live figures with dead letters:\n" + "".join(lines))
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=5)
    text = "".join(lines)
    assert code == 0, text
    assert "metrics     http://127.0.0.1:" in text
    done = re.search(r"done: ([\d,]+) events produced .* ([\d,]+) predictions", text)
    assert done, text
    assert int(done.group(2).replace(",", "")) > 0
    card = re.search(r"injected incidents: ([\d,]+) caught, ([\d,]+) missed; false alarms", text)
    assert card, text
