"""Fine-tuning comes soon after there is data, then as the data grows: also on a slow stream."""

from __future__ import annotations

from typing import Any

import numpy as np

from streamlstm.config import Settings, load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch
from streamlstm.learning.inline import InlineTrainer
from streamlstm.learning.schedule import Schedule
from streamlstm.offline.backtest import replay
from streamlstm.offline.eventfiles import FileEvents


def test_intervals_start_short_and_grow_with_the_data() -> None:
    schedule = Schedule(first=256, growth=0.25, most=20_000)
    assert schedule.interval(0) == 256
    assert schedule.interval(4_000) == 1_000
    assert schedule.interval(10**9) == 20_000
    assert not schedule.due(seen=300, since=255) and schedule.due(seen=300, since=256)


def test_a_time_limit_brings_a_run_forward_only_when_events_arrived() -> None:
    daily = Schedule(first=256, growth=0.25, most=20_000, seconds=86_400.0)
    assert daily.due(seen=30, since=1, elapsed=86_400.0)
    assert not daily.due(seen=30, since=1, elapsed=86_399.0)
    assert not daily.due(seen=30, since=0, elapsed=1e9)  # nothing new to learn from
    assert not Schedule(first=256, growth=0.25, most=20_000).due(30, 1, elapsed=1e9)


def _hourly(hours: int) -> FileEvents:
    """One sensor, one event an hour, years ago (history is normal data)."""
    ts = 1.4e9 + 3600.0 * np.arange(hours)
    values = np.sin(np.arange(hours) / 24 * 2 * np.pi)[:, None]
    return FileEvents(EventBatch.from_arrays(["sensor"] * hours, ts, values))


def _small(**overrides: str) -> Settings:
    base = {
        "model.input_size": "1",
        "model.hidden_size": "8",
        "training.batch_windows": "4",
        "training.steps_per_run": "2",
        "drift.finetune_on_drift": "false",
    }
    return load_settings(overrides=base | overrides)


def test_a_slow_stream_is_fine_tuned_after_hundreds_of_events_not_thousands() -> None:
    """One key, one event an hour for 60 days: the first run comes at event 256 (in event
    counts, as the daemon does), not after training.interval_events (20,000)."""
    settings = _small()
    engine = Engine.from_settings(settings)
    trainer = InlineTrainer(engine, settings)
    hours = 24 * 60
    replay(engine, _hourly(hours), progress=False, trainer=trainer)
    # Runs at 256, 512, 768 and 1,024 events, then when the data grew by 25% (1,280).
    assert len(trainer.outcomes) == 5
    assert settings.training.interval_events > hours  # the old cadence never ran here


def _runs_at(settings: Settings, data: FileEvents) -> tuple[list[int], np.ndarray]:
    """Events replayed when each run started, and the predictions."""
    engine = Engine.from_settings(settings)
    trainer = InlineTrainer(engine, settings)
    at: list[int] = []
    run = trainer.tuner.run

    def counted(*args: Any) -> Any:
        at.append(trainer.events)
        return run(*args)

    trainer.tuner.run = counted  # type: ignore[method-assign]
    predictions: list[np.ndarray] = []
    replay(
        engine,
        data,
        progress=False,
        trainer=trainer,
        on_batch=lambda o: predictions.append(o.prediction),
    )
    return at, np.concatenate(predictions)


def test_replay_keeps_the_time_limit_in_event_time_whatever_the_batch_size() -> None:
    """training.interval_seconds = one day on hourly data: a run every 24 hours of event
    time (the first when the clock, started at the first event, reaches a day), as the
    daemon would on the wall clock; the same events and outputs with any batch size."""
    data = _hourly(24 * 20)
    at, first = _runs_at(_small(**{"training.interval_seconds": "86400"}), data)
    assert at == [25 + 24 * k for k in range(19)]
    again, second = _runs_at(
        _small(**{"training.interval_seconds": "86400", "engine.max_batch": "7"}), data
    )
    assert again == at
    np.testing.assert_array_equal(first, second)
