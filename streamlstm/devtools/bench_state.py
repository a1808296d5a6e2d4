"""``streamlstm bench state``: restore rate from the changelog, and the changelog's cost.

1. Restore: K keys' rows (the default model's row layout) are written to one changelog
   partition, twice over (an uncompacted log: two versions per key), then read back as
   a restoring member does (read to the high watermark, last record per key wins,
   decode, load into the state store). Reported: keys/s and records/s.
2. Throughput: the same N events through the daemon with ``state.changelog`` off and on
   (same run, same broker, separate topics), events/s from first event to last
   prediction acknowledged, as ``bench e2e`` measures it.
3. Restart to first prediction with and without a local snapshot
   (:mod:`streamlstm.devtools.bench_restart`), for each of ``restart_keys``.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from streamlstm.config import load_settings
from streamlstm.devtools.bench_restart import bench_restart, restart_lines


@dataclass
class StateBench:
    restore: list[dict[str, float]] = field(default_factory=list)
    restart: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0
    keys: int = 0
    off_events_per_s: float = 0.0
    on_events_per_s: float = 0.0
    broker: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [
            f"restore {r['keys']:,.0f} keys ({r['records']:,.0f} records, "
            f"{r['mb']:.0f} MB): {r['seconds']:.2f} s, {r['keys_per_s']:,.0f} keys/s "
            f"(read {r['read_seconds']:.2f} s, decode+load {r['load_seconds']:.2f} s)"
            for r in self.restore
        ]
        if self.events:
            ratio = self.on_events_per_s / max(self.off_events_per_s, 1e-9)
            out += [
                f"daemon, {self.events:,} events of {self.keys:,} keys:",
                f"  changelog off   {self.off_events_per_s:10,.0f} events/s",
                f"  changelog on    {self.on_events_per_s:10,.0f} events/s  ({ratio:.2f}x)",
            ]
        out += restart_lines(self.restart)
        out.append(f"broker: {self.broker}")
        return out


def bench_restore(bootstrap: str, keys: int) -> dict[str, float]:
    """Write ``keys`` rows twice to a fresh changelog partition; time reading them back."""
    from kafka import KafkaProducer

    from streamlstm.io.admin import COMPACTED, create_topics
    from streamlstm.io.changelog import ChangelogReader, decode, encode
    from streamlstm.io.reader import KafkaPythonReader
    from streamlstm.model import RecurrentModel
    from streamlstm.state import KeyedState

    settings = load_settings(overrides={"model.input_size": "8"})
    shape = RecurrentModel.from_settings(settings.model).state_shape
    store = KeyedState(shape, 8, max_keys=keys, initial_capacity=keys)
    width, fingerprint = store.layout.width, store.layout.fingerprint
    topic = f"bench-state-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {topic: 1}, configs={topic: COMPACTED})
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=1 << 20)
    names = [f"key-{i}".encode() for i in range(keys)]
    rng = np.random.default_rng(0)
    for version in range(2):
        rows = rng.normal(size=(keys, width)).astype(np.float32)
        values = encode(fingerprint, rows, np.zeros(keys), np.full(keys, version))
        for name, value in zip(names, values, strict=True):
            producer.send(topic, key=name, value=value, partition=0)
    producer.flush(timeout=600)
    producer.close()
    reader = ChangelogReader(topic, KafkaPythonReader({"bootstrap_servers": [bootstrap]}))
    try:
        started = time.perf_counter()
        read = reader.read(0, timeout_s=600)
        mid = time.perf_counter()
        out = decode(read.values, fingerprint, width)
        store.load(read.keys, out.rows, out.last_ts, out.offset, partition=0)
        done = time.perf_counter()
    finally:
        reader.close()
    assert len(store) == keys and bool(out.ok.all())
    return {
        "keys": keys,
        "records": read.records,
        "mb": read.bytes / 1e6,
        "seconds": done - started,
        "read_seconds": mid - started,
        "load_seconds": done - mid,
        "keys_per_s": keys / (done - started),
    }


def bench_state(
    restore_keys: tuple[int, ...] = (100_000,),
    events: int = 50_000,
    keys: int = 1000,
    bootstrap: str | None = None,
    restart_keys: tuple[int, ...] = (),
) -> StateBench:
    """Run both parts (an embedded broker unless ``bootstrap`` is given)."""
    from streamlstm.devtools.bench_e2e import _produce, _settings, daemon_throughput
    from streamlstm.devtools.broker import EmbeddedBroker
    from streamlstm.devtools.loadgen import synthetic_events
    from streamlstm.devtools.synthetic import SyntheticStream
    from streamlstm.io import ensure_topics

    result = StateBench(events=events, keys=keys)
    with contextlib.ExitStack() as stack:
        if bootstrap is None:
            bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap
            result.broker = "embedded Tansu"
        else:
            result.broker = bootstrap
        for n in restore_keys:
            result.restore.append(bench_restore(bootstrap, n))
        if events:
            for on in (False, True):
                s = _settings(bootstrap, f"bench-{uuid.uuid4().hex[:8]}", 8, 64, 2048)
                s = s.model_copy(update={"state": s.state.model_copy(update={"changelog": on})})
                ensure_topics(s.kafka, changelog_topic=s.changelog_topic)
                _produce(s, synthetic_events(SyntheticStream(keys, 8, seed=0), events), 1)
                rate = daemon_throughput(s, events)
                if on:
                    result.on_events_per_s = rate
                else:
                    result.off_events_per_s = rate
        for n in restart_keys:
            result.restart.append(bench_restart(bootstrap, n))
    return result
