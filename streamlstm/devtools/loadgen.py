"""``streamlstm produce``: write events to a topic at a given rate, synthetic or from a file.

Single events are keyed by their stream key, so a key's events share a partition and
keep their order. With ``batch`` > 1, N events go into one JSON-array message; events
are grouped by the partition their key maps to (Kafka's default murmur2 partitioner),
so the order of each key still holds. ``bad_every`` swaps every k-th message for a
malformed one (the demo uses it to show dead letters).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2
from tqdm import tqdm

from streamlstm.config import KafkaSettings
from streamlstm.devtools.synthetic import SyntheticStream
from streamlstm.events import EventBatch

log = logging.getLogger(__name__)

CHUNK = 1000  # events generated/encoded at a time

# Malformed messages, one per dead-letter reason the demo wants to show.
MALFORMED: tuple[bytes, ...] = (
    b'{"key": "broken", "ts": 1.0, "values": [1.0, ',  # not_json
    b'{"key": "broken", "values": [1.0]}',  # missing_field
    b'{"key": "broken", "ts": 1.0, "values": "high"}',  # bad_type
    b'["not an object"]',  # not_object (array element)
    b'{"key": "broken", "ts": 1.0, "values": [NaN]}',  # non_finite
)


@dataclass
class ProduceSummary:
    events: int = 0
    messages: int = 0
    malformed: int = 0
    seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"produced {self.events:,} events in {self.messages:,} messages "
            f"({self.malformed:,} malformed) in {self.seconds:.1f}s: "
            f"{self.events_per_s:,.0f} events/s"
        )


def make_producer(kafka: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer with the daemon's connection settings, batching for throughput."""
    config: dict[str, Any] = {
        **kafka.client_kwargs(),
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "metrics_enabled": False,
        "bootstrap_timeout_ms": 10_000,
    }
    config.update(overrides)
    return KafkaProducer(**config)


def synthetic_events(stream: SyntheticStream, count: int | None) -> Iterator[list[dict]]:
    """Chunks of events from ``stream``; endless when ``count`` is None."""
    left = count
    while left is None or left > 0:
        n = CHUNK if left is None else min(CHUNK, left)
        yield stream.batch(n)
        if left is not None:
            left -= n


def file_events(path: Path, width: int | None = None, **csv_options: Any) -> Iterator[list[dict]]:
    """Chunks of the good events of a JSONL/CSV file, in file order (as ``replay`` reads it).

    The file is read here, not on the first chunk, so a missing or malformed file is
    reported by this call (the command line turns that into one line, exit 2).
    """
    from streamlstm.offline.eventfiles import read_events

    data = read_events(path, width=width, **csv_options)
    if data.rejected:
        skipped = ", ".join(f"{r}={n}" for r, n in sorted(data.rejected.items()))
        log.warning("%s: skipped unusable events (%s)", path, skipped)
    return _chunks(data.batch)


def _chunks(batch: EventBatch) -> Iterator[list[dict]]:
    for start in range(0, len(batch), CHUNK):
        part = batch.take(slice(start, start + CHUNK))
        yield [
            {"key": k, "ts": t, "values": v}
            for k, t, v in zip(part.keys, part.ts.tolist(), part.values.tolist(), strict=True)
        ]


class Producer:
    """Sends event chunks as messages at a target rate (events/s; 0 = as fast as possible).

    Synthetic streams are sent with ``stamp_now``: each event's ``ts`` is its send time,
    so the daemon's event latency (ts to prediction acknowledged) is a live figure.
    """

    def __init__(
        self,
        producer: KafkaProducer,
        topic: str,
        rate: float = 0.0,
        batch: int = 1,
        bad_every: int = 0,
        stop: threading.Event | None = None,
        stamp_now: bool = False,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.rate = rate
        self.batch = max(1, batch)
        self.bad_every = bad_every
        self.stop = stop or threading.Event()
        self.stamp_now = stamp_now  # ts = send time, so event latency is measured live
        self.summary = ProduceSummary()
        self._partition_of: dict[str, int] = {}
        self._partitions: list[int] = []

    def _partition(self, key: str) -> int:
        p = self._partition_of.get(key)
        if p is None:
            if not self._partitions:
                found = self.producer.partitions_for(self.topic)
                self._partitions = sorted(found) if found else [0]
            parts = self._partitions  # Kafka's default: murmur2(key) mod partitions
            p = self._partition_of[key] = parts[(murmur2(key.encode()) & 0x7FFFFFFF) % len(parts)]
        return p

    def _messages(self, events: list[dict]) -> Iterator[tuple[bytes | None, bytes, int | None]]:
        """(key, value, partition) per message for one chunk of events."""
        dumps = orjson.dumps
        if self.stamp_now:
            now = time.time()
            for e in events:
                e["ts"] = now
        if self.batch == 1:
            for e in events:
                yield e["key"].encode(), dumps(e), None
            return
        groups: dict[int, list[dict]] = {}
        for e in events:
            groups.setdefault(self._partition(e["key"]), []).append(e)
        for partition, group in groups.items():
            for i in range(0, len(group), self.batch):
                yield None, dumps(group[i : i + self.batch]), partition

    def run(
        self,
        chunks: Iterator[list[dict]],
        duration: float | None = None,
        progress: bool | None = None,
        total: int | None = None,
    ) -> ProduceSummary:
        """Send until the chunks run out, ``duration`` passes, or :attr:`stop` is set."""
        show = sys.stderr.isatty() if progress is None else progress
        s = self.summary
        started = time.monotonic()
        end = started + duration if duration else None
        with tqdm(total=total, unit="ev", disable=not show, desc="produce") as bar:
            for events in chunks:
                for key, value, partition in self._messages(events):
                    s.messages += 1
                    if self.bad_every and s.messages % self.bad_every == 0:
                        bad = MALFORMED[(s.messages // self.bad_every) % len(MALFORMED)]
                        self.producer.send(self.topic, value=bad, key=b"broken")
                        s.malformed += 1
                    self.producer.send(self.topic, value=value, key=key, partition=partition)
                n = len(events)
                s.events += n
                bar.update(n)
                if self.rate > 0:  # pace: the i-th event leaves at started + i / rate
                    ahead = started + s.events / self.rate - time.monotonic()
                    if ahead > 0 and self.stop.wait(ahead):
                        break
                if self.stop.is_set() or (end is not None and time.monotonic() >= end):
                    break
        self.producer.flush(timeout=30)
        s.seconds = time.monotonic() - started
        return s


def chunks_for_rate(chunks: Iterator[list[dict]], rate: float) -> Iterator[list[dict]]:
    """Split chunks so that pacing at ``rate`` events/s stays smooth (~20 sends a second)."""
    size = max(1, int(rate / 20)) if rate > 0 else CHUNK
    for events in chunks:
        for i in range(0, len(events), size):
            yield events[i : i + size]
