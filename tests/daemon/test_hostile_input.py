"""Hostile input end to end: ``streamlstm run`` against a real broker stays up and exact.

Good events of several keys are interleaved with records built to break a decoder or
an engine (deep nesting, huge integers, a lone surrogate, a millisecond timestamp,
values beyond float32's comfort, an oversized record, bad array elements, random
bytes, an empty value, a None value). The daemon must dead-letter every hostile record
with its reason, predict every good event exactly as a clean run does (no key's state
touched by the hostile ones), and still exit 0 on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import KafkaTools, daemon_overrides, http_get, logged_metrics_port, wait_for

from streamlstm.engine import Engine
from streamlstm.events import EventBatch
from streamlstm.io.deadletter import header

pytestmark = pytest.mark.integration

MAX_MESSAGE_BYTES = 16_384
KEYS = 6
STEPS = 8
BIG = b"9" * 400

# (record value, reason it must be dead-lettered for); each is sent with key b"hostile".
HOSTILE: list[tuple[bytes | None, str]] = [
    (b'{"key": "g-0", "ts": 1000, "values": ' + b"[" * 5000 + b"]" * 5000 + b"}", "not_json"),
    (b"[" * 5000 + b"]" * 5000, "not_json"),
    (b'{"key": "g-1", "ts": ' + BIG + b', "values": [1, 2]}', "non_finite"),
    (b'{"key": "g-1", "ts": 1000, "values": [' + BIG + b", 2]}", "non_finite"),
    (b'{"key": "\\ud800", "ts": 1000, "values": [1, 2]}', "bad_key"),
    (b'{"key": "g-2", "ts": 1.7e12, "values": [1, 2]}', "bad_ts"),
    (b'{"key": "g-3", "ts": 1000, "values": [1e20, 2]}', "bad_value"),
    (
        b'{"key": "g-4", "ts": 1000, "values": [1, 2], "pad": "'
        + b"x" * (MAX_MESSAGE_BYTES + 100)
        + b'"}',
        "too_large",
    ),
    (bytes(range(256))[::-1] * 4, "not_json"),
    (b"", "not_json"),
    (None, "not_json"),
]
# Bad elements of array messages (keys of good streams, so a leak would show), by reason.
BAD_ELEMENTS: list[tuple[object, str]] = [
    ({"key": "arr-0"}, "missing_field"),
    ({"key": "arr-1", "ts": 1000, "values": [1e20, 2]}, "bad_value"),
    (5, "not_object"),
    ({"key": "arr-0", "ts": 1.7e12, "values": [1, 2]}, "bad_ts"),
    ({"key": "arr-1", "ts": 1000, "values": [1, 2, 3]}, "wrong_width"),
    ({"key": "arr-0", "ts": 1000, "values": [1, None]}, "bad_type"),
]
ARRAYS = 3


def _event(key: str, ts: float, a: float, b: float) -> dict:
    return {"key": key, "ts": ts, "values": [a, b]}


def _good_stream() -> tuple[list[tuple[bytes | None, bytes | None]], list[tuple], list[dict]]:
    """Keyed messages (good and hostile interleaved), array messages, good events in order."""
    keyed: list[tuple[bytes | None, bytes | None]] = []
    good: list[dict] = []
    hostile = iter(HOSTILE)
    for step in range(STEPS):
        for k in range(KEYS):
            event = _event(f"g-{k}", 1000.0 + step, float(np.sin(step + k)), 0.1 * step * k)
            keyed.append((event["key"].encode(), orjson.dumps(event)))
            good.append(event)
            hostile_one = next(hostile, None) if k % 3 == 0 else None
            if hostile_one is not None:
                keyed.append((b"hostile", hostile_one[0]))
    for value, _ in hostile:  # whatever did not fit between the good ones
        keyed.append((b"hostile", value))
    arrays: list[tuple] = []
    for j in range(ARRAYS):
        elements: list[object] = []
        for i, (bad, _) in enumerate(BAD_ELEMENTS):
            event = _event(f"arr-{i % 2}", 2000.0 + j * len(BAD_ELEMENTS) + i, i, j)
            elements += [event, bad]
            good.append(event)
        arrays.append((None, orjson.dumps(elements)))
    return keyed, arrays, good


def _daemon(bootstrap: str, prefix: str, log: Path, client: str) -> subprocess.Popen:
    settings = daemon_overrides(
        prefix, client=client
    )  # metrics on port 0: the daemon logs the one it bound
    settings["engine.max_message_bytes"] = str(MAX_MESSAGE_BYTES)
    cmd = [sys.executable, "-m", "streamlstm.cli", "run", "--bootstrap", bootstrap, "--log-json"]
    for name, value in settings.items():
        cmd += ["--set", f"{name}={value}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def _clean_run(tools: KafkaTools, prefix: str, good: list[dict]) -> dict[str, list[list[float]]]:
    """Each key's predictions from an engine that saw only the good events."""
    settings = tools.settings(prefix, **{"engine.max_message_bytes": str(MAX_MESSAGE_BYTES)})
    engine = Engine.from_settings(settings)
    batch = EventBatch.from_arrays(
        [e["key"] for e in good],
        np.array([e["ts"] for e in good]),
        np.array([e["values"] for e in good]),
    )
    output = engine.process(batch)
    out: dict[str, list[list[float]]] = defaultdict(list)
    for record in output.records():
        out[record["key"]].append(record["prediction"])
    return out


