"""Fine-tuning in line with the events (``replay``): runs at fixed event counts.

The same file, config and seed give the same outputs, because runs happen at the same
events (on the :class:`~streamlstm.learning.schedule.Schedule`, and at once on drift)
whatever the batch size.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from streamlstm.config import Settings
from streamlstm.engine import BatchOutput, Engine
from streamlstm.learning.buffer import ReplayBuffer
from streamlstm.learning.device import require_training_device
from streamlstm.learning.gate import FineTuner, RunOutcome, record_run_metrics
from streamlstm.learning.schedule import Schedule

if TYPE_CHECKING:
    from streamlstm.metrics import Metrics


class InlineTrainer:
    """Fine-tunes in line at fixed event counts (and on drift): deterministic replays.

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

    def events_until_run(self) -> int:
        return max(1, self.schedule.interval(self.events) - self._since)

    def on_batch(self, output: BatchOutput) -> None:
        self._since += len(output)
        self.events += len(output)
        drifted = self.settings.drift.finetune_on_drift and any(output.detections.values())
        if self.schedule.due(self.events, self._since) or drifted:
            self._since = 0
            outcome = self.tuner.run(self.buffer.reader())
            record_run_metrics(self.metrics, outcome)
            self.outcomes.append(outcome)
            if outcome.result == "adopted":
                self.engine.offer_weights(outcome.state_dict(), outcome.version)

    def counts(self) -> Counter[str]:
        return Counter(o.result for o in self.outcomes)
