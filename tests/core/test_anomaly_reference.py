"""The engine's forecast mix and anomaly score against a plain numpy reference.

The reference re-derives every number from the documented rules, for one key, in
float64: the scaler's std *before* each event, each forecaster's discounted loss, the
mixture, the error averages (the fastest capped by the value's distance from its
mean), each average's own long variance and the long mean updated *after* scoring (an
event is judged against the past only), fresh evidence beyond the decaying peak (at
most what an event could show now), held back when its incident starts on the key's
rhythm or was already reported. An untrained network forecasts persistence exactly (its
head starts at zero), so the reference needs no network.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_ndtr

from streamlstm import anomaly, combine
from streamlstm.config import load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch


def reference(values: np.ndarray, window: int, clip: float, short: float, long: float, least: int):
    width = values.shape[1]
    mean, var, count = np.zeros(width), np.zeros(width), 0
    last, ewma, net = np.zeros(width), np.zeros(width), np.zeros(width)
    loss, pending = np.zeros((3, width)), np.zeros(width)  # losses per forecaster and value
    alphas = short * np.array(anomaly.SCALES)
    avg, m, v, n, peak = np.zeros(3), 0.0, np.zeros(3), 0, 0.0
    since, gap, span = 0.0, 0.0, 1 / (short * anomaly.SCALES[-1])  # the incidents' rhythm
    seen, followed, again, run = 0.0, 0.0, 0.0, 0.0  # exact repeats of the last values
    tests = math.log10(len(anomaly.SCALES) + 2)  # error scales, value, repeat
    predictions, scores = [], []
    for x in values:
        score = math.nan
        if count > 0:
            std = np.sqrt(var + 1e-14 * mean * mean + 1e-30)
            e = float(np.minimum(np.abs(x - pending) / std, clip).mean())
            made = np.stack([net, last, ewma])
            step = np.minimum(((made - x) / std) ** 2, combine.LOSS_CLIP)
            loss = combine.DISCOUNT * loss + step
            value_z = float((np.abs(x - mean) / std).max())
            # the fastest scale sees the error only as far as the value is from its mean,
            # the middle one at least as far as the value is (up to the clip)
            inputs = np.array([min(e, value_z), max(e, min(value_z, clip)), e])
            avg = inputs if n == 0 else avg + alphas * (inputs - avg)
            spread = np.sqrt(v + 1e-4)  # each average's own spread
            by_scale = float((-log_ndtr(-(avg - m) / spread) / math.log(10)).max())
            by_value = math.log10(1 + value_z**2)
            # a repeat of the last values: P(repeat) over the long window, then for each
            # further one in the run P(repeat | repeat), one pseudo-event each way
            # a run of exact repeats of the last values: its probability step by step,
            # P(repeat) for the first, P(repeat | repeat) for each further one, by the
            # counts so far (one pseudo-event each way); run: its decades so far
            repeat, after = bool((x == last).all()), run > 0  # after: the last one was
            p = (again + 1) / (followed + 2) if after else (seen + 1) / (min(n, 1 / long) + 2)
            run = run - math.log10(p) if repeat else 0.0
            by_value = max(by_value, run)
            keep = 1 - long if n + 1 > 1 / long else 1.0
            seen, followed = seen * keep + repeat, followed * keep + after
            again = again * keep + (after and repeat)
            d = max(max(by_scale, by_value) - tests, 0.0) if n >= least else 0.0
            # never more than an event could show now: an error at the clip, a value
            # MAX_VALUE_Z stds out
            worst = float((-log_ndtr(-(clip - m) / spread) / math.log(10)).max())
            reach = max(worst, math.log10(1 + anomaly.MAX_VALUE_Z**2)) - tests
            decayed = min(peak * (1 - long), reach)
            fresh, peak = max(d - decayed, 0.0), max(decayed, d)
            nxt, counting = since + 1, n >= least
            start = fresh > math.log10(1 / long) and nxt >= span and counting
            on_time = start and fresh <= decayed and gap != 0 and abs(nxt - abs(gap)) <= span
            within = fresh > 0 and nxt < span and gap != 0  # an incident already started
            if on_time or (within and (gap < 0 or fresh <= decayed)):
                fresh = 0.0  # routine (on the key's rhythm), or the same incident growing
            if start:
                gap, since = (-nxt if on_time else nxt), 0.0
            elif counting:
                since = nxt
            score = fresh / (fresh + anomaly.SCALE)
            a = max(1 / (n + 1), long)  # the long statistics learn the error after scoring
            m = m + a * (e - m)
            v, n = (1 - a) * v + a * (avg - m) ** 2, n + 1
        ewma = x.copy() if count == 0 else ewma + combine.EWMA_ALPHA * (x - ewma)
        last = x.copy()
        count += 1  # noqa: SIM113 (the scaler count, as in the engine)
        a = 1 / min(count, window)
        delta = x - mean
        mean, var = mean + a * delta, (1 - a) * (var + a * delta * delta)
        net = x.copy()
        best = loss.min(0)  # each value's best forecaster
        w = np.exp(-combine.ETA * (loss - best) / (best + combine.LOSS_FLOOR))
        pending = (w / w.sum(0) * np.stack([net, x, ewma])).sum(0)
        predictions.append(pending)
        scores.append(score)
    return np.array(predictions), np.array(scores)


def test_forecast_mix_and_anomaly_score_match_the_numpy_reference() -> None:
    """Two keys whose first events fall in the same batches as the other's later ones (the
    engine scores both in one batched step)."""
    settings = load_settings(overrides={"model.input_size": "2", "model.hidden_size": "8"})
    rng = np.random.default_rng(3)
    series = {
        "a": np.cumsum(rng.normal(size=(400, 2)), axis=0) + 50.0,
        "b": np.cumsum(rng.normal(size=(250, 2)), axis=0) * 10.0 - 7.0,
    }
    series["a"][300] += 25.0  # a spike
    series["a"][340:] += 12.0  # a level shift
    series["b"][180:200] = series["b"][179]  # stuck for 20 events: a run of exact repeats
    order = [("a", t) for t in range(150)]
    for t in range(150, 400):
        order += [("a", t), ("b", t - 150)]
    keys = [k for k, _ in order]
    values = np.array([series[k][t] for k, t in order])
    engine = Engine.from_settings(settings)
    outs = [  # batches of 37: b's first scored events share steps with a's later ones
        engine.process(
            EventBatch.from_arrays(
                keys[i : i + 37], np.zeros(37)[: len(keys[i : i + 37])], values[i : i + 37]
            )
        )
        for i in range(0, len(keys), 37)
    ]
    prediction = np.concatenate([o.prediction for o in outs])
    anomaly_score = np.concatenate([o.anomaly_score for o in outs])
    s, e = settings.state, settings.engine
    for key, v in series.items():
        mine = np.array([k == key for k in keys])
        pred, score = reference(
            v,
            s.scaler_window,
            e.input_clip,
            s.anomaly_short_alpha,
            s.anomaly_long_alpha,
            s.anomaly_min_events,
        )
        np.testing.assert_allclose(prediction[mine], pred, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(anomaly_score[mine], score, atol=1e-5, equal_nan=True)
    assert reference(series["a"], 10_000, 10.0, 0.5, 0.01, 20)[1][300] > 0.5  # the spike
    stuck = anomaly_score[np.array([k == "b" for k in keys])][180:200]
    assert stuck[0] > 0.1 and stuck.max() == stuck[0]  # one alarm, where the feed stuck
