"""Fine-tuning comes soon after there is data, then as the data grows: also on a slow stream."""

from __future__ import annotations

import numpy as np

from streamlstm.config import load_settings
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


def test_a_slow_stream_is_fine_tuned_after_hundreds_of_events_not_thousands() -> None:
    """One key, one event an hour for 60 days: the first run comes at event 256 (in event
    counts, as the daemon does), not after training.interval_events (20,000)."""
    settings = load_settings(
        overrides={
            "model.input_size": "1",
            "model.hidden_size": "8",
            "training.batch_windows": "4",
            "training.steps_per_run": "2",
            "drift.finetune_on_drift": "false",
        }
    )
    engine = Engine.from_settings(settings)
    trainer = InlineTrainer(engine, settings)
    hours = 24 * 60
    ts = 1.4e9 + 3600.0 * np.arange(hours)  # years ago: history is normal data
    values = np.sin(np.arange(hours) / 24 * 2 * np.pi)[:, None]
    data = FileEvents(EventBatch.from_arrays(["sensor"] * hours, ts, values))
    replay(engine, data, progress=False, trainer=trainer)
    # Runs at 256, 512, 768 and 1,024 events, then when the data grew by 25% (1,280).
    assert len(trainer.outcomes) == 5
    assert settings.training.interval_events > hours  # the old cadence never ran here
