"""When to fine-tune: soon after there is data, then as often as the data grows by a share.

A stream's time scale is unknown in advance (one key at one event an hour, or 100k keys at
50k events/s), so the schedule counts events, not seconds: the first run comes after
``training.first_run_events`` events, and each next one after the events seen so far have
grown by ``training.interval_growth`` (at least ``first_run_events``, at most
``training.interval_events`` apart). Early on, when each new event teaches the most, runs
come often; later they come as often as there is meaningfully more to learn from.

A user who wants new data learned within a given time sets ``training.interval_seconds``:
a run also comes once that much time has passed since the last one, if any event arrived
(off by default: a fixed time would fine-tune a slow stream at every event). The daemon
reads the wall clock, ``replay`` the events' own timestamps, so both share this schedule
and a backtest shows what the daemon would do.

>>> from streamlstm.config import load_settings
>>> schedule = Schedule.from_settings(load_settings())
>>> [schedule.interval(seen) for seen in (0, 1_000, 10_000, 1_000_000)]
[256, 256, 2500, 20000]
>>> hourly = Schedule(first=256, growth=0.25, most=20_000, seconds=86_400.0)
>>> hourly.due(seen=30, since=24, elapsed=86_400.0), hourly.due(seen=30, since=0, elapsed=9e9)
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass

from streamlstm.config import Settings


@dataclass(frozen=True)
class Schedule:
    """Events between fine-tuning runs as a function of the events seen so far."""

    first: int  # events before the first run, and the shortest interval
    growth: float  # each interval is this share of the events seen so far...
    most: int  # ...but never longer than this
    seconds: float | None = None  # and, when set, never longer than this in time

    @staticmethod
    def from_settings(settings: Settings) -> Schedule:
        t = settings.training
        return Schedule(
            t.first_run_events, t.interval_growth, t.interval_events, t.interval_seconds
        )

    def interval(self, seen: int) -> int:
        """Events to wait after a run when ``seen`` events have been seen in all."""
        return int(min(self.most, max(self.first, self.growth * seen)))

    def due(self, seen: int, since: int, elapsed: float = 0.0) -> bool:
        """A run is due ``since`` events and ``elapsed`` seconds after the last one."""
        late = self.seconds is not None and since > 0 and elapsed >= self.seconds
        return since >= self.interval(seen) or late
