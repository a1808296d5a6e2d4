"""Eviction promises of the keyed state, driven through the engine's public step.

One partition, event times far in the past of the wall clock, so the TTL is judged in
event time whether the store reads it per batch or as a watermark over partitions.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from streamlstm.config import load_settings
from streamlstm.engine import BatchOutput, Engine
from streamlstm.events import EventBatch
from streamlstm.state import KeyedState

T0 = 1_000_000.0  # 1970: long before the wall clock
TTL = 100.0


def _engine() -> Engine:
    return Engine.from_settings(
        load_settings(
            overrides={
                "model.input_size": "1",
                "model.hidden_size": "4",
                "model.num_layers": "1",
                "training.enabled": "false",
                "drift.enabled": "false",
                "state.ttl_seconds": str(TTL),
            }
        )
    )


def _send(engine: Engine, events: list[tuple[str, float]]) -> BatchOutput:
    keys = [k for k, _ in events]
    ts = np.array([T0 + t for _, t in events])
    values = np.arange(1.0, len(events) + 1.0).reshape(-1, 1)
    return engine.process(
        EventBatch.from_arrays(keys, ts, values), partition=np.zeros(len(events), np.int32)
    )


def test_ttl_is_judged_at_the_batch_earliest_event_so_a_continued_key_survives() -> None:
    """A batch spanning more than the TTL keeps a key it continues (no state reset)."""
    engine = _engine()
    _send(engine, [("a", 0.0)])
    # a is idle 50 s at its own event, but 200 s at the batch's last event.
    out = _send(engine, [("a", 50.0), ("b", 200.0)])
    assert not np.isnan(out.error[0]), "a's pending prediction was lost: its row was evicted"
    assert engine.store.evictions["ttl"] == 0
    assert float(engine.store.read("a", "count")) == 2.0


def test_an_expired_key_is_gone_within_one_percent_of_the_ttl() -> None:
    """Keys are swept whenever event time advanced by 1% of the TTL, not once per TTL:
    a key idle just over the TTL is gone one sweep later, not up to a TTL later."""
    engine = _engine()
    _send(engine, [("idle", 0.0)])
    step = 0.25  # a busy key keeps event time moving in small steps
    gone_at = None
    for t in np.arange(step, 1.5 * TTL, step):
        _send(engine, [("busy", float(t))])
        if t <= TTL:
            assert "idle" in engine.store, f"evicted at {t}, before its TTL"
        elif "idle" not in engine.store:
            gone_at = float(t)
            break
    assert gone_at is not None, "an expired key outlived the TTL by half a TTL"
    assert gone_at <= TTL + 0.01 * TTL + step
    assert engine.store.evictions["ttl"] == 1 and "busy" in engine.store


def _store(**kwargs: object) -> KeyedState:
    return KeyedState(**{"state_shape": (1, 2, 2), "width": 2, **kwargs})


def test_capacity_eviction_skips_free_slots_and_keys_of_the_batch() -> None:
    store = _store(max_keys=3)
    store.assign(["a"], np.zeros(1))
    store.assign(["b"], np.zeros(1))  # one slot still free
    store.assign(["c", "d"], np.zeros(2))  # one over: the least recently used goes
    assert sorted(store.keys()) == ["b", "c", "d"] and store.evictions["capacity"] == 1
    with pytest.raises(ValueError, match="max_keys"):
        store.assign(["w", "x", "y", "z"], np.zeros(4))


def test_read_returns_one_field_of_the_keys_own_row() -> None:
    store = _store()
    slots = store.assign(["a", "b"], np.zeros(2))
    store.table[int(slots[0]), store.layout.columns["mean"]] = torch.tensor([1.0, 2.0])
    assert store.read("a", "mean").tolist() == [1.0, 2.0]
    assert store.read("b", "mean").tolist() == [0.0, 0.0]


def test_restore_keeps_event_time_touches_only_its_keys_and_is_clean() -> None:
    source = _store(ttl_seconds=50.0)
    slots = torch.from_numpy(source.assign(["a"], np.zeros(1), np.zeros(1)))
    source.table[slots] = 5.0
    source.last_ts[slots] = 1234.5
    snap = source.snapshot(slots)

    target = _store(ttl_seconds=50.0)
    other = int(target.assign(["other"], np.zeros(1), np.ones(1))[0])
    target.table[other] = 7.0
    target.dirty[other] = False
    assert target.restore([], partition=0) == 0
    assert target.restore(snap, partition=0) == 1
    slot = target.slot("a")
    assert float(target.last_ts[slot]) == 1234.5
    assert torch.all(target.table[slot] == 5.0) and torch.all(target.table[other] == 7.0)
    assert target.take_dirty().numel() == 0  # restored rows are what the changelog holds
    # The restored event time still counts for the TTL (both partitions move past it).
    target.assign(["other", "b"], np.full(2, 1234.5 + 60.0), np.array([1, 0]))
    assert "a" not in target


def test_take_dirty_of_a_partition_returns_only_its_dirty_keys() -> None:
    store = _store()
    slots = store.assign(["a", "b", "c"], np.zeros(3), np.array([0, 0, 1]))
    store.dirty[int(slots[0])] = True
    store.dirty[int(slots[2])] = True
    assert store.take_dirty(partition=0).tolist() == [int(slots[0])]
    assert store.take_dirty().tolist() == [int(slots[2])]


def test_memory_per_key_counts_the_key_string_and_the_index() -> None:
    store = _store()
    assert store.bytes_per_key() == store.bytes_per_row  # no keys yet
    keys = [f"{'k' * 200}-{i}" for i in range(10)]
    store.assign(keys, np.zeros(len(keys)))
    assert store.bytes_per_key() >= store.bytes_per_row + sys.getsizeof(keys[0]) + 8


def test_the_table_grows_geometrically() -> None:
    store = _store(initial_capacity=2)
    store.assign(["a", "b", "c"], np.zeros(3))
    assert store.capacity == 4  # doubled, not just enough: growth stays amortised
    store.assign([f"k{i}" for i in range(7)], np.zeros(7))
    assert store.capacity == 10  # at least what the batch needs


def test_a_new_key_reflects_no_offset_and_no_partition_yet() -> None:
    store = _store(max_keys=1)
    slot = int(store.assign(["a"], np.zeros(1))[0])
    store.offset[slot] = 41
    store.assign(["b"], np.zeros(1))  # a is evicted; b reuses its slot
    assert int(store.offset[slot]) == -1 and int(store.partition[slot]) == -1


def test_a_poisoned_row_is_found_and_reset_without_the_caller_passing_rows() -> None:
    engine = _engine()
    engine.process(EventBatch.from_arrays(["a", "b"], [T0, T0], np.ones((2, 1))))
    store = engine.store
    a, b = store.slot("a"), store.slot("b")
    store.table[a, 0] = float("nan")
    healthy = store.table[b].clone()
    assert store.reset_non_finite(torch.tensor([a, b])) == 1
    assert torch.all(store.table[a] == 0) and torch.equal(store.table[b], healthy)
    assert store.resets["non_finite"] == 1
