"""The state commit protocol without a broker: a producer that acknowledges only when told.

Invariants, checked at every step of random schedules:

- a key's row reaches the changelog only after the outputs of every event it reflects
  were acknowledged (else a restart would skip events whose outputs never arrived);
- a committed input offset never passes the changelog: every event below it is
  reflected in its key's acknowledged changelog row (else a restart would miss it).
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from kafka import TopicPartition

from streamlstm.daemon.delivery import Delivery
from streamlstm.daemon.statelog import StateLog
from streamlstm.daemon.telemetry import Telemetry
from streamlstm.io import Ticket
from streamlstm.io.changelog import decode
from streamlstm.io.sink import send_groups
from streamlstm.metrics import Metrics
from streamlstm.state import KeyedState

TOPIC, CHANGELOG = "in", "in.state"


class _Sink:
    """Keeps every frame until the test acknowledges (or fails) it."""

    output_topic = "out"

    def __init__(self) -> None:
        self.frames: list[tuple[Ticket, list[Any]]] = []

    def send(self, ticket: Ticket, groups: list[Any]) -> None:
        ticket.outstanding += 1
        ticket.pending += sum(len(g[1]) for g in groups)
        self.frames.append((ticket, groups))

    def ack(self, i: int, fail: bool = False) -> tuple[Ticket, list[Any]]:
        ticket, groups = self.frames.pop(i)
        ticket.outstanding -= 1
        ticket.pending -= sum(len(g[1]) for g in groups)
        if fail:
            for g in groups:
                for k, v in zip(g[1], g[2], strict=True):
                    ticket.failed.append((g[0], k, v, None))
                    ticket.errors.append("KafkaTimeoutError")
        return ticket, groups

    def send_records(self, ticket: Ticket, sends: list[Any]) -> None:
        self.send(ticket, send_groups(sends))

    def poll_acks(self) -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return True


class _Source:
    def __init__(self) -> None:
        self.assigned = {TopicPartition(TOPIC, p) for p in range(2)}
        self.commits: list[dict[TopicPartition, int]] = []

    def commit_async(self, offsets: dict[TopicPartition, int], callback: Any) -> None:
        self.commits.append(dict(offsets))
        callback(dict(offsets), None)


class _World:
    """A store, the protocol, and what is known to have reached the broker."""

    def __init__(self) -> None:
        self.store = KeyedState(state_shape=(1, 2, 2), width=1, max_keys=6, ttl_seconds=1e9)
        metrics = Metrics()
        self.delivery = Delivery(Telemetry(metrics, 0.5, 0), max_batch=8)
        self.sink = _Sink()
        self.delivery.sink = self.sink  # type: ignore[assignment]
        self.log = StateLog(CHANGELOG, self.store, self.delivery, metrics)
        self.log.owned = {0, 1}
        self.source = _Source()
        self.next_offset = {0: 0, 1: 0}
        self.events: list[tuple[str, int, int]] = []  # (key, partition, offset) processed
        self.acked_outputs: set[tuple[int, int]] = set()
        self.changelog: dict[str, int | None] = {}  # key -> offset its acked row reflects

    def process(self, rng: random.Random) -> None:
        """One poll: a few events of random keys (key k lives on partition k % 2)."""
        ends: dict[TopicPartition, int] = {}
        keys = []
        for _ in range(rng.randint(1, 4)):
            k = rng.randrange(8)
            p = k % 2
            off = self.next_offset[p]
            self.next_offset[p] += 1
            slot = int(self.store.assign([f"k{k}"], np.zeros(1), np.array([p]))[0])
            self.store.offset[slot] = off
            self.store.table[slot] = float(off)
            self.store.dirty[slot] = True
            self.events.append((f"k{k}", p, off))
            ends[TopicPartition(TOPIC, p)] = off + 1
            keys.append((p, off))
        ticket = Ticket(ends, polled_at=0.0)
        ticket.events = keys  # type: ignore[attr-defined]
        self.delivery.send(ticket, [("out", [b"k"] * len(keys), [b"v"] * len(keys), None)])

    def ack_one(self, rng: random.Random, failures: float = 0.15) -> None:
        if not self.sink.frames:
            return
        i = rng.randrange(len(self.sink.frames))
        fail = rng.random() < failures
        ticket, groups = self.sink.ack(i, fail=fail)
        if fail:
            return
        if groups[0][0] == CHANGELOG:
            self._land(groups[0])
        else:
            self.acked_outputs.update(ticket.events)  # type: ignore[attr-defined]

    def _land(self, group: Any) -> None:
        _, keys, values, _, partitions = group
        for key, value, p in zip(keys, values, partitions, strict=True):
            if value is None:
                self.changelog[key.decode()] = None
                continue
            row = decode([value], self.log.fingerprint, self.store.layout.width)
            off = int(row.offset[0])
            assert (p, off) in self.acked_outputs or all(
                (q, o) in self.acked_outputs for k, q, o in self.events if k == key.decode()
            ), f"{key!r}@{off} reached the changelog before its outputs"
            self.changelog[key.decode()] = off

    def check_commits(self) -> None:
        for offsets in self.source.commits:
            for tp, committed in offsets.items():
                for key, p, off in self.events:
                    if p == tp.partition and off < committed:
                        stored = self.changelog.get(key, -1)
                        if stored is None:
                            continue  # evicted since (capacity: 8 keys, 6 held): a tombstone
                        assert stored >= off, (
                            f"offset {committed} of partition {p} committed, but {key}@{off} "
                            f"is not in the changelog ({stored})"
                        )


def test_rows_wait_for_outputs_and_offsets_wait_for_rows() -> None:
    w = _World()
    rng = random.Random(1)
    w.process(rng)
    w.log.advance(w.source, due=True)  # S taken: waits for the outputs
    assert w.log.snapshot is not None and w.log.snapshot.ticket is None
    w.delivery.check_acks()
    w.log.advance(w.source, due=False)
    assert len(w.sink.frames) == 1, "no changelog record before the outputs are acknowledged"
    ticket, _ = w.sink.ack(0)
    w.acked_outputs.update(ticket.events)  # type: ignore[attr-defined]
    w.delivery.check_acks()
    w.log.advance(w.source, due=False)  # barrier met: S sent
    assert [g[0][0] for _, g in w.sink.frames] == [CHANGELOG]
    assert not w.source.commits, "no commit before the changelog acknowledges"
    _, groups = w.sink.ack(0)
    w._land(groups[0])
    w.log.advance(w.source, due=False)
    assert w.source.commits and w.source.commits[-1] == {
        tp: end for tp, end in w.delivery.processed.items()
    }
    w.check_commits()


@pytest.mark.parametrize("seed", range(25))
def test_random_schedules_keep_both_orders(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(10**9))  # one second a step: retries after a failure come soon
    fake = SimpleNamespace(monotonic=lambda: float(next(clock)), time=time.time)
    monkeypatch.setattr("streamlstm.daemon.delivery.time", fake)
    monkeypatch.setattr("streamlstm.daemon.statelog.time", fake)
    w = _World()
    rng = random.Random(seed)
    for _ in range(300):
        action = rng.random()
        if action < 0.35:
            w.process(rng)
        elif action < 0.8:
            w.ack_one(rng)
        else:
            w.log.advance(w.source, due=rng.random() < 0.5)
        w.delivery.check_acks()
        w.log.advance(w.source, due=False)
        w.check_commits()
    for _ in range(50):  # the broker recovers: everything in flight lands
        while w.sink.frames:
            w.ack_one(rng, failures=0.0)
        w.delivery.check_acks()
        w.log.advance(w.source, due=True)
        w.check_commits()
    assert w.source.commits, "the schedule never committed: it proved nothing"
    assert w.source.commits[-1] == dict(w.delivery.processed), "not everything was committed"


def test_a_revoke_writes_everything_and_commits_only_what_was_written() -> None:
    w = _World()
    rng = random.Random(3)
    for _ in range(5):
        w.process(rng)
    while w.sink.frames:  # outputs acknowledged (the revoke flushed them)
        ticket, _ = w.sink.ack(0)
        w.acked_outputs.update(ticket.events)  # type: ignore[attr-defined]
    w.delivery.check_acks()

    def flush(timeout_s: float) -> bool:  # the broker acknowledges the changelog write
        while w.sink.frames:
            _, groups = w.sink.ack(0)
            w._land(groups[0])
        return True

    w.sink.flush = flush  # type: ignore[method-assign]
    revoked = set(w.source.assigned)
    offsets = w.log.checkpoint(revoked, budget_s=1.0)
    assert offsets == dict(w.delivery.processed)
    w.source.commits.append(offsets)
    w.check_commits()


def test_a_failed_revoke_write_commits_nothing_and_marks_the_rows_again() -> None:
    w = _World()
    w.process(random.Random(4))
    w.sink.ack(0)
    w.delivery.check_acks()
    w.sink.flush = lambda timeout_s: False  # type: ignore[method-assign]
    assert w.log.checkpoint(set(w.source.assigned), budget_s=0.1) == {}
    assert torch.equal(w.store.dirty[w.store.occupied()], torch.ones(len(w.store), dtype=bool))


def test_unacknowledged_outputs_keep_their_partition_out_of_a_revoke() -> None:
    w = _World()
    w.process(random.Random(5))  # its outputs stay unacknowledged
    flushed: list[Any] = []
    w.sink.flush = lambda timeout_s: flushed.append(1) or True  # type: ignore[method-assign]
    assert w.log.checkpoint(set(w.source.assigned), budget_s=0.1) == {}
    assert [g[0][0] for _, g in w.sink.frames] == ["out"], "no row of an unsafe partition"
