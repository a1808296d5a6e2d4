"""Keyed state store: every stream key owns one row of a preallocated table.

A key's row holds its recurrent state, its online normalisation statistics, the
pending prediction (scored when the key's next event arrives) and its anomaly
statistics, all float32 and contiguous, so a batch of keys is gathered with one
``index_select`` and written back with one ``index_copy_`` that each touch one place
in memory per key. Beside the table: the last event time (float64), the offset the
state reflects, the source partition, and bookkeeping for eviction and persistence.

The table grows geometrically. Keys idle longer than ``ttl_seconds`` in *event* time
are evicted (swept when event time has advanced by 1% of the TTL), and past
``max_keys`` the least recently used keys go first. Keys are tagged with their source
partition, so one partition's keys can be snapshotted, dropped and restored together.

>>> store = KeyedState(state_shape=(2, 2, 8), width=3, max_keys=10, ttl_seconds=60)
>>> store.assign(["a", "b", "a"], ts=np.array([0.0, 1.0, 2.0])).tolist()
[0, 1, 0]
>>> len(store), store.layout.width, store.bytes_per_row
(2, 72, 317)
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
import torch

from streamlstm.anomaly import SCALES
from streamlstm.combine import EXPERTS

EVICTION_CAUSES = ("ttl", "capacity")


class RowLayout:
    """Named column ranges of a key's float32 row.

    >>> layout = RowLayout(state_shape=(1, 2, 4), width=3)
    >>> layout.columns["mean"], layout.width
    (slice(8, 11, None), 48)
    """

    # Page-Hinkley statistics of the key's error stream (``streamlstm.drift``) live here too,
    # so they are gathered with the row and travel with the key's snapshot.
    PH = ("ph_mean", "ph_n", "ph_inc", "ph_dec", "ph_min", "ph_max", "ph_drift")
    SCALARS = ("count", "has_pending", "err_mean", "err_var", "err_count", "err_peak", *PH)

    def __init__(self, state_shape: tuple[int, int, int], width: int) -> None:
        self.state_shape = state_shape
        sizes = {
            "recurrent": math.prod(state_shape),
            "mean": width,
            "var": width,
            "pending": width,  # the combined forecast of the key's next values
            "net_pending": width,  # the network's own forecast (``streamlstm.combine``)
            "ewma": width,  # the EWMA forecaster's level
            "last": width,  # the key's previous values (for change inputs and labels)
            "step": width,  # its typical absolute step-to-step change (engine.max_step)
            "hedge": len(EXPERTS),  # discounted losses of the forecasters
            "err_scales": len(SCALES),  # error averages over the anomaly time scales
        }
        sizes.update(dict.fromkeys(self.SCALARS, 1))
        self.columns: dict[str, slice] = {}
        start = 0
        for name, size in sizes.items():
            self.columns[name] = slice(start, start + size)
            start += size
        self.width = start

    def block(self, rows: torch.Tensor, first: str, last: str) -> torch.Tensor:
        """A ``[B, n]`` view of consecutive scalar columns ``first`` .. ``last``."""
        return rows[:, self.columns[first].start : self.columns[last].stop]

    def field(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """A view of one field of ``rows`` ([B, width]); scalars come as ``[B]``."""
        view = rows[:, self.columns[name]]
        if name == "recurrent":
            return view.view(len(rows), *self.state_shape)
        return view[:, 0] if name in self.SCALARS else view


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
    ) -> None:
        self.layout = RowLayout(state_shape, width)
        self.state_shape = state_shape
        self.width = width
        self.max_keys = max_keys
        self.ttl_seconds = ttl_seconds
        self.on_evict = on_evict
        self.evictions: Counter[str] = Counter()
        self._slot_of: dict[str, int] = {}
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
        return sum(
            getattr(self, n).element_size() * getattr(self, n)[0].numel() for n in self._COLUMNS
        )

    def bytes_per_key(self) -> int:
        """Tensor row plus the key's share of the Python index (dict entry, key string)."""
        if not self._slot_of:
            return self.bytes_per_row
        sample = list(self._slot_of)[:1000]
        key_bytes = sum(sys.getsizeof(k) for k in sample) / len(sample)
        dict_bytes = sys.getsizeof(self._slot_of) / len(self._slot_of)
        return int(self.bytes_per_row + key_bytes + dict_bytes + 8)  # + list entry in _key_of

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
        slot = self._slot_of[key]
        return self.layout.field(self.table[slot : slot + 1], name)[0].clone()

    # -- assignment and eviction ---------------------------------------------------

    def assign(
        self, keys: list[str], ts: np.ndarray, partition: np.ndarray | None = None
    ) -> np.ndarray:
        """Slots for ``keys`` (allocating new keys), after evicting expired ones.

        Expiry is judged at the batch's earliest event time, so a key that the batch
        continues is never evicted by a later event of the same batch.
        """
        self._tick += 1
        if len(ts):
            self.evict_expired(float(ts.min()))
        try:
            slots = np.fromiter(map(self._slot_of.__getitem__, keys), np.int64, len(keys))
        except KeyError:
            slots = self._assign_with_new(keys)
        index = torch.from_numpy(slots)
        self.last_used[index] = self._tick
        if partition is not None:
            self.partition[index] = torch.from_numpy(np.asarray(partition, dtype=np.int32))
        return slots

    def _assign_with_new(self, keys: list[str]) -> np.ndarray:
        get = self._slot_of.get
        new_keys = list(dict.fromkeys(k for k in keys if get(k) is None))
        overflow = len(self._slot_of) + len(new_keys) - self.max_keys
        if overflow > 0:
            known = [s for s in map(get, keys) if s is not None]
            self.last_used[torch.tensor(known, dtype=torch.int64)] = self._tick
            self._evict_least_recent(overflow, keep_from=self._tick)
        if len(self._slot_of) + len(new_keys) > self.max_keys:
            raise ValueError("one batch holds more distinct keys than state.max_keys")
        needed = len(self._slot_of) + len(new_keys)
        if needed > self.capacity:
            self._grow(min(self.max_keys, max(needed, 2 * self.capacity)))
        new_slots = [self._free.pop() for _ in new_keys]
        for key, slot in zip(new_keys, new_slots, strict=True):
            self._slot_of[key] = slot
            self._key_of[slot] = key
        index = torch.tensor(new_slots, dtype=torch.int64)
        for name in self._COLUMNS:
            getattr(self, name)[index] = 0
        self.offset[index] = -1
        self.partition[index] = -1
        return np.fromiter(map(self._slot_of.__getitem__, keys), np.int64, len(keys))

    def occupied(self) -> torch.Tensor:
        """Mask of slots that hold a key."""
        return self.last_used > 0

    def evict_expired(self, now_ts: float) -> int:
        """Evict keys whose last event is older than ``now_ts - ttl_seconds``."""
        if now_ts < self._next_sweep_ts:
            return 0
        self._next_sweep_ts = now_ts + 0.01 * self.ttl_seconds
        stale = torch.nonzero(self.occupied() & (self.last_ts < now_ts - self.ttl_seconds))
        self._free_slots(stale.flatten(), cause="ttl")
        return len(stale)

    def _evict_least_recent(self, count: int, keep_from: int) -> None:
        candidates = torch.nonzero(self.occupied() & (self.last_used < keep_from)).flatten()
        order = torch.argsort(self.last_used[candidates], stable=True)[:count]
        self._free_slots(candidates[order], cause="capacity")

    def _free_slots(self, slots: torch.Tensor, cause: str | None) -> list[str]:
        keys = [self._key_of[slot] for slot in slots.tolist()]
        for key, slot in zip(keys, slots.tolist(), strict=True):
            del self._slot_of[key]
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
        """Forget every key of ``partition`` (its new owner restores them)."""
        return self._free_slots(self.slots_of_partition(partition), cause=None)

    def record_dtype(self) -> np.dtype:
        """Numpy layout of one key's persisted state."""
        return np.dtype(
            [
                ("row", np.float32, (self.layout.width,)),
                ("last_ts", np.float64),
                ("offset", np.int64),
            ]
        )

    def snapshot(self, slots: torch.Tensor) -> list[tuple[str, bytes]]:
        """Serialise keys' state: ``(key, bytes)`` pairs in the :meth:`record_dtype` layout."""
        records = np.zeros(len(slots), dtype=self.record_dtype())
        records["row"] = self.table[slots].numpy()
        records["last_ts"] = self.last_ts[slots].numpy()
        records["offset"] = self.offset[slots].numpy()
        return [(self._key_of[s], records[i].tobytes()) for i, s in enumerate(slots.tolist())]

    def restore(self, items: Iterable[tuple[str, bytes]], partition: int) -> int:
        """Load serialised state (from :meth:`snapshot`) for keys of ``partition``."""
        items = list(items)
        if not items:
            return 0
        keys = [key for key, _ in items]
        records = np.frombuffer(b"".join(blob for _, blob in items), dtype=self.record_dtype())
        slots = self.assign(keys, np.zeros(0), np.full(len(keys), partition))
        index = torch.from_numpy(slots)
        self.table[index] = torch.from_numpy(records["row"].copy())
        self.last_ts[index] = torch.from_numpy(records["last_ts"].copy())
        self.offset[index] = torch.from_numpy(records["offset"].copy())
        self.dirty[index] = False
        return len(keys)

    def take_dirty(self, partition: int | None = None) -> torch.Tensor:
        """Slots changed since the last call (optionally of one partition); clears the marks."""
        mask = self.dirty & self.occupied()
        if partition is not None:
            mask &= self.partition == partition
        slots = torch.nonzero(mask).flatten()
        self.dirty[slots] = False
        return slots
