"""Per-key order across resends: a failed head never lands behind what followed it.

Ordering rule checked here: in each output partition, the *last* copy of every record
of a key comes in input-offset order (earlier copies may be anywhere: outputs are
at-least-once, and a repeat carries the same values).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Any

from kafka import TopicPartition

from streamlstm.daemon.delivery import Delivery
from streamlstm.daemon.telemetry import Telemetry
from streamlstm.io import Ticket
from streamlstm.io.sink import Sink
from streamlstm.metrics import Metrics

TP = TopicPartition("in", 0)


class ScriptedSink(Sink):
    """The real Sink's accounting; frames go to a list, the test plays the producer."""

    def __init__(self) -> None:  # no child process
        self.output_topic, self.dead_letter_topic = "out", "dlq"
        self._lock = threading.RLock()
        self._seq = 0
        self._inflight: dict[int, Any] = {}
        self._flushed: dict[int, bool] = {}
        self._closed = False
        self.dead = False
        self.frames: list[tuple[int, list]] = []  # (seq, groups) not yet reported
        self.log: list[bytes] = []  # what the "broker" holds, in produce order

    def _write(self, obj: Any, timeout: float | None = None) -> None:
        self.frames.append((obj[1], obj[2]))

    def poll_acks(self) -> None:
        pass

    def report(self, fail: bool) -> None:
        """The oldest frame completes: every record produced, or every record failed."""
        seq, groups = self.frames.pop(0)
        failures = None
        if fail:
            failures = [
                (g, i, "KafkaTimeoutError: expired", True)
                for g, group in enumerate(groups)
                for i in range(len(group[1]))
            ]
        else:
            self.log += [v for group in groups for v in group[2]]
        self._handle(("acks", [(seq, failures)]))


def _ticket(end: int) -> Ticket:
    return Ticket({TP: end}, polled_at=0.0)


def _group(*values: str) -> list:
    return [("out", [b"a"] * len(values), [v.encode() for v in values], None)]


def _last_copies_in_order(log: list[bytes]) -> bool:
    last = {v: i for i, v in enumerate(log)}
    ordered = sorted(last, key=last.__getitem__)
    return ordered == sorted(ordered)  # a1 < a2 < ... as text: offsets are one digit


def test_a_failed_head_is_repeated_before_what_followed_it() -> None:
    delivery = Delivery(Telemetry(Metrics(), 10.0, 0), max_batch=100)
    sink = ScriptedSink()
    delivery.sink = sink
    delivery.send(_ticket(2), _group("a1", "a2"))
    delivery.send(_ticket(4), _group("a3", "a4"))
    sink.report(fail=True)  # a1 a2 expired during an outage
    sink.report(fail=False)  # a3 a4 produced once the broker was back
    assert sink.log == [b"a3", b"a4"]

    delivery.check_acks()  # repeats a1 a2, then a3 a4 after them
    delivery.send(_ticket(6), _group("a5"))  # new work goes on meanwhile
    while sink.frames:
        sink.report(fail=False)
    delivery.check_acks()

    assert sink.log == [b"a3", b"a4", b"a1", b"a2", b"a3", b"a4", b"a5"]
    assert _last_copies_in_order(sink.log)
    assert len(delivery.tracker) == 0 and delivery.tracker.uncommitted() == {TP: 6}


def test_order_holds_when_a_repeat_fails_again() -> None:
    delivery = Delivery(Telemetry(Metrics(), 10.0, 0), max_batch=100)
    sink = ScriptedSink()
    delivery.sink = sink
    for end, values in [(2, ("a1", "a2")), (4, ("a3", "a4")), (5, ("a5",))]:
        delivery.send(_ticket(end), _group(*values))
    # Outage: the first two fail, the third is produced.
    for fail in (True, True, False):
        sink.report(fail=fail)
    delivery.check_acks()
    # The head's repeat fails again, everything repeated behind it is produced.
    sink.report(fail=True)
    while sink.frames:
        sink.report(fail=False)
    head = delivery.tracker.head()
    assert head is not None
    head.retry_at = 0.0  # skip the backoff
    delivery.check_acks()
    while sink.frames:
        sink.report(fail=False)
    delivery.check_acks()
    assert _last_copies_in_order(sink.log), sink.log
    assert sorted(set(sink.log)) == [b"a1", b"a2", b"a3", b"a4", b"a5"]
    assert delivery.tracker.uncommitted() == {TP: 5}
    per_key: dict[bytes, int] = defaultdict(int)
    for v in sink.log:
        per_key[v] += 1
    assert per_key[b"a1"] == 1  # a1 made it once, on the second repeat
