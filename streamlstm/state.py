"""Keyed state store: every stream key owns one row of a preallocated table.

A key's row holds its recurrent state (float16 by default: ``streamlstm.rows``), online
normalisation statistics, pending prediction (scored when the key's next event arrives)
and anomaly statistics in contiguous float32 columns, so a batch of keys is gathered with
one ``index_select`` and written back with one ``index_copy_``, one place in memory per
key. Beside the table: the last event time (float64), the offset the state reflects, the
source partition, and bookkeeping for eviction and persistence.

The table grows geometrically. Keys idle longer than ``ttl_seconds`` in *event* time
are evicted, judged against a bounded **watermark**, never against one event: the
minimum over the partitions the store serves of each partition's latest event time (a
partition silent in wall time for 1% of the TTL is idle and left out), capped by the
wall clock. So a far-future timestamp wipes nothing, and a caught-up partition does not
expire the keys of a lagging one; old data (a replay) is judged in its own time. The
sweep runs when the watermark has advanced by 1% of the TTL. Past ``max_keys`` the LRU
keys go first, in bulk down to a low-water mark, so a full table under key churn costs
about what an empty one does. Keys are tagged with their source partition, so one
partition's keys can be snapshotted, dropped and restored together. A row that became
non-finite (an overflow; a fault) is reset to a fresh key's row and counted
(:attr:`KeyedState.resets`), so nothing poisons a key for good.

>>> store = KeyedState(state_shape=(2, 2, 8), width=3, max_keys=10, ttl_seconds=60)
>>> store.assign(["a", "b", "a"], ts=np.array([0.0, 1.0, 2.0])).tolist()
[0, 1, 0]
>>> len(store), store.layout.width, store.bytes_per_row
(2, 64, 285)
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
import torch

from streamlstm.keyindex import KeyIndex
from streamlstm.rows import RowLayout

EVICTION_CAUSES = ("ttl", "capacity")
RESET_CAUSES = ("non_finite",)

# At max_keys, evict this fraction of the table at once (least recently used first), so the
# selection over the whole table runs once per that many new keys, not once per batch.
CAPACITY_HEADROOM = 0.02
# Events without a partition (offline replay, tests) count as this one.
NO_PARTITION = -1


class KeyedState:
    """Rows for stream keys, found by key, by slot, or by source partition."""

    def __init__(
        self,
        state_shape: tuple[int, int, int],
        width: int,
        max_keys: int = 1_000_000,
        ttl_seconds: float = 86_400.0,
        initial_capacity: int = 1024,
        on_evict: Callable[[list[str], str], None] | None = None,
        clock: Callable[[], float] = time.time,
        typical_step: bool = False,
        recurrent_dtype: str = "float16",
        season: int | None = None,
    ) -> None:
        self.layout = RowLayout(state_shape, width, typical_step, recurrent_dtype, season)
        self.state_shape = state_shape
        self.width = width
        self.max_keys = max_keys
        self.ttl_seconds = ttl_seconds
        self.on_evict = on_evict
        self.clock = clock
        self.evictions: Counter[str] = Counter()
        self.partition_moves = 0  # held keys seen arriving on another partition
        self.resets: Counter[str] = Counter()
        # When a list (the daemon's changelog is on): (keys, their partitions) of every
        # eviction, drained into tombstones.
        self.evicted: list[tuple[list[str], list[int]]] | None = None
        # Keys freed per eviction at max_keys (0 for small tables: exactly the overflow).
        self.capacity_headroom = int(max_keys * CAPACITY_HEADROOM)
        # partition -> (latest event time, capped by the wall clock; wall time it was seen)
        self._partition_time: dict[int, tuple[float, float]] = {}
        self._slot_of = KeyIndex()  # key -> slot; -1 for a key not held
        self._key_of: list[str | None] = []
        self._free: list[int] = []
        self._tick = 0  # batch counter: least-recently-used order; 0 marks a free slot
        self._next_sweep_ts = -math.inf
        self.capacity = 0
        self.table = torch.zeros(0, self.layout.width)
        self.last_ts = torch.zeros(0, dtype=torch.float64)
        self.offset = torch.zeros(0, dtype=torch.int64)
        self.partition = torch.zeros(0, dtype=torch.int32)
        self.last_used = torch.zeros(0, dtype=torch.int64)
        self.dirty = torch.zeros(0, dtype=torch.bool)
        self._grow(max(1, min(initial_capacity, max_keys)))

    # -- storage -----------------------------------------------------------------

    _COLUMNS = ("table", "last_ts", "offset", "partition", "last_used", "dirty")

    def _grow(self, capacity: int) -> None:
        """Reallocate every per-slot tensor with ``capacity`` rows, keeping existing rows."""
        old = self.capacity
        # Made as ordinary tensors: one made in the engine's inference_mode could never be
        # written outside it again (the changelog clears dirty marks, a restore loads rows).
        with torch.inference_mode(False):
            for name in self._COLUMNS:
                tensor = getattr(self, name)
                fresh = tensor.new_zeros((capacity, *tensor.shape[1:]))
                fresh[:old] = tensor
                setattr(self, name, fresh)
        self._key_of.extend([None] * (capacity - old))
        self._free.extend(range(capacity - 1, old - 1, -1))  # pop() hands out low slots first
        self.capacity = capacity

    @property
    def bytes_per_row(self) -> int:
        """Tensor bytes one key occupies (table row + time, offset, partition, LRU, dirty)."""
        columns = [getattr(self, n) for n in self._COLUMNS]
        return sum(c.element_size() * c[0].numel() for c in columns)

    def bytes_per_key(self) -> int:
        """Tensor row plus the key's share of the Python index: dict, key string, slot number
        (an int object past 256), slot lists (checked against ``tracemalloc`` in tests)."""
        return int(self.bytes_per_row + self._slot_of.bytes_per_key(self._key_of, self._free))

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: str) -> bool:
        return key in self._slot_of

    def slot(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def keys(self) -> list[str]:
        return list(self._slot_of)

    def read(self, key: str, name: str) -> torch.Tensor:
        """One field of one key's row (a copy), e.g. ``read("pump-17", "mean")``."""
        slot = self._slot_of.get(key)
        if slot is None:
            raise KeyError(key)
        return self.layout.field(self.table[slot : slot + 1], name)[0].clone()

    # -- assignment and eviction ---------------------------------------------------

    def assign(
        self, keys: list[str], ts: np.ndarray, partition: np.ndarray | None = None
    ) -> np.ndarray:
        """Slots for ``keys`` (allocating new keys), after evicting expired ones.

        The batch's event times advance its partitions' times (see :meth:`watermark`);
        the keys of the batch are never evicted by it.
        """
        self._tick += 1
        if len(ts):
            self._advance(ts, partition)
        slots = self._slot_of.slots(keys)  # one pass, new keys or not (-1: not held)
        missing = np.flatnonzero(slots < 0)
        known = slots[slots >= 0] if len(missing) else slots
        self.last_used[torch.from_numpy(known)] = self._tick  # the sweeps spare them
        if len(ts):
            self.evict_expired()
        held = slots >= 0
        if len(missing):
            self._allocate(keys, slots, missing)
            self.last_used[torch.from_numpy(slots)] = self._tick
        index = torch.from_numpy(slots)
        if partition is not None:
            part = torch.from_numpy(np.asarray(partition, dtype=np.int32))
            # A held key arriving on another partition: its producer does not key records
            # by stream key, so the key's state may be split across members.
            moved = (self.partition[index] != part) & torch.from_numpy(held)
            self.partition_moves += int(moved.sum())
            self.partition[index] = part
        return slots

    def _allocate(self, keys: list[str], slots: np.ndarray, missing: np.ndarray) -> None:
        """Give the keys at positions ``missing`` fresh slots, written into ``slots``."""
        missing_keys = [keys[i] for i in missing.tolist()]
        new_keys = list(dict.fromkeys(missing_keys))
        if len(self._slot_of) + len(new_keys) > self.max_keys:
            low_water = self.max_keys - self.capacity_headroom
            needed = len(self._slot_of) + len(new_keys)
            self._evict_least_recent(needed - low_water, keep_from=self._tick)
        needed = len(self._slot_of) + len(new_keys)  # after any eviction
        if needed > self.max_keys:
            raise ValueError("one batch holds more distinct keys than state.max_keys")
        if needed > self.capacity:
            self._grow(min(self.max_keys, max(needed, 2 * self.capacity)))
        new_slots = [self._free.pop() for _ in new_keys]
        self._slot_of.add(new_keys, new_slots)
        for key, slot in zip(new_keys, new_slots, strict=True):
            self._key_of[slot] = key
        index = torch.tensor(new_slots, dtype=torch.int64)
        for name in self._COLUMNS:
            getattr(self, name)[index] = 0
        self.offset[index] = -1
        self.partition[index] = -1
        slots[missing] = np.fromiter(
            map(self._slot_of.__getitem__, missing_keys), np.int64, len(missing_keys)
        )

    def occupied(self) -> torch.Tensor:
        """Mask of slots that hold a key."""
        return self.last_used > 0

    def _advance(self, ts: np.ndarray, partition: np.ndarray | None) -> None:
        """Advance each partition of a batch to its latest event time (capped by the clock)."""
        now = self.clock()
        if partition is None:
            latest = {NO_PARTITION: np.nanmax(ts, initial=-np.inf)}
        else:
            parts = np.asarray(partition)
            first = parts[0]
            if (parts == first).all():
                latest = {int(first): np.nanmax(ts, initial=-np.inf)}
            else:
                latest = {
                    int(p): np.nanmax(ts[parts == p], initial=-np.inf) for p in np.unique(parts)
                }
        table = self._partition_time
        for p, t in latest.items():
            before = table.get(p, (-math.inf, now))[0]
            table[p] = (max(before, min(float(t), now)), now)

    def watermark(self) -> float:
        """Event time every served partition has reached: the minimum over partitions of
        their latest event times, capped by the wall clock (-inf before any event). A
        partition silent for longer than the sweep cadence (1% of the TTL) in wall time is
        idle and does not hold the others back; the wall clock only decides idleness, never
        event time, so a replay is judged the same however fast it runs."""
        if not self._partition_time:
            return -math.inf
        now = self.clock()
        times = self._partition_time.values()
        active = [t for t, seen in times if now - seen <= 0.01 * self.ttl_seconds]
        mark = min(active) if active else max(t for t, _ in times)
        return min(mark, now)

    def evict_expired(self, watermark: float | None = None) -> int:
        """Evict keys idle longer than the TTL at ``watermark`` (default :meth:`watermark`),
        except keys of the current batch; runs when the watermark has advanced by 1% of the
        TTL since the last sweep. A key's own time counts at most the wall clock."""
        now = self.watermark() if watermark is None else watermark
        if not now >= self._next_sweep_ts:
            return 0
        self._next_sweep_ts = now + 0.01 * self.ttl_seconds
        last_ts = self.last_ts.clamp(max=self.clock())
        idle = self.occupied() & (self.last_used < self._tick) & (last_ts < now - self.ttl_seconds)
        stale = torch.nonzero(idle).flatten()
        self._free_slots(stale, cause="ttl")
        return len(stale)

    def _evict_least_recent(self, count: int, keep_from: int) -> None:
        """Evict ``count`` keys used before tick ``keep_from``, least recently used first
        (one partial selection over the table, not a sort)."""
        candidates = self.occupied() & (self.last_used < keep_from)
        count = min(count, int(candidates.sum()))
        if count <= 0:
            return
        age = torch.where(candidates, self.last_used, torch.iinfo(torch.int64).max)
        slots = torch.topk(age, count, largest=False, sorted=False).indices
        self._free_slots(slots, cause="capacity")

    def reset_non_finite(self, slots: torch.Tensor, rows: torch.Tensor | None = None) -> int:
        """Reset the rows among ``slots`` that hold a NaN or an infinity to a fresh key's row
        (the key keeps its slot, partition and offset); counted in ``resets["non_finite"]``.
        ``rows``: the rows of ``slots`` when the caller has them at hand."""
        rows = self.table.index_select(0, slots) if rows is None else rows
        # One sum screens the batch (a NaN or an infinity anywhere makes it non-finite); the
        # exact per-row test (30x dearer) runs only when it is not, which finite rows cause
        # only near float32's range. A float16 state is summed as such (as float32 bits, a
        # non-finite float16 value need not look so), into float32: a float16 total of a batch
        # of finite states overflows past 65504 and would send every batch to the dear test
        state = self.layout.field(rows, "recurrent")
        if bool(torch.isfinite(rows.sum() + state.sum(dtype=torch.float32))):
            return 0
        bad = ~(torch.isfinite(rows).all(1) & torch.isfinite(state).flatten(1).all(1))
        if not bool(bad.any()):
            return 0
        return self.reset(slots[bad], "non_finite")

    def reset(self, slots: torch.Tensor, cause: str) -> int:
        """Zero the rows of ``slots`` as a new key's (to be persisted), counting ``cause``."""
        slots = torch.unique(slots)
        self.table[slots] = 0
        self.dirty[slots] = True
        self.resets[cause] += len(slots)
        return len(slots)

    def _free_slots(self, slots: torch.Tensor, cause: str | None) -> list[str]:
        keys = [self._key_of[slot] for slot in slots.tolist()]
        if cause is not None and keys and self.evicted is not None:
            self.evicted.append((keys, self.partition[slots].tolist()))
        self._slot_of.remove(keys)
        for slot in slots.tolist():
            self._key_of[slot] = None
            self._free.append(slot)
        self.last_used[slots] = 0
        self.dirty[slots] = False
        if cause is not None and keys:
            self.evictions[cause] += len(keys)
            if self.on_evict is not None:
                self.on_evict(keys, cause)
        return keys

    # -- partitions: snapshot, drop, restore ---------------------------------------

    def slots_of_partition(self, partition: int) -> torch.Tensor:
        """Occupied slots whose keys came from ``partition``."""
        return torch.nonzero(self.occupied() & (self.partition == partition)).flatten()

    def drop_partition(self, partition: int) -> list[str]:
        """Forget every key of ``partition`` (its new owner restores them); its time leaves
        the watermark."""
        self._partition_time.pop(partition, None)
        return self._free_slots(self.slots_of_partition(partition), cause=None)

    def record_dtype(self) -> np.dtype:
        """Numpy layout of one key's persisted state."""
        fields = [("row", np.float32, (self.layout.width,)), ("last_ts", np.float64)]
        return np.dtype([*fields, ("offset", np.int64)])

    def snapshot(self, slots: torch.Tensor) -> list[tuple[str, bytes]]:
        """Serialise keys' state: ``(key, bytes)`` pairs in the :meth:`record_dtype` layout."""
        records = np.zeros(len(slots), dtype=self.record_dtype())
        keys, _, records["row"], records["last_ts"], records["offset"] = self.rows_of(slots)
        return [(key, records[i].tobytes()) for i, key in enumerate(keys)]

    def rows_of(
        self, slots: torch.Tensor
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Keys, partitions, rows, last event times and offsets of ``slots`` (copies)."""
        keys = [self._key_of[s] for s in slots.tolist()]
        columns = (self.partition, self.table, self.last_ts, self.offset)
        return keys, *(c.index_select(0, slots).numpy() for c in columns)  # type: ignore[return-value]

    def restore(self, items: Iterable[tuple[str, bytes]], partition: int) -> int:
        """Load serialised state (from :meth:`snapshot`) for keys of ``partition``."""
        items = list(items)
        keys = [key for key, _ in items]
        records = np.frombuffer(b"".join(blob for _, blob in items), dtype=self.record_dtype())
        return self.load(keys, records["row"], records["last_ts"], records["offset"], partition)

    def load(
        self,
        keys: list[str],
        rows: np.ndarray,
        last_ts: np.ndarray,
        offset: np.ndarray,
        partition: int,
    ) -> int:
        """Put restored rows in place for keys of ``partition`` (not dirty: persisted)."""
        if not keys:
            return 0
        slots = self.assign(keys, np.zeros(0), np.full(len(keys), partition))
        index = torch.from_numpy(slots)
        self.table[index] = torch.from_numpy(np.array(rows, dtype=np.float32))
        self.last_ts[index] = torch.from_numpy(np.array(last_ts, dtype=np.float64))
        self.offset[index] = torch.from_numpy(np.array(offset, dtype=np.int64))
        self.dirty[index] = False
        return len(keys)

    def applied(self, keys: list[str], partition: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Events already reflected in their key's row: the key is held, from the same
        partition, at an offset at or above the event's (so it must not be applied again).

        >>> store = KeyedState(state_shape=(1, 2, 2), width=1)
        >>> _ = store.load(["a"], np.zeros((1, store.layout.width)), [0.0], [5], partition=0)
        >>> store.applied(["a", "a", "b", "a"], np.array([0, 0, 0, 1]), np.array([5, 6, 1, 1]))
        array([ True, False, False, False])
        """
        slots = self._slot_of.slots(keys)
        held = slots >= 0
        out = np.zeros(len(keys), dtype=bool)
        index = slots[held]
        same = self.partition.numpy()[index] == np.asarray(partition)[held]
        out[held] = same & (self.offset.numpy()[index] >= np.asarray(offset)[held])
        return out

    def take_dirty(self, partition: int | None = None) -> torch.Tensor:
        """Slots changed since the last call (optionally of one partition); clears the marks."""
        mask = self.dirty & self.occupied()
        if partition is not None:
            mask &= self.partition == partition
        slots = torch.nonzero(mask).flatten()
        self.dirty[slots] = False
        return slots
