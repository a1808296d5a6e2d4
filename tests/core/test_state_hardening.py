"""Issue 9: no input and no fault wipes other keys or poisons a key's row.

TTL is judged against a bounded watermark (never one event), rows that become
non-finite are reset and counted, and a full table evicts in bulk, not per batch.
"""

from __future__ import annotations

import numpy as np
import torch

from streamlstm.config import load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch
from streamlstm.metrics import Metrics
from streamlstm.state import RESET_CAUSES, KeyedState

NOW = 1_764_250_000.0  # the injected wall clock


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(clock: Clock | None = None, **kwargs: object) -> KeyedState:
    defaults = {"state_shape": (2, 2, 4), "width": 3, "initial_capacity": 2, "ttl_seconds": 100.0}
    return KeyedState(**{**defaults, **kwargs}, clock=clock or Clock())


def feed(store: KeyedState, keys: list[str], at: float, partition: int | None = None) -> None:
    """Assign ``keys`` at event time ``at``, recorded as their last event (as the engine does)."""
    ts = np.full(len(keys), at)
    parts = None if partition is None else np.full(len(keys), partition)
    slots = store.assign(keys, ts, parts)
    store.last_ts[torch.from_numpy(slots)] = torch.from_numpy(ts)


# -- TTL against a bounded watermark ---------------------------------------------------------


def test_far_future_event_does_not_evict_other_keys_and_ttl_keeps_running() -> None:
    clock = Clock()
    store = make(clock)
    feed(store, ["a", "b"], NOW - 10)
    feed(store, ["ms"], NOW * 1000)  # a timestamp in milliseconds
    assert sorted(store.keys()) == ["a", "b", "ms"]
    assert store.watermark() <= NOW
    # TTL still runs afterwards: in watermark terms, a and b go idle past the TTL.
    clock.now = NOW + 150
    feed(store, ["a"], NOW + 150)
    clock.now = NOW + 200
    feed(store, ["c"], NOW + 200)
    assert "b" not in store and "a" in store and "c" in store
    assert store.evictions["ttl"] == 1


def test_caught_up_partition_does_not_evict_a_lagging_partitions_keys() -> None:
    store = make()
    feed(store, ["lag-a", "lag-idle"], 1000.0, partition=1)
    feed(store, ["live"], 1000.0, partition=0)
    feed(store, ["lag-a"], 1050.0, partition=1)
    feed(store, ["live"], 5000.0, partition=0)  # partition 0 is caught up, 1 lags
    assert sorted(store.keys()) == ["lag-a", "lag-idle", "live"]
    assert store.watermark() == 1050.0
    feed(store, ["lag-a"], 1200.0, partition=1)  # lag-idle: idle 200 s > 100 in its own time
    assert sorted(store.keys()) == ["lag-a", "live"]
    assert store.evictions["ttl"] == 1


def test_dropped_partition_leaves_the_watermark() -> None:
    store = make()
    feed(store, ["old"], 1000.0, partition=0)
    feed(store, ["lag"], 1000.0, partition=1)
    feed(store, ["new"], 5000.0, partition=0)
    assert "old" in store  # partition 1 holds the watermark at 1000
    assert store.drop_partition(1) == ["lag"]
    feed(store, ["new"], 5001.0, partition=0)
    assert store.watermark() == 5001.0
    assert sorted(store.keys()) == ["new"]


def test_watermark_is_capped_by_the_wall_clock() -> None:
    clock = Clock(2000.0)
    store = make(clock)
    feed(store, ["a"], 1990.0)
    feed(store, ["b"], 1e12)
    assert store.watermark() == 2000.0
    assert "a" in store


def test_historic_replay_still_expires_keys_in_event_time() -> None:
    store = make()  # wall clock: now; the data: years ago, no partitions
    base = 1_000_000_000.0
    feed(store, ["a", "b"], base)
    feed(store, ["a"], base + 90)
    feed(store, ["a"], base + 150)
    assert sorted(store.keys()) == ["a"]
    assert store.evictions["ttl"] == 1


def test_idle_partition_does_not_hold_the_watermark_forever() -> None:
    clock = Clock(NOW)
    store = make(clock)
    feed(store, ["quiet"], NOW, partition=1)  # partition 1 never sends again
    feed(store, ["busy"], NOW, partition=0)
    clock.now = NOW + 500  # silent for 500 s of wall time: idle, left out of the watermark
    feed(store, ["busy"], NOW + 500, partition=0)
    assert sorted(store.keys()) == ["busy"]


def test_sweep_runs_every_percent_of_the_ttl_of_watermark_advance() -> None:
    store = make()
    feed(store, ["a"], 0.0)
    feed(store, ["b"], 100.0)  # swept at 100: a idle exactly the TTL, kept
    feed(store, ["b"], 100.9)  # a idle > TTL, but the watermark moved < 1 s since the sweep
    assert "a" in store
    feed(store, ["b"], 101.0)
    assert "a" not in store


def test_keys_of_the_batch_are_never_evicted_by_its_own_later_events() -> None:
    store = make()
    feed(store, ["a"], 0.0)
    feed(store, ["a", "b"], 500.0)  # a is continued by this batch
    assert sorted(store.keys()) == ["a", "b"]
    assert store.evictions["ttl"] == 0


# -- capacity: bulk eviction down to a low-water mark ------------------------------------------


