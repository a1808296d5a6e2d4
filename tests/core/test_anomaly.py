"""Anomaly scores are in [0, 1], calibrated per key, and the same for keys of any scale."""

from __future__ import annotations

import numpy as np

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
