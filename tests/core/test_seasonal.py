"""``engine.season_events``: a seasonal-naive forecaster beside the network, persistence
and the EWMA, in each key's row and its combination."""

from __future__ import annotations

import numpy as np
import pytest

from streamlstm.config import ConfigError, load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch

PERIOD = 24


def _engine(season: int | None, **overrides: object) -> Engine:
    settings = load_settings(
        overrides={
            "model.input_size": 2,
            "model.hidden_size": 8,
            "training.enabled": False,
            "engine.season_events": season,
            **overrides,
        }
    )
    return Engine.from_settings(settings, resume=False)


def _daily(days: int) -> np.ndarray:
    """Two keys' values, hour by hour: a sharp daily shape (a square wave and a ramp)
    that neither persistence nor an average follows, plus a little noise."""
    hours = np.arange(days * PERIOD)
    shape = np.stack([(hours % PERIOD < 8) * 10.0, (hours % PERIOD) * 1.0], axis=1)
    return shape + 0.05 * np.random.default_rng(0).normal(size=shape.shape)


def _replay(engine: Engine, values: np.ndarray) -> np.ndarray:
    """Squared errors of key "k"'s forecasts, event by event (NaN: none pending)."""
    errors = []
    for t, row in enumerate(values):
        batch = EventBatch.from_arrays(["k"], [float(t)], row[None, :].astype(np.float32))
        errors.append(engine.process(batch).squared_error[0])
    return np.asarray(errors)


def test_with_a_season_the_seasonal_forecaster_takes_the_lead() -> None:
    values = _daily(days=12)
    seasonal, plain = _engine(PERIOD), _engine(None)
    with_season, without = _replay(seasonal, values), _replay(plain, values)
    late = slice(4 * PERIOD, None)  # after its weights have learned
    assert np.nanmean(with_season[late]) < 0.1 * np.nanmean(without[late])
    shares = seasonal.leader_shares()
    assert shares["seasonal"] == 1.0 and set(shares) == {
        "network",
        "persistence",
        "ewma",
        "seasonal",
    }
    assert set(plain.leader_shares()) == {"network", "persistence", "ewma"}


def test_before_a_whole_period_it_forecasts_persistence() -> None:
    engine = _engine(PERIOD)
    values = _daily(days=2)
    _replay(engine, values[: PERIOD - 1])  # events 0 .. 22: no value a period back yet
    store = engine.store
    rows = store.table[[store.slot("k")]]
    np.testing.assert_array_equal(
        store.layout.field(rows, "seasonal").numpy(), store.layout.field(rows, "last").numpy()
    )
    _replay(engine, values[PERIOD - 1 : PERIOD])  # event 23: event 24's is event 0's
    rows = store.table[[store.slot("k")]]
    np.testing.assert_allclose(
        store.layout.field(rows, "seasonal").numpy()[0], values[0].astype(np.float32)
    )


def test_the_row_holds_the_period_and_its_own_fingerprint() -> None:
    plain, seasonal = _engine(None).store.layout, _engine(PERIOD).store.layout
    width = 2
    # the ring and its next slot, the seasonal forecast and its losses
    assert seasonal.width - plain.width == PERIOD * width + 1 + 2 * width
    assert seasonal.fingerprint != plain.fingerprint  # a changelog of the other is refused
    assert seasonal.experts == (*plain.experts, "seasonal")


def test_a_season_runs_the_plain_step() -> None:
    """The fused C step is built for three forecasters."""
    assert _engine(PERIOD, **{"engine.fused": True}).fused_step is None


@pytest.mark.parametrize("season", [0, 1, 10_001])
def test_a_season_outside_2_to_10000_events_is_refused(season: int) -> None:
    with pytest.raises(ConfigError, match=r"^engine\.season_events: "):
        load_settings(overrides={"engine.season_events": season})


def test_the_ring_keeps_turning_past_the_last_exact_float32_count() -> None:
    """A key's event count is a float32 and stops growing at 2**24 (194 days at one event
    a second); the seasonal forecast must still be the value one period back."""
    engine = _engine(PERIOD)
    values = _daily(days=3)
    _replay(engine, values[:PERIOD])
    store = engine.store
    store.layout.field(store.table, "count")[store.slot("k")] = 2.0**24
    _replay(engine, values[PERIOD : 2 * PERIOD + 5])
    rows = store.table[[store.slot("k")]]
    np.testing.assert_allclose(  # next: event 2 * PERIOD + 5, a period after PERIOD + 5
        store.layout.field(rows, "seasonal").numpy()[0], values[PERIOD + 5].astype(np.float32)
    )


@pytest.mark.parametrize("slot", [-3.0, 1e9, 1e30])
def test_a_ring_slot_out_of_range_in_a_restored_row_stays_in_the_ring(slot: float) -> None:
    """A finite but impossible slot (a changelog row from elsewhere) must not stop the
    batch: it lands in the ring, and a period later the forecast is one period back."""
    engine = _engine(PERIOD)
    values = _daily(days=3)
    _replay(engine, values[:PERIOD])
    store = engine.store
    store.layout.field(store.table, "season_at")[store.slot("k")] = slot
    _replay(engine, values[PERIOD : 2 * PERIOD + 1])
    rows = store.table[[store.slot("k")]]
    np.testing.assert_allclose(
        store.layout.field(rows, "seasonal").numpy()[0], values[PERIOD + 1].astype(np.float32)
    )
