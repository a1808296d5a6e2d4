"""The demo's scorecard: how many injected incidents the daemon's alarms caught, and how
many alarms were false, read from the output topic as any user of the daemon would.

An incident is an injected spike or level shift of one key. It counts as *caught* when an
alarm (``anomaly_score >= engine.anomaly_threshold``) lands on its event or on one of the
key's next :data:`WINDOW` - 1 events (a detector may need the event after a spike to be
sure; NAB gives windows for the same reason). Every other alarm is *false*. Incidents
whose events the daemon had not predicted yet when the demo stopped are not counted.
Events are told apart by their place in their key's sequence (the producer stamps
``ts`` with the send time, shared by a whole chunk): the n-th output record of a key is
the prediction for its n-th event, since a key's events are predicted in order.

>>> tally = AlarmTally(threshold=0.5)
>>> tally.injected("a", 2)  # the key's third event
>>> for score in [0.9, 0.0, 0.1, 0.7, 0.8]:
...     tally.record("a", score)
>>> tally.caught, tally.missed, tally.false_alarms
(1, 0, 2)
>>> tally.summary()
'injected incidents: 1 caught, 0 missed; false alarms: 2 (of 3 alarms)'
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import orjson

if TYPE_CHECKING:
    from streamlstm.config import KafkaSettings
    from streamlstm.devtools.synthetic import SyntheticStream

WINDOW = 3  # the incident's own event and the key's next two

Incident = tuple[str, int]  # (key, the event's place in the key's sequence)


class AlarmTally:
    """Injected incidents on one side, the output records' scores on the other."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.caught = self.missed = self.false_alarms = self.alarms = 0
        self._injected: set[Incident] = set()
        self._open: dict[str, list[int]] = {}  # key -> [events left, alarmed (0/1)]
        self._seen: dict[str, int] = {}  # output records per key so far
        self._lock = threading.Lock()  # the producer adds while the reader records

    def injected(self, key: str, place: int) -> None:
        """The key's event number ``place`` (from 0) carries an injected incident."""
        with self._lock:
            self._injected.add((key, place))

    def record(self, key: str, score: float | None) -> None:
        """The key's next output record, in the key's order (as its partition delivers)."""
        alarm = score is not None and score >= self.threshold
        self.alarms += alarm
        place = self._seen.get(key, 0)
        self._seen[key] = place + 1
        with self._lock:
            starts = (key, place) in self._injected
            if starts:
                self._injected.discard((key, place))
        window = self._open.get(key)
        if starts:
            if window is not None:  # the previous incident of this key ends here
                self._close(key)
            window = self._open[key] = [WINDOW, 0]
        if window is None:
            self.false_alarms += alarm
            return
        if alarm and window[1]:
            self.false_alarms += 1  # one alarm per incident; a second one is noise
        window[1] |= alarm
        window[0] -= 1
        if window[0] == 0:
            self._close(key)

    def _close(self, key: str) -> None:
        _, alarmed = self._open.pop(key)
        if alarmed:
            self.caught += 1
        else:
            self.missed += 1

    def summary(self) -> str:
        for key in list(self._open):  # incidents still in their window count as they stand
            self._close(key)
        return (
            f"injected incidents: {self.caught:,} caught, {self.missed:,} missed; "
            f"false alarms: {self.false_alarms:,} (of {self.alarms:,} alarms)"
        )


def labelled_events(stream: SyntheticStream, tally: AlarmTally, chunk: int) -> Iterator[list[dict]]:
    """Endless chunks of ``stream``'s events; its injected spikes and shifts go to ``tally``."""
    names = stream.key_names
    produced = np.zeros(len(names), dtype=np.int64)  # events of each key so far
    while True:
        arrays = stream.arrays(chunk)
        keys = arrays.key_index
        for i in np.flatnonzero(arrays.anomaly | arrays.shift).tolist():
            key = int(keys[i])
            tally.injected(names[key], int(produced[key] + np.count_nonzero(keys[:i] == key)))
        produced += np.bincount(keys, minlength=len(names))
        yield stream.to_events(arrays)


def tally_outputs(tally: AlarmTally, records: list) -> None:
    """Count output records (one JSON object each, or with ``kafka.output_per_message``
    one JSON array of them) into ``tally``."""
    for r in records:
        doc = orjson.loads(r.value)
        for record in doc if isinstance(doc, list) else (doc,):
            tally.record(record["key"], record.get("anomaly_score"))


def read_outputs(
    kafka: KafkaSettings, tally: AlarmTally, stop: threading.Event, drain_s: float = 3.0
) -> None:
    """Feed every record of the output topic to ``tally`` until ``stop``, then read on to
    the partitions' high watermarks (at most ``drain_s``) for what the daemon flushed last.
    On the client ``kafka.client`` names (:func:`streamlstm.io.reader.read_to_end`)."""
    from streamlstm.io.client import make_reader
    from streamlstm.io.reader import EndNotReached, read_to_end

    reader = make_reader(kafka, fetch_wait_ms=kafka.fetch_max_wait_ms)
    try:
        parts = None
        while not parts and not stop.wait(0.2):
            parts = reader.partitions(kafka.output_topic)
        if not parts:
            return
        reader.assign(kafka.output_topic, dict.fromkeys(parts))
        while not stop.is_set():
            tally_outputs(tally, reader.poll(0.2))
        with contextlib.suppress(EndNotReached):
            read_to_end(reader, partial(tally_outputs, tally), drain_s)
    finally:
        reader.close()
