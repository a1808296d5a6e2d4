"""The per-key combination follows whichever forecaster is better, as that changes."""

from __future__ import annotations

import numpy as np
import torch

from streamlstm import combine
from streamlstm.config import load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch


def test_weight_moves_to_the_better_forecaster_as_that_changes() -> None:
    loss = torch.zeros(1, len(combine.EXPERTS), 1)
    truth = torch.zeros(1, 1)
    good, bad = 0.0, 3.0
    leaders = []
    for phase in range(2):  # first the network is right, then the EWMA
        for _ in range(100):
            made = [bad, bad, bad]
            made[0 if phase == 0 else 2] = good
            forecasts = torch.tensor(made).view(1, 3, 1)
            combine.learn(loss, forecasts, truth, torch.ones(1, 1), torch.tensor([True]))
        weights = combine.weights(loss)[0]
        leaders.append(int(combine.leaders(loss)[0]))
        assert float(weights.max()) > 0.95  # a clear leader, not a blend
    assert [combine.EXPERTS[i] for i in leaders] == ["network", "ewma"]


def test_untouched_rows_keep_their_losses() -> None:
    loss = torch.ones(2, 3, 1)
    forecasts = torch.zeros(2, 3, 1)
    combine.learn(loss, forecasts, torch.ones(2, 1), torch.ones(2, 1), torch.tensor([True, False]))
    assert loss[1].flatten().tolist() == [1.0, 1.0, 1.0] and loss[0, 0, 0] > 1.0


def test_each_value_of_a_key_follows_its_own_best_forecaster() -> None:
    """Value 0: the network is right and persistence wrong; value 1 the other way round.
    One weight per key would have to blend both; per value, each takes its own leader."""
    loss = torch.zeros(1, len(combine.EXPERTS), 2)
    truth = torch.tensor([[1.0, 5.0]])
    forecasts = torch.tensor([[[1.0, 0.0], [0.0, 5.0], [0.5, 2.5]]])  # [B, K, F]
    for _ in range(50):
        combine.learn(loss, forecasts, truth, torch.ones(1, 2), torch.tensor([True]))
    weights = combine.weights(loss)[0]
    assert float(weights[0, 0]) > 0.99 and float(weights[1, 1]) > 0.99
    assert torch.allclose(weights.sum(0), torch.ones(2))
    assert torch.allclose(combine.mix(loss, forecasts), truth, atol=1e-3)


def test_the_leader_is_judged_over_all_of_a_keys_values() -> None:
    loss = torch.tensor([[[1.0, 9.0], [2.0, 2.0], [3.0, 3.0]]])  # network best on value 0 only
    assert combine.EXPERTS[int(combine.leaders(loss)[0])] == "persistence"


def test_a_useless_network_costs_a_key_little_against_persistence() -> None:
    """A random walk: persistence is the best forecast. A network whose correction is
    noise (untrained weights shaken) must not make the combined forecast much worse."""
    settings = load_settings(overrides={"model.input_size": "1", "model.hidden_size": "8"})
    engine = Engine.from_settings(settings)
    with torch.no_grad():
        for p in engine.model.parameters():
            p.add_(torch.randn_like(p) * 2.0)  # the head now emits large, wrong corrections
    engine.offer_weights(engine.model.state_dict(), 1)
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(size=600))[:, None]
    out = engine.process(EventBatch.from_arrays(["k"] * 600, np.arange(600.0), walk))
    combined = float(np.mean((out.prediction[:-1, 0] - walk[1:, 0]) ** 2))
    persistence = float(np.mean((walk[:-1, 0] - walk[1:, 0]) ** 2))
    assert combined < 1.25 * persistence
    assert engine.leader_shares()["network"] == 0.0
