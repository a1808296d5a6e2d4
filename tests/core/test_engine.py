"""The engine's contract: per-key order, batch independence, determinism, scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamlstm.config import Settings, load_settings
from streamlstm.engine import BatchOutput, Engine
from streamlstm.events import EventBatch
from streamlstm.steps import step_groups

WIDTH = 3


def settings(**overrides: object) -> Settings:
    base = {
        "model.input_size": WIDTH,
        "model.hidden_size": 16,
        "training.enabled": False,
        "drift.enabled": False,
    }
    return load_settings(overrides={**base, **overrides})


def trained_like_engine(seed: int = 0, **overrides: object) -> Engine:
    """An engine whose head is not zero, so predictions depend on the recurrent state."""
    engine = Engine.from_settings(settings(**{"model.seed": seed, **overrides}))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        engine.model.head.weight.copy_(torch.randn(engine.model.head.weight.shape, generator=gen))
    return engine


def stream(keys: list[str], steps: int, seed: int = 0) -> EventBatch:
    """Each key a noisy sine of its own scale; events of all keys interleaved randomly.

    A key's signal depends only on its name and ``seed``, not on the other keys.
    """
    rows = []
    for key in keys:
        k = sum(map(ord, key))
        rng = np.random.default_rng([seed, k])
        scale = 10.0 ** (k % 3)
        for t in range(steps):
            v = scale * (np.sin(t / 3 + k + np.arange(WIDTH)) + 0.1 * rng.normal(size=WIDTH))
            rows.append((key, float(t), v))
    order = np.random.default_rng(seed).permutation(len(rows))
    # keep each key's own order: sort the shuffled rows by (position of its t within key)
    rows = sorted((rows[i] for i in order), key=lambda r: r[1])
    return EventBatch.from_arrays(
        [r[0] for r in rows], np.array([r[1] for r in rows]), np.stack([r[2] for r in rows])
    )


def run(engine: Engine, batch: EventBatch, chunk: int) -> BatchOutput:
    outputs = [engine.process(batch.take(slice(i, i + chunk))) for i in range(0, len(batch), chunk)]
    return BatchOutput(
        keys=[k for o in outputs for k in o.keys],
        ts=np.concatenate([o.ts for o in outputs]),
        prediction=np.concatenate([o.prediction for o in outputs]),
        error=np.concatenate([o.error for o in outputs]),
        squared_error=np.concatenate([o.squared_error for o in outputs]),
        anomaly_score=np.concatenate([o.anomaly_score for o in outputs]),
        model_version=outputs[-1].model_version,
    )


def of_key(out: BatchOutput, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [i for i, k in enumerate(out.keys) if k == key]
    return out.prediction[rows], out.error[rows], out.anomaly_score[rows]


def test_a_keys_outputs_do_not_depend_on_other_keys() -> None:
    alone = run(trained_like_engine(), stream(["a"], 40), chunk=7)
    mixed = run(trained_like_engine(), stream(["x", "a", "y", "z"], 40), chunk=13)
    for got, want in zip(of_key(mixed, "a"), of_key(alone, "a"), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, equal_nan=True)
    # and the state really matters: a different history changes the predictions
    other = run(trained_like_engine(), stream(["a"], 40, seed=9), chunk=7)
    assert not np.allclose(of_key(other, "a")[0], of_key(alone, "a")[0], atol=1e-3)


def test_max_batch_1_and_1024_give_the_same_outputs() -> None:
    events = stream([f"k{i}" for i in range(20)], 30)
    wide = {"state.recurrent_dtype": "float32"}  # float16: see below
    one = trained_like_engine(**{"engine.max_batch": 1, **wide}).process(events)
    big = trained_like_engine(**{"engine.max_batch": 1024, **wide}).process(events)
    assert one.keys == big.keys
    # Batched and single-row matmuls round differently; a few float32 ulps of a value of
    # ~100 (one ulp: 7.6e-6) exceed an absolute 1e-5, so the bound is relative there too.
    # (A state stored in float16 turns such a difference into a float16 step, 2^-11
    # relative, where it straddles a rounding boundary: the bound holds for float32.)
    np.testing.assert_allclose(one.prediction, big.prediction, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(one.error, big.error, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(one.anomaly_score, big.anomaly_score, atol=1e-5, equal_nan=True)


def test_events_of_one_key_in_one_batch_are_applied_in_order() -> None:
    events = stream(["a", "b"], 12)
    together = trained_like_engine().process(events)
    one_by_one = run(trained_like_engine(), events, chunk=1)
    np.testing.assert_allclose(together.prediction, one_by_one.prediction, atol=1e-5)
    reversed_order = events.take(np.arange(len(events))[::-1])
    backwards = trained_like_engine().process(reversed_order)
    last_a = max(i for i, k in enumerate(events.keys) if k == "a")
    assert not np.allclose(backwards.prediction[0], together.prediction[last_a], atol=1e-3)


def test_step_groups_put_each_keys_kth_event_in_group_k() -> None:
    groups = step_groups(np.array([5, 2, 5, 5, 2, 9]))
    assert [sorted(g.tolist()) for g in groups] == [[0, 1, 5], [2, 4], [3]]


def test_deterministic_for_a_seed() -> None:
    events = stream(["a", "b", "c"], 20)
    first = trained_like_engine(seed=4).process(events)
    again = trained_like_engine(seed=4).process(events)
    other = trained_like_engine(seed=5).process(events)
    np.testing.assert_array_equal(first.prediction, again.prediction)
    assert not np.allclose(first.prediction, other.prediction)


def test_untrained_network_forecasts_persistence_and_each_prediction_is_scored() -> None:
    engine = Engine.from_settings(settings())
    values = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 5.0], [0.0, 2.0, 5.0]])
    out = engine.process(EventBatch.from_arrays(["k"] * 3, np.arange(3.0), values))
    net = engine.store.read("k", "net_pending").numpy()
    np.testing.assert_allclose(net, values[-1], atol=1e-5)
    # The output mixes the forecasters: it lies between persistence and the EWMA.
    ewma = engine.store.read("k", "ewma").numpy()
    low, high = np.minimum(values[-1], ewma), np.maximum(values[-1], ewma)
    assert np.all((out.prediction[-1] >= low - 1e-5) & (out.prediction[-1] <= high + 1e-5))
    assert np.isnan(out.error[0]) and np.isnan(out.anomaly_score[0])
    diff = values[1:] - out.prediction[:-1]  # each event scores the previous prediction
    np.testing.assert_allclose(out.error[1:], np.abs(diff).mean(1), rtol=1e-5)  # MAE, input units
    np.testing.assert_allclose(out.squared_error[1:], (diff * diff).mean(1), rtol=1e-5)
    records = list(out.records())
    assert records[0]["error"] is None and records[0]["anomaly_score"] is None
    assert set(records[1]) == {"key", "ts", "prediction", "error", "anomaly_score", "model_version"}


def test_anomaly_score_is_calibrated_per_key_and_flags_spikes() -> None:
    rng = np.random.default_rng(0)
    engine = Engine.from_settings(settings())
    steps = 300
    for scale, key in ((0.01, "small"), (1000.0, "large")):
        values = scale * (5 + rng.normal(size=(steps, WIDTH)))
        values[250] += scale * 30  # one spike
        out = engine.process(EventBatch.from_arrays([key] * steps, np.arange(steps * 1.0), values))
        scores = out.anomaly_score[1:]
        assert np.all((scores >= 0) & (scores < 1))
        spike = scores[249]  # row 250
        ordinary = np.delete(scores[60:], [249 - 60, 250 - 60])
        assert spike > 0.5  # a tail probability below 1e-5
        assert spike > ordinary.max()  # it ranks above every ordinary event
        assert np.median(ordinary) < 0.1


def test_explicit_target_is_scored_at_once() -> None:
    engine = Engine.from_settings(settings())
    batch = EventBatch.from_arrays(
        ["k", "k"], [0.0, 1.0], [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]], target=[[1.5] * 3, [np.nan] * 3]
    )
    out = engine.process(batch)
    assert out.error[0] == pytest.approx(0.5, abs=1e-4)  # |1 - 1.5|: persistence vs target
    assert np.isnan(out.error[1])  # the first prediction was already scored


def test_weights_offered_apply_at_the_next_batch() -> None:
    engine = trained_like_engine()
    events = stream(["a"], 5)
    before = engine.process(events)
    new_weights = {k: v + 0.1 for k, v in engine.model.state_dict().items()}
    engine.offer_weights(new_weights, version=7)
    assert engine.model_version == 0  # nothing changes until the next batch
    after = engine.process(events)
    assert after.model_version == 7 and before.model_version == 0
    assert torch.allclose(engine.model.head.weight, new_weights["head.weight"])


def test_an_offer_not_newer_than_the_pending_or_served_weights_is_ignored() -> None:
    """The trainer and the model topic offer from two threads: whichever lands last, the
    newest version is served."""
    engine = Engine.from_settings(settings())
    weights = engine.model.state_dict()
    engine.offer_weights(weights, 5)
    engine.offer_weights(weights, 4)  # older than the pending offer
    engine.adopt_offered()
    assert engine.model_version == 5
    engine.offer_weights(weights, 5)  # not newer than the served weights
    engine.offer_weights(weights, 3)
    assert engine._offered is None
    engine.offer_weights(weights, 6)
    engine.adopt_offered()
    assert engine.model_version == 6
