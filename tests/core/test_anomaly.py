"""Anomaly scores are in [0, 1], calibrated per key, and the same for keys of any scale."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from streamlstm import anomaly
from streamlstm.config import load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch


def test_scores_do_not_depend_on_a_keys_scale_and_flag_a_spike() -> None:
    settings = load_settings(overrides={"model.input_size": "2", "model.hidden_size": "8"})
    engine = Engine.from_settings(settings)
    rng = np.random.default_rng(0)
    base = np.sin(np.arange(300)[:, None] / 5 + np.array([0.0, 1.0])) + rng.normal(0, 0.1, (300, 2))
    base[250] += 8.0  # one spike, same place in both keys
    scales = {"millivolts": 1e-3, "kilopascal": 1e3}
    scores: dict[str, list[float]] = {k: [] for k in scales}
    for t in range(300):
        keys = list(scales)
        values = np.stack([base[t] * s + 5 * s for s in scales.values()])
        out = engine.process(EventBatch.from_arrays(keys, [t, t], values))
        for k, score in zip(keys, out.anomaly_score.tolist(), strict=True):
            scores[k].append(score)
    small, large = np.array(scores["millivolts"]), np.array(scores["kilopascal"])
    known = ~np.isnan(small)
    assert np.all((small[known] >= 0) & (small[known] < 1))
    np.testing.assert_allclose(small[known], large[known], atol=1e-3)
    assert small[250] > 0.5 and small[250] > small[100:240].max()
    assert np.median(small[100:240]) < 0.1


def _update(stats: anomaly.AnomalyStats, error: float, long_alpha: float = 0.01) -> float:
    """One key's error, its value as far from the key's mean as the forecast missed by (a
    key forecast by its mean)."""
    e = torch.tensor([error])
    return float(anomaly.update(stats, e, e, 0.5, long_alpha, 20))


def _stats_after(errors: list[float]) -> anomaly.AnomalyStats:
    stats = anomaly.AnomalyStats.zeros(1)
    for e in errors:
        _update(stats, e)
    return stats


def test_no_ties_at_the_top_of_the_score() -> None:
    """Stronger evidence always scores higher: the float32 normal CDF used to tie at 1.0."""
    rng = np.random.default_rng(0)
    ordinary = list(np.abs(rng.normal(size=200)))
    scores = []
    for spike in (8.0, 20.0, 50.0, 200.0, 1000.0):
        stats = _stats_after(ordinary)
        scores.append(_update(stats, spike))
    assert all(b > a for a, b in itertools.pairwise(scores)), scores
    assert scores[-1] < 1.0


def test_one_alarm_per_incident() -> None:
    """A sustained incident alarms once, at its start; a later, stronger one alarms again."""
    rng = np.random.default_rng(1)
    errors = list(np.abs(rng.normal(size=300)))
    errors[200:230] = [6.0] * 30  # one incident lasting 30 events
    errors[230:260] = list(np.abs(rng.normal(size=30)))
    errors[260] = 60.0  # a second, much stronger one soon after
    stats = anomaly.AnomalyStats.zeros(1)
    scores = np.array([_update(stats, e) for e in errors])
    alarms = np.flatnonzero(scores[100:] >= 0.5) + 100  # after the long window settled
    assert alarms[0] == 200 and set(alarms) <= {200, 201, 202, 260}, alarms
    assert 260 in alarms


def test_a_value_far_outside_the_keys_range_is_evidence() -> None:
    stats = _stats_after([1.0] * 100)
    calm = anomaly.update(stats, torch.tensor([1.0]), torch.tensor([1.0]), 0.5, 0.01, 20)
    stats = _stats_after([1.0] * 100)
    novel = anomaly.update(stats, torch.tensor([1.0]), torch.tensor([1e4]), 0.5, 0.01, 20)
    assert float(calm) < 0.1 and float(novel) > 0.5


def test_a_burst_of_far_values_the_forecast_follows_is_one_incident() -> None:
    """Values far out for a few events in a row are evidence even where the forecast
    follows them (small errors); the burst alarms at its start, not at every event."""
    rng = np.random.default_rng(2)
    stats = anomaly.AnomalyStats.zeros(1)
    for e in np.abs(rng.normal(size=300)):  # a noisy key: errors and values alike
        anomaly.update(stats, torch.tensor([e]), torch.tensor([e]), 0.5, 0.001, 20)
    usual = anomaly.AnomalyStats(*(t.clone() for t in vars(stats).values()))

    def run(s: anomaly.AnomalyStats, value_z: float) -> list[float]:
        e, z = torch.tensor([0.5]), torch.tensor([value_z])
        return [float(anomaly.update(s, e, z, 0.5, 0.001, 20)) for _ in range(8)]

    burst, ordinary = run(stats, 6.0), run(usual, 0.8)
    level = float(anomaly.evidence_to_score(torch.tensor(anomaly.start_level(0.001))))
    assert max(burst) > level and max(ordinary) == 0.0, (burst, ordinary)
    assert max(burst[3:]) == 0.0, burst  # reported at its start (as it builds up), once


def test_an_absurd_value_scores_high_and_leaves_the_statistics_finite() -> None:
    stats = _stats_after([1.0] * 100)
    # max_error: the engine's clip (input_clip), which bounds what the averages can see
    score = anomaly.update(stats, torch.tensor([1.0]), torch.tensor([1e30]), 0.5, 0.01, 20, 10.0)
    assert 0.5 < float(score) < 1.0
    assert all(bool(torch.isfinite(t).all()) for t in vars(stats).values())


def test_a_keys_score_does_not_depend_on_a_new_key_sharing_its_batch() -> None:
    """A batch with a key's first error takes another path; the other keys must not notice."""
    rng = np.random.default_rng(3)
    history = list(np.abs(rng.normal(size=40)))
    alone = _stats_after(history)
    score_alone = anomaly.update(alone, torch.tensor([5.0]), torch.tensor([5.0]), 0.5, 0.01, 20)
    old = _stats_after(history)
    shared = anomaly.AnomalyStats.zeros(2)
    for name, column in vars(old).items():
        getattr(shared, name)[0] = column[0]
    errors = torch.tensor([5.0, 1.0])
    scores = anomaly.update(shared, errors, errors, 0.5, 0.01, 20)
    assert float(scores[0]) == float(score_alone[0])
    torch.testing.assert_close(shared.short[0], alone.short[0])
    assert shared.short[1].tolist() == [1.0] * shared.short.shape[1]  # starts at its error


