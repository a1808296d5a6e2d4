"""Fine-tuning in line with the events (``replay``): runs at fixed events.

The same file, config and seed give the same outputs, because runs happen at the same
events (on the :class:`~streamlstm.learning.schedule.Schedule`, and at once on drift)
whatever the batch size. The schedule's time limit, if set, is kept in event time: the
clock is the latest timestamp replayed so far.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from streamlstm.config import Settings
from streamlstm.engine import BatchOutput, Engine
from streamlstm.learning.buffer import ReplayBuffer
from streamlstm.learning.device import require_training_device
from streamlstm.learning.gate import FineTuner, RunOutcome, record_run_metrics
from streamlstm.learning.schedule import Schedule

if TYPE_CHECKING:
    from streamlstm.metrics import Metrics


class InlineTrainer:
    """Fine-tunes in line at fixed events (and on drift): deterministic replays.

    ``replay`` calls :meth:`on_batch` after each batch and cuts batches at
    :meth:`events_until_run`, so runs happen at the same events whatever the batch size.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: Metrics | None = None,
        write_checkpoints: bool = False,
    ) -> None:
        require_training_device(settings)
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.buffer = ReplayBuffer.from_settings(
            settings, engine.model.state_shape, engine.model.input_size
        )
        engine.attach_learner(self.buffer)
        self.tuner = FineTuner(engine.model, settings, engine.model_version, write_checkpoints)
        self.schedule = Schedule.from_settings(settings)
        self.outcomes: list[RunOutcome] = []
        self._since = 0
        self.events = 0
        self._clock = -np.inf  # the latest event time replayed
        self._last_run: float | None = None  # event time of the last run (or first event)

    def events_until_run(self, ts: np.ndarray) -> int:
        """How many of the next events (timestamps ``ts``) to process before the next
        check: up to and including the event at which a run falls due."""
        count = max(1, self.schedule.interval(self.events) - self._since)
        seconds = self.schedule.seconds
        if seconds is None or not len(ts):
            return count
        clock = np.maximum.accumulate(np.maximum(ts[:count], self._clock))
        start = clock[0] if self._last_run is None else self._last_run
        late = np.flatnonzero(clock - start >= seconds)
        return int(late[0]) + 1 if len(late) else count

    def on_batch(self, output: BatchOutput) -> None:
        if not len(output):
            return
        self._since += len(output)
        self.events += len(output)
        self._clock = max(self._clock, float(output.ts.max()))
        if self._last_run is None:
            self._last_run = float(output.ts[0])
        elapsed = self._clock - self._last_run
        drifted = self.settings.drift.finetune_on_drift and any(output.detections.values())
        if self.schedule.due(self.events, self._since, elapsed) or drifted:
            self._since = 0
            self._last_run = self._clock
            outcome = self.tuner.run(self.buffer.reader())
            record_run_metrics(self.metrics, outcome)
            self.outcomes.append(outcome)
            if outcome.result == "adopted":
                self.engine.offer_weights(outcome.state_dict(), outcome.version)

    def counts(self) -> Counter[str]:
        return Counter(o.result for o in self.outcomes)