def test_full_table_evicts_in_bulk_least_recently_used_first() -> None:
    store = make(max_keys=1000, ttl_seconds=1e9)
    names = [f"k{i:04d}" for i in range(1000)]
    for name in names:  # one key per batch: a strict LRU order
        feed(store, [name], 0.0)
    feed(store, names[:5], 0.0)  # the oldest five are now the most recent
    feed(store, ["new-0"], 0.0)
    evicted = store.evictions["capacity"]
    low_water = store.max_keys - store.capacity_headroom
    assert evicted == 1000 + 1 - low_water > 1
    survivors = set(store.keys())
    assert set(names[:5]) <= survivors and "new-0" in survivors
    # exactly the least recently used went: names[5 : 5 + evicted]
    assert not survivors & set(names[5 : 5 + evicted])
    assert set(names[5 + evicted :]) <= survivors
    # the headroom takes the next new keys without another eviction
    for i in range(1, store.capacity_headroom + 1):
        feed(store, [f"new-{i}"], 0.0)
    assert store.evictions["capacity"] == evicted
    assert len(store) == store.max_keys
    feed(store, ["one-more"], 0.0)
    assert store.evictions["capacity"] > evicted
    assert len(store) == low_water


def test_small_tables_evict_exactly_the_overflow() -> None:
    store = make(max_keys=3)
    for key in ("a", "b", "c", "d"):
        feed(store, [key], 0.0)
    assert sorted(store.keys()) == ["b", "c", "d"]
    assert store.evictions["capacity"] == 1


# -- non-finite rows are reset and counted -----------------------------------------------------


def engine() -> Engine:
    settings = load_settings(overrides={"model.input_size": "2", "model.hidden_size": "8"})
    return Engine.from_settings(settings, resume=False)


def run(values_of_a: list[float]) -> tuple[Engine, list]:
    """Keys a, b, c for len(values_of_a) batches; a's value at step i is values_of_a[i]."""
    eng = engine()
    rng = np.random.default_rng(1)
    outputs = []
    for i, va in enumerate(values_of_a):
        values = np.stack([[va, va], *rng.normal(size=(2, 2))]).astype(np.float32)
        batch = EventBatch.from_arrays(["a", "b", "c"], np.full(3, NOW - 1000 + i), values)
        outputs.append(eng.process(batch))
    return eng, outputs


def test_a_poisoned_row_is_reset_once_counted_and_other_keys_are_unaffected() -> None:
    normal = [float(np.sin(i)) for i in range(30)]
    poisoned = [*normal[:10], 1e20, *normal[11:]]
    clean_engine, clean = run(normal)
    bad_engine, bad = run(poisoned)
    assert bad_engine.store.resets == {"non_finite": 1}
    assert clean_engine.store.resets["non_finite"] == 0
    for i in range(11, 30):
        assert np.isfinite(bad[i].prediction[0]).all(), i
        if i > 11:
            assert np.isfinite(bad[i].error[0]), i
        for row in (1, 2):  # b and c
            np.testing.assert_allclose(bad[i].prediction[row], clean[i].prediction[row], atol=1e-6)
            np.testing.assert_allclose(bad[i].error[row], clean[i].error[row], atol=1e-6)
    assert torch.isfinite(bad_engine.store.table).all()
    assert bool(bad_engine.store.dirty[bad_engine.store.slot("a")])


def test_values_up_to_the_decoder_bound_keep_rows_finite() -> None:
    eng, outputs = run([1e15 if i % 2 else -1e15 for i in range(30)])
    assert eng.store.resets["non_finite"] == 0
    assert torch.isfinite(eng.store.table).all()
    for out in outputs[1:]:
        assert np.isfinite(out.prediction).all() and np.isfinite(out.error).all()


def test_resets_have_a_metric() -> None:
    text = Metrics().exposition().decode()
    assert "# TYPE streamlstm_state_resets_total counter" in text
    assert RESET_CAUSES == ("non_finite",)


def test_a_held_key_arriving_on_another_partition_is_counted() -> None:
    """Producers that do not key records by stream key split a key's state: counted."""
    store = KeyedState(state_shape=(1, 2, 4), width=1)
    store.assign(["a", "b"], np.zeros(2), np.array([0, 1]))
    store.assign(["a", "b", "c"], np.ones(3), np.array([0, 1, 2]))
    assert store.partition_moves == 0  # same partitions, and a new key is no move
    store.assign(["a"], np.full(1, 2.0), np.array([3]))
    assert store.partition_moves == 1


def test_one_batch_over_three_partitions_advances_each_to_its_own_latest_time() -> None:
    store = make()
    assert store.watermark() == -np.inf  # nothing seen yet
    keys = ["p0", "p1", "p2", "p2b"]
    ts = np.array([1000.0, 2000.0, 3000.0, 2500.0])
    slots = store.assign(keys, ts, np.array([0, 1, 2, 2]))
    store.last_ts[torch.from_numpy(slots)] = torch.from_numpy(ts)
    assert store.watermark() == 1000.0  # the slowest partition holds it
    store.drop_partition(0)
    assert store.watermark() == 2000.0


def test_a_partition_silent_for_over_one_percent_of_the_ttl_stops_holding_the_watermark() -> None:
    clock = Clock(NOW)
    store = make(clock)  # TTL 100 s: a partition is idle after 1 s of wall time
    feed(store, ["slow"], 1000.0, partition=0)
    feed(store, ["fast"], 5000.0, partition=1)
    clock.now = NOW + 0.5
    feed(store, ["fast"], 5001.0, partition=1)
    assert store.watermark() == 1000.0  # silent for 0.5 s: still holds it
    clock.now = NOW + 2.0
    feed(store, ["fast"], 5002.0, partition=1)
    assert store.watermark() == 5002.0  # silent for 2 s: idle