def test_slow_scales_are_calibrated_on_autocorrelated_errors() -> None:
    """Errors that wander slowly (a forecast lagging a drifting level errs many events in a
    row) are the key's usual behaviour: each average is judged against its own spread, so
    the slow scales stay quiet (the iid spread ``var * a / (2 - a)`` scores 7 of these
    events above 0.3). A jump still alarms."""
    rng = np.random.default_rng(2)
    wander, errors = 0.0, []
    for _ in range(4000):
        wander = 0.98 * wander + rng.normal(0.0, 0.2)
        errors.append(abs(wander))
    errors[3500] = 30.0
    stats = anomaly.AnomalyStats.zeros(1)
    scores = np.array([_update(stats, e, 0.001) for e in errors])
    assert (scores[1000:3500] >= 0.3).sum() == 0
    assert scores[3500] >= 0.5


def test_a_value_returning_to_normal_after_a_spike_is_not_a_second_alarm() -> None:
    """A spike, then the value back at its usual level: the forecast followed the spike, so
    the return errs as much as the spike did, but only the spike is an incident (at the
    default threshold, 0.5). Had the value stayed out, the excursion would go on: that
    event alarms again, as every event did before the fastest scale was capped."""
    rng = np.random.default_rng(4)
    history = list(np.abs(rng.normal(size=1500)))

    def after_spike(next_value_z: float) -> tuple[float, float]:
        stats = anomaly.AnomalyStats.zeros(1)
        for e in history:
            _update(stats, e, 0.001)
        spike = _update(stats, 8.0, 0.001)
        e = torch.tensor([8.0])  # the forecast that followed the spike misses by as much
        again = anomaly.update(stats, e, torch.tensor([next_value_z]), 0.5, 0.001, 20)
        return spike, float(again)

    spike, back = after_spike(0.3)
    assert spike >= 0.5 and back < 0.5
    _, still_out = after_spike(8.0)
    assert still_out >= 0.5


def _spikes(at: list[int], n: int = 6000) -> np.ndarray:
    """Scores of a calm key (default long window) whose value is a million stds out at
    ``at`` (value evidence: 11.4 decades each time, unlike error evidence, which the key's
    statistics learn) with errors of 1, at the clip (``max_error`` 1: the middle average
    sees no more of the value than an error, so only the value test shows the spikes)."""
    stats = anomaly.AnomalyStats.zeros(1)
    one, scores = torch.tensor([1.0]), []
    for t in range(n):
        z = torch.tensor([1e6 if t in at else 1.0])
        scores.append(float(anomaly.update(stats, one, z, 0.5, 0.001, 20, 1.0)))
    return np.array(scores)


def test_a_spike_on_the_keys_rhythm_is_routine() -> None:
    """A job's spike every 600 events (a little under the peak's half-life): the first two
    set the rhythm and alarm; the later ones come on time and do not (with only the
    decaying peak to hold them back, each one scored 0.51)."""
    routine = list(range(1000, 6000, 600))
    scores = _spikes(routine)
    assert scores[routine[0]] >= 0.5 and scores[routine[1]] >= 0.5
    assert scores[routine[2] :].max() < 0.5, scores[routine].round(2)


