"""Learning while streaming: fine-tuning lowers next-step error; in-line replay is repeatable."""

from __future__ import annotations

import numpy as np

from streamlstm.config import load_settings
from streamlstm.devtools.synthetic import SyntheticStream
from streamlstm.engine import BatchOutput, Engine
from streamlstm.events import EventBatch
from streamlstm.learning.inline import InlineTrainer
from streamlstm.offline.backtest import replay
from streamlstm.offline.eventfiles import FileEvents

KEYS, STEPS = 16, 500


def _data() -> FileEvents:
    stream = SyntheticStream(
        n_keys=KEYS, width=2, seed=5, anomaly_rate=0.0, shift_rate=0.0, start_ts=0.0
    )
    a = stream.arrays(KEYS * STEPS)
    keys = [stream.key_names[k] for k in a.key_index]
    return FileEvents(EventBatch.from_arrays(keys, a.ts, a.values))


def _run(enabled: bool, **extra: str) -> tuple[np.ndarray, np.ndarray, InlineTrainer | None]:
    settings = load_settings(
        overrides={
            "model.input_size": "2",
            "model.hidden_size": "32",
            "model.num_layers": "1",
            "training.enabled": str(enabled).lower(),
            "training.interval_events": "800",
            "training.batch_windows": "32",
            "training.steps_per_run": "32",
            "training.window": "40",
            "training.learning_rate": "0.005",
            "training.seed": "1",
            **extra,
        }
    )
    engine = Engine.from_settings(settings)
    trainer = InlineTrainer(engine, settings) if settings.training.enabled else None
    outputs: list[BatchOutput] = []
    replay(engine, _data(), on_batch=outputs.append, progress=False, trainer=trainer)
    scaled = np.concatenate([o.scaled_error for o in outputs])
    prediction = np.concatenate([o.prediction for o in outputs])
    return scaled, prediction, trainer


def test_fine_tuning_lowers_next_step_error_against_training_off() -> None:
    frozen, _, _ = _run(False)
    learning, _, trainer = _run(True)
    assert trainer is not None
    counts = trainer.counts()
    assert counts["adopted"] >= 3, counts
    later = slice(len(frozen) // 2, None)  # after the first runs had a chance
    frozen_error = float(np.nanmean(frozen[later] ** 2))
    learning_error = float(np.nanmean(learning[later] ** 2))
    assert learning_error < 0.85 * frozen_error, (learning_error, frozen_error)  # 0.68 at seed 1


def test_inline_training_is_repeatable_and_independent_of_batch_size() -> None:
    _, first, trainer = _run(True, **{"training.steps_per_run": "4"})
    _, again, _ = _run(True, **{"training.steps_per_run": "4"})
    _, small_batches, _ = _run(True, **{"training.steps_per_run": "4", "engine.max_batch": "97"})
    assert trainer is not None and trainer.counts()["adopted"] >= 1
    np.testing.assert_array_equal(first, again)  # same run twice: bit for bit
    # Another batch size runs the same steps in batches of other shapes, and BLAS may sum
    # a matrix product in another order for another shape: float32 results may then
    # differ in the last bits (~1e-7 relative) while every run and verdict is the same.
    # The promise is the same outputs, not the same bits: rtol 1e-5 is 100x float32
    # rounding, atol 1e-6 covers values near 0; a different fine-tuning run or gate
    # verdict would move predictions by far more.
    np.testing.assert_allclose(first, small_batches, rtol=1e-5, atol=1e-6)
