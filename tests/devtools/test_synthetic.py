"""The synthetic event generator: determinism, shape, labels, scale of keys."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from streamlstm.devtools.synthetic import SyntheticStream


def _stream(**kw) -> SyntheticStream:
    args = {"n_keys": 50, "width": 3, "seed": 7, "start_ts": 1_700_000_000.0}
    args.update(kw)
    return SyntheticStream(**args)


def test_same_seed_same_events() -> None:
    assert _stream().batch(5000) == _stream().batch(5000)


def test_different_seed_differs() -> None:
    a, b = _stream(seed=1).batch(500), _stream(seed=2).batch(500)
    assert [e["values"] for e in a] != [e["values"] for e in b]
    assert [e["key"] for e in a] != [e["key"] for e in b]


def test_independent_of_batch_sizes() -> None:
    # Slicing the stream differently (across generation blocks too) yields the same events.
    whole = _stream().batch(70_000)
    pieces = _stream()
    parts: list[dict] = []
    for n in (1, 999, 0, 32_768, 17, 36_215):
        parts += pieces.batch(n)
    assert parts == whole


def test_event_shape_and_keys() -> None:
    s = _stream(n_keys=17, width=5)
    events = s.batch(17 * 40)
    assert all(set(e) == {"key", "ts", "values"} for e in events)
    assert all(isinstance(e["key"], str) and isinstance(e["ts"], float) for e in events)
    assert all(len(e["values"]) == 5 for e in events)
    assert {e["key"] for e in events} == {f"key-{i:05d}" for i in range(17)}
    assert events[0]["key"].startswith("key-0000")
    # Every key appears once per round, in a shuffled order.
    counts = {k: 0 for k in s.key_names}
    for e in events:
        counts[e["key"]] += 1
    assert set(counts.values()) == {40}
    assert [e["key"] for e in events[:17]] != sorted(e["key"] for e in events[:17])
    # Events serialize as JSON with plain floats.
    assert orjson.loads(orjson.dumps(events[0])) == events[0]


def test_timestamps_increase_by_step() -> None:
    s = _stream(n_keys=10, step_seconds=2.0)
    events = s.batch(1000)
    ts = np.array([e["ts"] for e in events])
    assert ts[0] == pytest.approx(1_700_000_000.0)
    assert np.all(np.diff(ts) > 0)
    per_key = {}
    for e in events:
        per_key.setdefault(e["key"], []).append(e["ts"])
    for stamps in per_key.values():
        gaps = np.diff(stamps)
        assert np.all(gaps > 0) and abs(gaps.mean() - 2.0) < 0.1


def test_values_finite_and_keys_span_scales() -> None:
    a = _stream(n_keys=200, width=4).arrays(200 * 100)
    assert a.values.shape == (20_000, 4)
    assert np.isfinite(a.values).all()
    spread = np.array([a.values[a.key_index == k].std() for k in range(200)])
    assert spread.max() / spread.min() > 100  # keys of very different scales


def test_anomaly_labels_at_configured_rate() -> None:
    s = _stream(n_keys=100, width=2, anomaly_rate=0.01)
    events, labels = s.batch(200_000, with_labels=True)
    assert labels.dtype == bool and labels.shape == (len(events),)
    rate = labels.mean()
    assert 0.008 < rate < 0.012  # 2000 expected, sd ~45
    assert not _stream(anomaly_rate=0.0).batch(20_000, with_labels=True)[1].any()


def test_spikes_stand_out_from_their_key() -> None:
    s = _stream(n_keys=20, width=3, anomaly_rate=0.005, shift_rate=0.0)
    a = s.arrays(20 * 5000)
    z_spike, z_normal = [], []
    for k in range(20):
        mine = a.key_index == k
        v, lab = a.values[mine], a.anomaly[mine]
        center = np.median(v[~lab], axis=0)
        scale = np.percentile(np.abs(v[~lab] - center), 99, axis=0)
        z = np.max(np.abs(v - center) / scale, axis=1)
        z_spike += z[lab].tolist()
        z_normal += z[~lab].tolist()
    assert len(z_spike) > 100
    assert np.median(z_spike) > 3 * np.percentile(z_normal, 99)


def test_level_shifts_persist() -> None:
    # Against the same stream without shifts (anomalies off, so within the first
    # generation block both draw the same key order and noise), the difference per
    # key is a step function that moves exactly at the marked shift events.
    kw = {"n_keys": 4, "width": 2, "anomaly_rate": 0.0}
    with_shift = _stream(shift_rate=0.002, **kw).arrays(20_000)
    without = _stream(shift_rate=0.0, **kw).arrays(20_000)
    assert np.array_equal(with_shift.key_index, without.key_index)
    assert with_shift.shift.sum() >= 10
    diff = with_shift.values - without.values
    for k in range(4):
        mine = with_shift.key_index == k
        d, marks = diff[mine], with_shift.shift[mine]
        steps = np.any(np.abs(np.diff(d, axis=0)) > 1e-9, axis=1)
        assert np.flatnonzero(steps).tolist() == np.flatnonzero(marks[1:]).tolist()
        first = np.flatnonzero(marks)[0] if marks.any() else len(d)
        assert np.allclose(d[:first], 0.0)
        assert np.all(np.abs(d[first:]) > 0)


def test_rejects_bad_arguments() -> None:
    for kw in ({"n_keys": 0}, {"width": 0}, {"anomaly_rate": 1.5}, {"step_seconds": 0}):
        with pytest.raises(ValueError):
            _stream(**kw)
    with pytest.raises(ValueError):
        _stream().batch(-1)
