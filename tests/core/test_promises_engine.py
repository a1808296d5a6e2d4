"""Engine promises checked against an exact reference, so a planted bug cannot hide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamlstm.config import load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch
from streamlstm.learning.checkpoint import CheckpointError, architecture, save_checkpoint

WIDTH = 3


def _engine(**overrides: str) -> Engine:
    base = {
        "model.input_size": str(WIDTH),
        "model.hidden_size": "8",
        "training.enabled": "false",
        "drift.enabled": "false",
    }
    engine = Engine.from_settings(load_settings(overrides={**base, **overrides}))
    with torch.no_grad():  # a non-zero head: predictions are not just persistence
        gen = torch.Generator().manual_seed(3)
        engine.model.head.weight.copy_(torch.randn(engine.model.head.weight.shape, generator=gen))
    return engine


def _reference_std_error(values: np.ndarray, predictions: np.ndarray, clip: float) -> list[float]:
    """The std-unit error of each event of one key, in float64.

    Event i (i >= 1) scores the prediction made at event i-1: the absolute error in units
    of the key's standard deviation over events 0 .. i-1 (exact population variance,
    with the scaler's floor), clipped at ``clip``, averaged over features.
    """
    out = [float("nan")]
    for i in range(1, len(values)):
        seen = values[:i].astype(np.float64)
        mean = seen.mean(0)
        var = seen.var(0)  # ddof=0: the scaler's exact phase
        std = np.sqrt(var + 1e-14 * mean * mean + 1e-30)
        err = np.abs(values[i].astype(np.float64) - predictions[i - 1].astype(np.float64))
        out.append(float(np.minimum(err / std, clip).mean()))
    return out


def test_std_unit_error_uses_the_std_from_before_the_event() -> None:
    """``scaled_error`` divides by the key's std *before* the scored event updates it.

    An outlier must not shrink its own std-unit error by widening the std first.
    """
    engine = _engine()
    clip = engine.settings.engine.input_clip
    assert engine.settings.state.scaler_window > 20  # the scaler is exact over this test
    rng = np.random.default_rng(7)
    series = {
        "a": 5.0 + rng.normal(size=(12, WIDTH)),
        "b": -300.0 + 40.0 * rng.normal(size=(12, WIDTH)),
    }
    series["a"][8] += 6.0  # an outlier: a few std, below the clip
    series["b"][5, 0] += 4000.0  # far beyond the clip in one feature
    keys, ts, rows = [], [], []
    for t in range(12):  # interleaved, several events per key per batch
        for key in ("a", "b"):
            keys.append(key)
            ts.append(1_000.0 + t)
            rows.append(series[key][t])
    batch = EventBatch.from_arrays(keys, np.array(ts), np.array(rows))
    outputs = [engine.process(batch.take(slice(i, i + 7))) for i in range(0, len(batch), 7)]
    scaled = np.concatenate([o.scaled_error for o in outputs])
    prediction = np.concatenate([o.prediction for o in outputs])
    for key in ("a", "b"):
        mine = np.array([k == key for k in keys])
        expected = _reference_std_error(series[key].astype(np.float32), prediction[mine], clip)
        assert np.isnan(scaled[mine][0])
        np.testing.assert_allclose(scaled[mine][1:], expected[1:], rtol=1e-5, atol=1e-6)
    # The outliers really are scored by the std before them: large, and clipped for b.
    assert scaled[keys.index("a") + 2 * 8] > 3.0
    assert scaled[keys.index("b") + 2 * 5] > clip / WIDTH


def test_leader_shares_cover_every_forecaster_and_sum_to_one_over_live_keys() -> None:
    engine = _engine()
    empty = engine.leader_shares()
    assert empty and set(empty.values()) == {0.0}  # no keys yet: every share is zero
    series = np.arange(10.0)[:, None] * np.ones((1, WIDTH))
    engine.process(EventBatch.from_arrays(["only"] * 10, np.arange(10.0), series))
    shares = engine.leader_shares()
    assert shares.keys() == empty.keys()
    assert sorted(shares.values()) == [0.0] * (len(shares) - 1) + [1.0]  # one key, one leader


class _RecordingLearner:
    """A learner that keeps what the engine hands it, chunk by chunk."""

    def __init__(self) -> None:
        self.begins: list[tuple[int, int]] = []
        self.steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # slots, label, count
        self.own: list[np.ndarray | None] = []  # explicit labels, when events carry a target
        self.ends = 0

    def begin(self, events: int, capacity: int) -> None:
        self.begins.append((events, capacity))

    def record(self, step) -> None:  # type: ignore[no-untyped-def]
        label, count = step.label_prev.numpy().copy(), step.count.numpy().copy()
        self.steps.append((step.slots.numpy().copy(), label, count))
        self.own.append(None if step.own_label is None else step.own_label.numpy().copy())

    def end(self) -> None:
        self.ends += 1


def test_the_learner_gets_each_event_once_labelled_in_the_previous_steps_std_units() -> None:
    engine = _engine()
    learner = _RecordingLearner()
    engine.attach_learner(learner)
    values = np.random.default_rng(5).normal(size=(9, WIDTH)) * [1.0, 10.0, 100.0]
    engine.process(EventBatch.from_arrays(["k"] * 9, np.arange(9.0), values))
    assert learner.begins == [(9, engine.store.capacity)] and learner.ends == 1
    assert [int(count[0]) for _, _, count in learner.steps] == list(range(1, 10))
    labels = np.stack([label[0] for _, label, _ in learner.steps])
    assert np.all(labels[0] == 0.0)  # a first event has no previous step to label
    for t in range(1, 9):  # the move to event t in the std of the events before it
        past = values[:t].astype(np.float64)
        std = np.sqrt(past.var(0) + 1e-14 * past.mean(0) ** 2 + 1e-30)
        expected = (values[t] - values[t - 1]) / std
        np.testing.assert_allclose(labels[t], expected, rtol=1e-4)


def test_the_typical_step_follows_a_keys_last_hundred_moves() -> None:
    """``engine.max_step`` caps a move at a multiple of the key's typical step: an
    average that forgets (window 100), so a key that starts moving more gets room."""
    engine = _engine(**{"engine.max_step": "1e9"})  # the column is kept for max_step only
    moves = np.r_[np.ones(100), np.full(200, 10.0)] * np.where(np.arange(300) % 2, 1.0, -1.0)
    values = np.cumsum(moves)[:, None] * np.ones((1, WIDTH))
    engine.process(EventBatch.from_arrays(["k"] * 300, np.arange(300.0), values))
    row = engine.store.table[[engine.store.slot("k")]]
    typical = engine.store.layout.field(row, "step")
    assert torch.all(typical > 8.0), typical  # about 8.8; a plain mean of all moves: 7


def test_with_max_step_the_network_moves_at_most_that_many_typical_steps() -> None:
    engine = _engine(**{"engine.max_step": "0.5"})
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 3.0)
    engine.offer_weights(engine.model.state_dict(), 1)  # a network that wants big moves
    values = np.random.default_rng(4).normal(size=(40, WIDTH))
    engine.process(EventBatch.from_arrays(["k"] * 40, np.arange(40.0), values))
    row = engine.store.table[[engine.store.slot("k")]]
    field = engine.store.layout.field
    moved = (field(row, "net_pending") - torch.as_tensor(values[-1:])).abs()
    limit = 0.5 * field(row, "step")
    assert torch.all(moved <= limit * (1 + 1e-5)), (moved, limit)
    assert torch.any(moved >= limit * (1 - 1e-5))  # the cap was reached: it was needed


def test_an_explicit_target_scores_each_keys_prediction_against_its_own_target() -> None:
    engine = _engine()
    rng = np.random.default_rng(6)
    warm = rng.normal(size=(20, WIDTH))
    engine.process(EventBatch.from_arrays(["a", "b"] * 10, np.arange(20.0), warm))
    values = rng.normal(size=(2, WIDTH))
    target = values + np.array([[0.5] * WIDTH, [-3.0] * WIDTH])
    out = engine.process(EventBatch.from_arrays(["a", "b"], [20.0, 20.0], values, target))
    diff = out.prediction - target.astype(np.float32)
    np.testing.assert_allclose(out.error, np.abs(diff).mean(1), rtol=1e-5)
    np.testing.assert_allclose(out.squared_error, (diff * diff).mean(1), rtol=1e-5)
    assert abs(out.error[0] - out.error[1]) > 1.0  # two keys, two different errors


def test_an_explicit_target_reaches_the_learner_as_the_events_own_label() -> None:
    engine = _engine()
    learner = _RecordingLearner()
    engine.attach_learner(learner)
    values = np.random.default_rng(8).normal(size=(6, WIDTH))
    engine.process(EventBatch.from_arrays(["k"] * 6, np.arange(6.0), values))
    assert learner.own == [None] * 6
    upward = values[-1:] + 1.0  # each feature's target above its value
    engine.process(EventBatch.from_arrays(["k"], [6.0], values[-1:], upward))
    own = learner.own[-1]
    assert own is not None and np.all(own > 0)


def test_an_engine_built_from_a_model_serves_version_0() -> None:
    engine = _engine()
    fresh = Engine(engine.model, engine.settings)
    out = fresh.process(EventBatch.from_arrays(["k"], [0.0], np.zeros((1, WIDTH))))
    assert fresh.model_version == out.model_version == 0


def test_an_engine_resumes_a_checkpoint_of_its_architecture_and_refuses_another(
    tmp_path: Path,
) -> None:
    saved = _engine(**{"training.checkpoint_dir": str(tmp_path)})
    settings = saved.settings
    save_checkpoint(tmp_path, saved.model.state_dict(), architecture(saved.model, settings), 7)
    resumed = Engine.from_settings(settings)
    assert resumed.model_version == 7
    assert torch.equal(resumed.model.head.weight, saved.model.head.weight)
    other_inputs = settings.model_copy(
        update={"model": settings.model.model_copy(update={"inputs": "change"})}
    )
    with pytest.raises(CheckpointError, match="inputs"):
        Engine.from_settings(other_inputs)


def test_the_network_sees_a_spike_no_further_than_the_input_clip() -> None:
    """Two spikes both beyond ``engine.input_clip`` standard deviations reach the network
    as the same clipped input: the recurrent state after them is the same."""
    history = np.random.default_rng(9).normal(size=(149, WIDTH))
    states = []
    for spike in (30.0, 1e6):  # about 11 and 12 std after the scaler takes them in
        engine = _engine()
        assert engine.settings.engine.input_clip < 11
        values = np.r_[history, np.full((1, WIDTH), spike)]
        engine.process(EventBatch.from_arrays(["k"] * 150, np.arange(150.0), values))
        row = engine.store.table[[engine.store.slot("k")]]
        states.append(engine.store.layout.field(row, "recurrent").clone())
    torch.testing.assert_close(states[0], states[1])
