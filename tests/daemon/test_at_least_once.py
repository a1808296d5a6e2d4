"""At-least-once, without a broker: committed input offsets never pass acknowledged outputs.

The daemon's loop runs on fakes: a source that hands out polls of several partitions and
records every commit, and a sink that holds each ticket's outputs until the test says
they are acknowledged. The loop commits on every turn (``commit_interval_ms=0``), so a
commit that ran ahead of the acknowledgements would show at once.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from conftest import unit_daemon_settings
from kafka import TopicPartition

import streamlstm.daemon.loop as loop
from streamlstm.config import Settings
from streamlstm.daemon import Daemon
from streamlstm.io import Polled, Ticket

TOPIC = "in"
P0, P1, P2 = (TopicPartition(TOPIC, p) for p in range(3))


def _settings() -> Settings:
    # The output half of the protocol alone (the state half, rows before offsets, is
    # tests/daemon/test_statelog.py): commits follow acknowledgements directly.
    return unit_daemon_settings(
        TOPIC,
        **{
            "kafka.commit_interval_ms": "0",  # commit each turn
            "kafka.poll_timeout_ms": "0",
            "state.changelog": "false",
        },
    )


class _HeldSink:
    """A producer whose acknowledgements arrive only when the test calls :meth:`ack`."""

    output_topic = "out"

    def __init__(self) -> None:
        self.tickets: list[Ticket] = []

    def send(self, ticket: Ticket, groups: list) -> None:
        ticket.outstanding += 1
        ticket.pending += sum(len(g[1]) for g in groups)
        self.tickets.append(ticket)

    def ack(self, index: int) -> None:
        ticket = self.tickets[index]
        ticket.outstanding, ticket.pending = 0, 0

    def send_records(self, ticket: Ticket, sends: list) -> None:  # pragma: no cover
        raise AssertionError("nothing fails here, so nothing is resent")

    def poll_acks(self) -> None:
        pass

    def flush(self, timeout_s: float) -> bool:
        return all(t.done() for t in self.tickets)

    def close(self, timeout_s: float = 0.0) -> None:
        pass


class _QueueSource:
    """A consumer of partitions 0..2 that returns queued polls and records commits."""

    def __init__(self, settings: Settings, **callbacks: Any) -> None:
        self.assigned = {P0, P1, P2}
        self.polls: deque[Polled] = deque()
        self.commits: list[dict[TopicPartition, int]] = []
        self.on_committed = callbacks.get("on_committed")

    def poll(self, timeout_ms: int) -> Polled | None:
        return self.polls.popleft() if self.polls else None

    def commit_async(self, offsets: dict[TopicPartition, int], callback: Any) -> None:
        self.commits.append(dict(offsets))
        callback(dict(offsets), None)  # the broker accepted them

    def commit(self, offsets: dict[TopicPartition, int], timeout_ms: int) -> None:
        self.commits.append(dict(offsets))

    def stable(self) -> bool:
        return True

    def last_heartbeat(self) -> float | None:
        return None

    def highwater(self, partition: int) -> int | None:
        return None

    def lag(self) -> dict[int, int]:
        return {}

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def close(self, timeout_ms: int = 0) -> None:
        pass

    def committed(self) -> dict[TopicPartition, int]:
        """The highest offset committed so far, per partition."""
        out: dict[TopicPartition, int] = {}
        for offsets in self.commits:
            for tp, off in offsets.items():
                out[tp] = max(out.get(tp, -1), off)
        return out


def _poll(start: dict[int, int], per_partition: int) -> Polled:
    """``per_partition`` events on each partition of ``start``, from the offsets given."""
    payloads, parts, offsets, records = [], [], [], []
    for p, first in start.items():
        for off in range(first, first + per_partition):
            key = f"k{p}"
            payloads.append(orjson.dumps({"key": key, "ts": float(off), "values": [off * 0.1]}))
            parts.append(p)
            offsets.append(off)
            records.append(SimpleNamespace(key=key.encode(), headers=[], offset=off))
    return Polled(
        topic=TOPIC,
        records=records,
        payloads=payloads,
        partition=np.array(parts, dtype=np.int64),
        offset=np.array(offsets, dtype=np.int64),
        ends={TopicPartition(TOPIC, p): first + per_partition for p, first in start.items()},
        polled_at=0.0,
    )


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> Daemon:
    sink = _HeldSink()
    monkeypatch.setattr(loop, "make_source", _QueueSource)
    monkeypatch.setattr(loop, "Sink", lambda settings: sink)
    monkeypatch.setattr(loop, "ensure_topics", lambda kafka, **kw: None)
    monkeypatch.setattr(loop.ModelSync, "start", lambda self, stop=None: False)  # no broker
    d = Daemon(_settings())
    assert d._connect()
    return d


def test_committed_offsets_never_pass_acknowledged_outputs(daemon: Daemon) -> None:
    source: _QueueSource = daemon.source  # type: ignore[assignment]
    sink: _HeldSink = daemon.delivery.sink  # type: ignore[assignment]
    source.polls.extend(
        [
            _poll({0: 0, 1: 0}, 5),  # ticket 0: p0 -> 5, p1 -> 5
            _poll({0: 5, 2: 0}, 5),  # ticket 1: p0 -> 10, p2 -> 5
            _poll({1: 5, 2: 5}, 5),  # ticket 2: p1 -> 10, p2 -> 10
        ]
    )
    for _ in range(5):  # all three polls processed and sent, nothing acknowledged
        daemon._turn()
    assert len(sink.tickets) == 3 and not source.polls
    assert source.committed() == {}, "committed outputs that were never acknowledged"

    sink.ack(1)  # acknowledged out of order: ticket 0 still blocks everything behind it
    daemon._turn()
    assert source.committed() == {}, "committed past an unacknowledged ticket"

    sink.ack(0)
    daemon._turn()
    assert source.committed() == {P0: 10, P1: 5, P2: 5}

    sink.ack(2)
    daemon._turn()
    assert source.committed() == {P0: 10, P1: 10, P2: 10}
    assert daemon.delivery.tracker.uncommitted() == {}


def test_shutdown_commits_only_what_was_acknowledged(daemon: Daemon) -> None:
    source: _QueueSource = daemon.source  # type: ignore[assignment]
    sink: _HeldSink = daemon.delivery.sink  # type: ignore[assignment]
    source.polls.extend([_poll({0: 0, 1: 0}, 4), _poll({0: 4, 1: 4}, 4)])
    for _ in range(3):
        daemon._turn()
    sink.ack(0)
    daemon._turn()
    assert source.committed() == {P0: 4, P1: 4}
    daemon._shutdown()  # ticket 1 never acknowledged: its offsets must not be committed
    assert source.committed() == {P0: 4, P1: 4}
