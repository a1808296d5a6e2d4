"""Keyed state store: slots, growth, eviction by TTL and capacity, partitions."""

from __future__ import annotations

import tracemalloc

import numpy as np
import torch

from streamlstm.state import KeyedState


def make(**kwargs: object) -> KeyedState:
    defaults = {"state_shape": (2, 2, 4), "width": 3, "initial_capacity": 2}
    return KeyedState(**{**defaults, **kwargs})


def ts(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def test_same_key_same_slot_and_growth_keeps_rows() -> None:
    store = make()
    slots = store.assign(["a", "b", "a"], ts(0, 0, 0))
    assert slots[0] == slots[2] != slots[1]
    store.table[slots[0]] = 7.0
    store.assign([f"k{i}" for i in range(50)], ts(*[0.0] * 50))
    assert store.capacity >= 52
    assert torch.all(store.table[store.slot("a")] == 7.0)
    assert len(store) == 52


def test_a_table_grown_by_the_engine_can_still_be_written_outside_it() -> None:
    """The engine assigns keys inside torch.inference_mode(); the changelog then clears
    dirty marks and a restore loads rows outside it. A table grown there must allow both
    (it crashed the daemon once its keys outgrew the first allocation)."""
    store = make()
    with torch.inference_mode():
        store.assign([f"k{i}" for i in range(50)], ts(*[0.0] * 50))
    assert store.capacity >= 50
    slot = store.slot("k7")
    store.dirty[slot] = True
    assert store.take_dirty().tolist() == [slot]
    assert store.load(["z"], np.zeros((1, store.layout.width)), [0.0], [3], partition=0) == 1


def test_ttl_evicts_idle_keys_in_event_time() -> None:
    evicted: list[tuple[list[str], str]] = []
    store = make(ttl_seconds=100.0, on_evict=lambda keys, cause: evicted.append((keys, cause)))
    slots = store.assign(["old", "busy"], ts(0, 0))
    store.last_ts[torch.from_numpy(slots)] = torch.tensor([0.0, 0.0], dtype=torch.float64)
    busy = store.assign(["busy"], ts(90))
    store.last_ts[torch.from_numpy(busy)] = 90.0
    assert "old" in store  # idle 90 s < 100 s
    store.assign(["busy"], ts(150))
    assert "old" not in store and "busy" in store
    assert evicted == [(["old"], "ttl")]
    assert store.evictions["ttl"] == 1


def test_capacity_evicts_least_recently_used_first() -> None:
    store = make(max_keys=3)
    for key in ("a", "b", "c"):
        store.assign([key], ts(0))
    store.assign(["a"], ts(0))  # b is now the least recently used
    store.assign(["d"], ts(0))
    assert sorted(store.keys()) == ["a", "c", "d"]
    store.assign(["e", "a"], ts(0, 0))  # c goes; a is in this batch and stays
    assert sorted(store.keys()) == ["a", "d", "e"]
    assert store.evictions["capacity"] == 2


def test_new_key_starts_from_a_clean_row() -> None:
    store = make(max_keys=1)
    slot = store.assign(["a"], ts(0))[0]
    store.table[slot] = 3.0
    store.assign(["b"], ts(0))  # evicts a, reuses its slot
    assert store.slot("b") == slot
    assert torch.all(store.table[slot] == 0.0)


def test_partition_snapshot_drop_restore_round_trip() -> None:
    store = make()
    slots = store.assign(["a", "b", "c"], ts(0, 0, 0), partition=np.array([0, 1, 0]))
    store.table[torch.from_numpy(slots)] = torch.arange(3.0).unsqueeze(1)
    store.offset[torch.from_numpy(slots)] = torch.tensor([10, 11, 12])
    snap = store.snapshot(store.slots_of_partition(0))
    assert sorted(k for k, _ in snap) == ["a", "c"]
    assert sorted(store.drop_partition(0)) == ["a", "c"]
    assert store.keys() == ["b"]

    other = make()
    assert other.restore(snap, partition=0) == 2
    assert float(other.table[other.slot("c"), 0]) == 2.0
    assert int(other.offset[other.slot("a")]) == 10
    assert sorted(other.keys()) == ["a", "c"]
    assert other.slots_of_partition(0).numel() == 2


def test_dirty_tracking_per_partition() -> None:
    store = make()
    slots = store.assign(["a", "b"], ts(0, 0), partition=np.array([0, 1]))
    store.dirty[torch.from_numpy(slots)] = True
    assert store.take_dirty(partition=1).tolist() == [store.slot("b")]
    assert store.take_dirty().tolist() == [store.slot("a")]
    assert store.take_dirty().numel() == 0


def test_memory_per_key_is_within_1_3x_the_raw_state() -> None:
    """Issue 12: a key costs at most 1.3x its raw float32 recurrent state, all counted."""
    store = KeyedState(state_shape=(2, 2, 64), width=8, initial_capacity=1000)
    store.assign([f"sensor-{i:06d}" for i in range(1000)], np.zeros(1000))
    raw = 2 * 2 * 64 * 4  # h and c of two layers, float32
    # The state in float16 (512 bytes); 7 per-value fields, the combination's losses (3 per
    # value) and anomaly and drift statistics (336 bytes); time, offset, partition, LRU tick.
    assert store.bytes_per_row < raw
    assert store.bytes_per_key() <= 1.3 * raw  # plus the key and its slot in the index
    wide = KeyedState(state_shape=(2, 2, 64), width=8, recurrent_dtype="float32")
    assert wide.bytes_per_row - store.bytes_per_row == raw // 2


def test_memory_per_key_counts_what_python_allocates_for_the_index() -> None:
    """The index's share of :meth:`bytes_per_key` (dict, key strings, slot numbers, slot
    lists) against what ``tracemalloc`` sees allocated for it (the table is torch's)."""
    n = 20_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = KeyedState(state_shape=(1, 2, 2), width=1, initial_capacity=n, max_keys=n)
        store.assign([f"sensor-{i:06d}" for i in range(n)], np.zeros(n))
        allocated = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    counted = store.bytes_per_key() - store.bytes_per_row
    assert 0.9 * allocated <= counted <= 1.1 * allocated
