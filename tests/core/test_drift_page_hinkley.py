"""Vectorised Page-Hinkley agrees with river's PageHinkley; the engine's drift marking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from river.drift import PageHinkley

from streamlstm.config import load_settings
from streamlstm.drift import VectorPageHinkley
from streamlstm.engine import Engine
from streamlstm.events import EventBatch


def _streams(keys: int, steps: int, seed: int) -> np.ndarray:
    """Piecewise-stationary sequences with random change points, scales and noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((keys, steps))
    for k in range(keys):
        cuts = np.sort(rng.integers(50, steps, 3))
        bounds = [0, *cuts.tolist(), steps]
        scale = rng.uniform(0.2, 3.0)
        for a, b in itertools.pairwise(bounds):
            out[k, a:b] = rng.normal(rng.normal(0, scale), rng.uniform(0.1, 2.0), b - a)
    return out


def _river_points(seq: np.ndarray, **kw: object) -> list[int]:
    ph = PageHinkley(**kw)
    points = []
    for t, value in enumerate(seq.tolist()):
        ph.update(value)
        if ph.drift_detected:
            points.append(t)
    return points


@pytest.mark.parametrize("mode", ["up", "down", "both"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_drift_points_as_river(mode: str, dtype: torch.dtype) -> None:
    data = _streams(keys=40, steps=2000, seed=1)
    if dtype == torch.float32:
        data = data.astype(np.float32).astype(np.float64)  # both see the same numbers
    params = {"threshold": 20.0, "delta": 0.01, "min_instances": 25, "alpha": 0.999}
    vector = VectorPageHinkley(40, mode=mode, dtype=dtype, **params)
    mine: list[list[int]] = [[] for _ in range(40)]
    for t in range(data.shape[1]):
        for k in torch.nonzero(vector.update(torch.from_numpy(data[:, t]))).flatten().tolist():
            mine[k].append(t)
    expected = [_river_points(data[k], mode=mode, **params) for k in range(40)]
    assert sum(map(len, expected)) > 100  # the sequences do drift, often
    assert mine == expected


def test_inactive_streams_keep_their_statistics() -> None:
    data = _streams(keys=2, steps=600, seed=2)
    vector = VectorPageHinkley(2, threshold=10.0)
    rng = np.random.default_rng(0)
    active = rng.random((600, 2)) < 0.5
    mine: list[list[int]] = [[], []]
    for t in range(600):
        hits = vector.update(torch.from_numpy(data[:, t]), torch.from_numpy(active[t]))
        for k in torch.nonzero(hits).flatten().tolist():
            mine[k].append(t)
    for k in range(2):
        fed = np.flatnonzero(active[:, k])
        points = _river_points(data[k, fed], threshold=10.0)
        assert mine[k] == fed[points].tolist()


def _settings(**extra: str):
    return load_settings(
        overrides={
            "model.input_size": "1",
            "model.hidden_size": "4",
            "model.num_layers": "1",
            "drift.ph_threshold": "5",
            "drift.ph_min_instances": "10",
            "drift.adwin_delta": "1e-12",  # keep the global detector out of the per-key check
            **extra,
        }
    )


def test_engine_per_key_drift_equals_river_on_each_keys_error_stream() -> None:
    engine = Engine.from_settings(_settings())
    rng = np.random.default_rng(3)
    keys = 5
    level = np.zeros(keys)
    errors: dict[int, list[float]] = {k: [] for k in range(keys)}
    flags: dict[int, list[bool]] = {k: [] for k in range(keys)}
    for b in range(60):
        if b in (20, 40):
            level += rng.normal(0, 8, keys) * (rng.random(keys) < 0.6)
        k = np.repeat(np.arange(keys), 4)
        values = (level[k] + rng.normal(0, 1, len(k))).reshape(-1, 1)
        out = engine.process(EventBatch.from_arrays([f"k{i}" for i in k], b + 0.1 * k, values))
        assert out.detections["adwin"] == 0
        for i, key in enumerate(k.tolist()):
            if not np.isnan(out.scaled_error[i]):
                errors[key].append(float(out.scaled_error[i]))
                flags[key].append(bool(out.drift[i]))
    s = engine.settings.drift
    total = 0
    for key in range(keys):
        expected = _river_points(
            np.array(errors[key], dtype=np.float32).astype(np.float64),
            threshold=s.ph_threshold,
            delta=s.ph_delta,
            min_instances=s.ph_min_instances,
            alpha=s.ph_alpha,
            mode=s.ph_mode,
        )
        assert np.flatnonzero(flags[key]).tolist() == expected
        total += len(expected)
    assert total > 0


def test_adwin_marks_the_batch() -> None:
    settings = _settings(
        **{
            "drift.adwin_delta": "0.01",
            "drift.adwin_block": "16",
            "drift.ph_threshold": "1e9",
            "training.enabled": "false",
        }
    )
    engine = Engine.from_settings(settings)
    rng = np.random.default_rng(4)
    hits, marked = [], 0
    for b in range(400):
        noise = 0.1 if b < 200 else 3.0  # the errors jump: the whole stream got harder
        keys = [f"k{i}" for i in range(8)]
        values = (np.sin(np.arange(8) + b / 5) + rng.normal(0, noise, 8)).reshape(-1, 1)
        out = engine.process(EventBatch.from_arrays(keys, np.full(8, float(b)), values))
        hits += [b] * out.detections["adwin"]
        marked += sum(bool(r.get("drift")) for r in out.records())
    assert hits and min(hits) >= 200  # the errors jumped at batch 200
    assert marked == len(hits)  # one record marked per detection