def test_a_spike_off_the_keys_rhythm_still_alarms() -> None:
    """The same spikes, and one more half-way between two: that one is not held back (it
    scores what the decaying peak alone leaves, 0.37), and the rhythm holds after it."""
    routine = list(range(1000, 6000, 600))
    off = routine[3] + 300
    scores = _spikes(sorted([*routine, off]))
    assert scores[off] > 0.35
    assert scores[routine[2]] < 0.5 and scores[routine[3]] < 0.5


def test_a_much_stronger_spike_on_the_keys_rhythm_still_alarms() -> None:
    """On time, but a million stds out where the routine spikes are a thousand (5.4 decades
    of value evidence each): far more than twice the decayed peak, news rather than
    routine. Errors are 1, at the clip (as in ``_spikes``)."""
    routine = list(range(1000, 6000, 600))
    stats = anomaly.AnomalyStats.zeros(1)
    scores = []
    for t in range(6000):
        z = torch.tensor([(1e6 if t == routine[4] else 1e3) if t in routine else 1.0])
        scores.append(float(anomaly.update(stats, torch.tensor([1.0]), z, 0.5, 0.001, 20, 1.0)))
    assert scores[routine[4]] >= 0.5 and scores[routine[3]] < 0.5


def _burst(extra: dict[int, float]) -> np.ndarray:
    """A calm key (long window 1,000 events) whose errors build up over five events."""
    rng = np.random.default_rng(1)
    errors = list(np.abs(rng.normal(size=700)))
    errors[600:605] = [4.0, 6.0, 8.0, 10.0, 12.0]
    for t, e in extra.items():
        errors[t] = e
    stats = anomaly.AnomalyStats.zeros(1)
    scores = []
    for e in errors:
        t = torch.tensor([e])
        scores.append(float(anomaly.update(stats, t, t, 0.5, 0.001, 20)))
    return np.array(scores)


def test_a_burst_building_up_over_a_few_events_alarms_once() -> None:
    """Each step of the burst exceeds the last one's evidence (fresh evidence beyond the
    peak every time: four alarms before); within the incident's span it is one incident."""
    scores = _burst({})
    assert scores[100:600].max() < 0.5
    assert np.flatnonzero(scores[600:700] >= 0.5).tolist() == [1]


def test_a_much_stronger_error_within_an_incident_still_alarms() -> None:
    """Inside the burst's span, an error of 40 stds: more than twice the decayed peak."""
    scores = _burst({607: 40.0})
    assert np.flatnonzero(scores[600:700] >= 0.5).tolist() == [1, 7]


def test_an_incident_starts_at_evidence_rarer_than_once_per_long_window() -> None:
    assert anomaly.start_level(0.001) == 3.0 and anomaly.start_level(0.01) == 2.0
    # A mature key long after its last start: 2.9 fresh decades start nothing (they are
    # reported, and the key keeps counting), 3.1 start an incident.
    stats = anomaly.AnomalyStats.zeros(2)
    stats.count.fill_(100.0)
    stats.since.fill_(500.0)
    fresh = torch.tensor([2.9, 3.1])
    held = anomaly._incidents(stats, fresh, torch.zeros(2), 0.5, 0.001, 20)
    assert held.tolist() == fresh.tolist()
    assert stats.since.tolist() == [501.0, 0.0] and stats.gap.tolist() == [0.0, 501.0]


def _flat_then_bursty(max_error: float) -> np.ndarray:
    """A key whose errors are 0 for 500 events, then spikes of 10 stds (the engine's clip)
    every 7 events until 1,000, then calm, then a burst at 2,500 (long window 1,000)."""
    spikes = {t: 10.0 for t in [*range(500, 1000, 7), *range(2500, 2506)]}
    stats = anomaly.AnomalyStats.zeros(1)
    scores = []
    for t in range(2600):
        e, z = torch.tensor([spikes.get(t, 0.0)]), torch.tensor([1e4 if t in spikes else 0.1])
        scores.append(float(anomaly.update(stats, e, z, 0.5, 0.001, 20, max_error)))
    return np.array(scores)


def test_a_flat_keys_first_spike_does_not_hold_back_its_incidents_for_long() -> None:
    """The first spike, against a spread at the floor, is ~54,000 decades; once the
    baseline has learned the key's spikes no event could show a tenth of that, so the peak
    is capped there and the burst at 2,500 alarms. Uncapped, the peak would take ~10,000
    events to decay below it."""
    capped, uncapped = _flat_then_bursty(10.0), _flat_then_bursty(math.inf)
    assert capped[500] > 0.99 and capped[501:2500].max() < 0.5
    assert capped[2500:2510].max() >= 0.5
    assert uncapped[2500:2510].max() == 0.0