def test_hostile_records_are_dead_lettered_and_no_key_is_touched(
    kafka_tools: KafkaTools, tmp_path: Path, client: str
) -> None:
    prefix = f"h-{uuid.uuid4().hex[:10]}"
    tools = kafka_tools
    tools.create({f"{prefix}-in": 2, f"{prefix}-out": 2, f"{prefix}-dlq": 2})
    keyed, arrays, good = _good_stream()
    expected_dead = len(HOSTILE) + ARRAYS * len(BAD_ELEMENTS)
    log = tmp_path / "daemon.log"
    proc = _daemon(tools.bootstrap, prefix, log, client)
    try:
        port = logged_metrics_port(log, proc)
        ready = f"http://127.0.0.1:{port}/readyz"
        wait_for(lambda: http_get(ready)[0] == 200, 60, what="daemon ready")
        tools.produce(f"{prefix}-in", keyed)  # type: ignore[arg-type]
        tools.produce(f"{prefix}-in", arrays, partition=0)  # one partition: order kept
        tools.read(f"{prefix}-out", len(good))  # everything is through
        tools.read(f"{prefix}-dlq", expected_dead)
        assert proc.poll() is None, log.read_text()[-3000:]  # still up
        assert http_get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        # The daemon has flushed and stopped: a second read is exact, repeats included.
        outputs = tools.read(f"{prefix}-out", len(good))
        dead = tools.read(f"{prefix}-dlq", expected_dead)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]

    # Every hostile record is dead-lettered with its reason, nothing else is.
    reasons = sorted(header(r.headers, "streamlstm.reason") or "?" for r in dead)
    assert reasons == sorted([r for _, r in HOSTILE] + [r for _, r in BAD_ELEMENTS] * ARRAYS)
    assert all(r.key == b"hostile" for r in dead if header(r.headers, "streamlstm.element") is None)

    # Every good event is predicted once, in its key's order, as a clean run predicts it.
    docs = [orjson.loads(r.value) for r in outputs]
    by_key: dict[str, list[dict]] = defaultdict(list)
    for doc in docs:
        by_key[doc["key"]].append(doc)
    sent: dict[str, list[float]] = defaultdict(list)
    for e in good:
        sent[e["key"]].append(e["ts"])
    assert {k: [d["ts"] for d in v] for k, v in by_key.items()} == dict(sent)
    for key, seen in by_key.items():
        assert seen[0]["error"] is None and all(d["error"] is not None for d in seen[1:]), key
    clean = _clean_run(tools, prefix, good)
    for key, seen in by_key.items():
        np.testing.assert_allclose(
            np.array([d["prediction"] for d in seen]),
            np.array(clean[key]),
            rtol=1e-5,
            atol=1e-5,
            err_msg=f"key {key} differs from a clean run",
        )
