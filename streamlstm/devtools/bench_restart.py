"""``streamlstm bench state --restart-keys K``: restart to first prediction, with and
without a local snapshot (``state.dir``), in the same run.

K keys' rows are written once each to partition 0 of a fresh changelog (one input
partition). Then the daemon is started three times in a row, one new event produced
before each start; timed from the start (model built, group joined, partition restored)
to that event's prediction acknowledged:

1. ``state.dir`` unset: the whole changelog is read;
2. ``state.dir`` set, no snapshot yet: the whole changelog is read, and the graceful stop
   writes the snapshot (its stop time is reported);
3. ``state.dir`` set: the snapshot is loaded and only the changelog's tail is read.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from streamlstm.config import Settings


def _settings(bootstrap: str, name: str, keys: int, folder: Path | None) -> Settings:
    from streamlstm.devtools.bench_e2e import _settings as e2e_settings

    base = e2e_settings(bootstrap, name, 8, 64, 2048)
    state = base.state.model_copy(
        update={
            "changelog": True,
            "dir": folder,
            "max_keys": keys + 16,
            "initial_capacity": keys + 16,
            "ttl_seconds": 1e12,  # rows carry no event time: never idle
            "restore_timeout_seconds": 3600.0,
        }
    )
    kafka = base.kafka.model_copy(update={"partitions": 1})
    return base.model_copy(update={"state": state, "kafka": kafka})


def _fill(settings: Settings, names: list[str]) -> None:
    """Every key's (fresh, all-zero) row once in changelog partition 0."""
    from kafka import KafkaProducer

    from streamlstm.daemon import Daemon
    from streamlstm.io.changelog import encode

    layout = Daemon(settings).engine.store.layout  # the daemon's own row layout
    n = len(names)
    values = encode(
        layout.fingerprint, np.zeros((n, layout.width), np.float32), np.zeros(n), np.full(n, -1)
    )
    producer = KafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, linger_ms=20, batch_size=1 << 20
    )
    for name, value in zip(names, values, strict=True):
        producer.send(settings.changelog_topic, key=name.encode(), value=value, partition=0)
    producer.flush(timeout=1200)
    producer.close()


def _restart(settings: Settings, event: list[dict]) -> dict[str, float]:
    """Produce one event, start the daemon, time its prediction, stop it (timed too)."""
    from streamlstm.devtools.bench_clients import start_daemon as _start_daemon
    from streamlstm.devtools.bench_e2e import _produce

    _produce(settings, iter([event]), 1)
    started = time.perf_counter()
    daemon, thread = _start_daemon(settings)
    deadline = started + 3600
    while daemon.live.predictions < 1 and thread.is_alive() and time.perf_counter() < deadline:
        time.sleep(0.01)
    first = time.perf_counter() - started
    restore = daemon.metrics.restore_seconds._sum.get()
    stopping = time.perf_counter()
    daemon.request_stop()
    thread.join(timeout=1200)
    stop = time.perf_counter() - stopping
    if daemon.live.predictions < 1:
        raise RuntimeError("the restarted daemon predicted nothing")
    return {"first_prediction_s": first, "restore_s": restore, "stop_s": stop}


def bench_restart(bootstrap: str, keys: int) -> dict[str, Any]:
    """Restart to first prediction at ``keys`` keys: full read vs local snapshot + tail."""
    from streamlstm.devtools.synthetic import SyntheticStream
    from streamlstm.io import ensure_topics

    name = f"bench-restart-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix="streamlstm-snap-"))
    try:
        plain = _settings(bootstrap, name, keys, None)
        local = _settings(bootstrap, name, keys, folder)
        ensure_topics(plain.kafka, changelog_topic=plain.changelog_topic)
        stream = SyntheticStream(1, 8, seed=0)
        events = [stream.batch(1) for _ in range(3)]
        key = events[0][0]["key"]
        _fill(plain, [key] + [f"bench-{i}" for i in range(keys - 1)])
        full = _restart(plain, events[0])
        writes = _restart(local, events[1])
        size = sum(p.stat().st_size for p in folder.glob("*.snap"))
        fast = _restart(local, events[2])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "keys": keys,
        "full": full,
        "full_writing_snapshot": writes,
        "snapshot": fast,
        "snapshot_mb": size / 1e6,
    }


def restart_lines(runs: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in runs:
        full, writes, fast = r["full"], r["full_writing_snapshot"], r["snapshot"]
        out += [
            f"restart to first prediction, {r['keys']:,} keys:",
            f"  whole changelog      {full['first_prediction_s']:7.2f} s "
            f"(restore {full['restore_s']:.2f} s; again with state.dir: "
            f"{writes['first_prediction_s']:.2f} s)",
            f"  local snapshot+tail  {fast['first_prediction_s']:7.2f} s "
            f"(restore {fast['restore_s']:.2f} s)",
            f"  snapshot {r['snapshot_mb']:.0f} MB written at stop: stop took "
            f"{writes['stop_s']:.2f} s (without: {full['stop_s']:.2f} s)",
        ]
    return out
