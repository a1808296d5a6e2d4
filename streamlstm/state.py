"""Keyed state store: every stream key owns one slot (row) in preallocated tensors.

Per key we keep the recurrent state, the online normalisation statistics, the pending
prediction (scored when the key's next event arrives), the anomaly statistics, the
last event time, the source partition and the offset the state reflects. Tensors grow
geometrically, so a batch of keys is gathered and scattered with one index operation
per field. Keys idle longer than ``ttl_seconds`` in *event* time are evicted, and past
``max_keys`` the least recently used keys go first. Keys are tagged with their source
partition, so one partition's keys can be snapshotted, dropped and restored together.

>>> store = KeyedState(state_shape=(2, 2, 8), width=3, max_keys=10, ttl_seconds=60)
>>> store.assign(["a", "b", "a"], ts=np.array([0.0, 1.0, 2.0])).tolist()
[0, 1, 0]
>>> len(store), store.row_bytes
(2, 222)
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
import torch

_FLOAT_FIELDS = ("mean", "var", "pending")  # [S, F] float32
_SCALAR_FIELDS = {  # [S] tensors and their dtypes
    "count": torch.int64,
    "has_pending": torch.bool,
    "err_short": torch.float32,
    "err_mean": torch.float32,
    "err_var": torch.float32,
    "err_count": torch.int64,
    "last_ts": torch.float64,
    "offset": torch.int64,
}


class KeyedState:
    """Slots for stream keys in tensors of shape ``[capacity, ...]``."""

    def __init__(
        self,
        state_shape: tuple[int, int, int],
        width: int,
        max_keys: int = 1_000_000,
        ttl_seconds: float = 86_400.0,
        initial_capacity: int = 1024,
        on_evict: Callable[[list[str], str], None] | None = None,
    ) -> None:
        self.state_shape = state_shape
        self.width = width
        self.max_keys = max_keys
        self.ttl_seconds = ttl_seconds
        self.on_evict = on_evict
        self.evictions: Counter[str] = Counter()
        self._slot_of: dict[str, int] = {}
        self._key_of: list[str | None] = []
        self._free: list[int] = []
        self._tick = 0  # batch counter for least-recently-used order
        self.capacity = 0
        self._allocate(max(1, min(initial_capacity, max_keys)))

    # -- storage -----------------------------------------------------------------

    def _allocate(self, capacity: int) -> None:
        """Grow every per-slot tensor to ``capacity`` rows, keeping existing rows."""
        layers, parts, hidden = self.state_shape
        old = self.capacity

        def grow(tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype):
            fresh = torch.zeros(shape, dtype=dtype)
            if tensor is not None:
                fresh[:old] = tensor
            return fresh

        self.recurrent = grow(
            getattr(self, "recurrent", None), (capacity, layers, parts, hidden), torch.float32
        )
        for name in _FLOAT_FIELDS:
            old_tensor = getattr(self, name, None)
            setattr(self, name, grow(old_tensor, (capacity, self.width), torch.float32))
        for name, dtype in _SCALAR_FIELDS.items():
            setattr(self, name, grow(getattr(self, name, None), (capacity,), dtype))
        self.partition = grow(getattr(self, "partition", None), (capacity,), torch.int32)
        self.last_used = grow(getattr(self, "last_used", None), (capacity,), torch.int64)
        self.dirty = grow(getattr(self, "dirty", None), (capacity,), torch.bool)
        self._key_of.extend([None] * (capacity - old))
        self._free.extend(range(capacity - 1, old - 1, -1))  # pop() hands out low slots first
        self.capacity = capacity

    @property
    def row_bytes(self) -> int:
        """Tensor bytes one key occupies."""
        layers, parts, hidden = self.state_shape
        total = layers * parts * hidden * 4 + len(_FLOAT_FIELDS) * self.width * 4
        total += sum(torch.empty(0, dtype=d).element_size() for d in _SCALAR_FIELDS.values())
        return total + 4 + 8 + 1  # partition, last_used, dirty

    def bytes_per_key(self) -> int:
        """Tensor row plus the key's share of the Python index (dict entry, key string)."""
        if not self._slot_of:
            return self.row_bytes
        sample = list(self._slot_of)[:1000]
        key_bytes = sum(sys.getsizeof(k) for k in sample) / len(sample)
        dict_bytes = sys.getsizeof(self._slot_of) / len(self._slot_of)
        return int(self.row_bytes + key_bytes + dict_bytes + 8)  # + list slot in _key_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: str) -> bool:
        return key in self._slot_of

    def slot(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def keys(self) -> list[str]:
        return list(self._slot_of)

    # -- assignment and eviction ---------------------------------------------------

    def assign(
        self, keys: list[str], ts: np.ndarray, partition: np.ndarray | None = None
    ) -> np.ndarray:
        """Slots for ``keys`` (allocating new keys), after evicting expired ones."""
        self._tick += 1
        if len(ts):
            self.evict_expired(float(ts.max()))
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
            self._allocate(min(self.max_keys, max(needed, 2 * self.capacity)))
        new_slots = [self._free.pop() for _ in new_keys]
        for key, slot in zip(new_keys, new_slots, strict=True):
            self._slot_of[key] = slot
            self._key_of[slot] = key
        self._reset(torch.tensor(new_slots, dtype=torch.int64))
        return np.fromiter(map(self._slot_of.__getitem__, keys), np.int64, len(keys))

    def _reset(self, slots: torch.Tensor) -> None:
        self.recurrent[slots] = 0.0
        for name in _FLOAT_FIELDS:
            getattr(self, name)[slots] = 0
        for name in _SCALAR_FIELDS:
            getattr(self, name)[slots] = 0
        self.offset[slots] = -1
        self.partition[slots] = -1
        self.dirty[slots] = False

    def occupied(self) -> torch.Tensor:
        """Slot numbers currently holding a key."""
        return torch.tensor(sorted(self._slot_of.values()), dtype=torch.int64)

    def evict_expired(self, now_ts: float) -> int:
        """Evict keys whose last event is older than ``now_ts - ttl_seconds``."""
        cutoff = now_ts - self.ttl_seconds
        live = self._key_of_mask()
        stale = torch.nonzero(live & (self.last_ts < cutoff)).flatten()
        if len(stale):
            self._free_slots(stale, cause="ttl")
        return len(stale)

    def _key_of_mask(self) -> torch.Tensor:
        # last_used > 0 exactly for occupied slots (every assigned key was used at tick >= 1)
        return self.last_used > 0

    def _evict_least_recent(self, count: int, keep_from: int) -> None:
        candidates = torch.nonzero(self._key_of_mask() & (self.last_used < keep_from)).flatten()
        order = torch.argsort(self.last_used[candidates], stable=True)[:count]
        self._free_slots(candidates[order], cause="capacity")

    def _free_slots(self, slots: torch.Tensor, cause: str | None) -> list[str]:
        keys = []
        for slot in slots.tolist():
            key = self._key_of[slot]
            assert key is not None
            keys.append(key)
            del self._slot_of[key]
            self._key_of[slot] = None
            self._free.append(slot)
        self.last_used[slots] = 0
        self.dirty[slots] = False
        if cause is not None:
            self.evictions[cause] += len(keys)
            if self.on_evict is not None:
                self.on_evict(keys, cause)
        return keys

    # -- partitions: snapshot, drop, restore ---------------------------------------

    def slots_of_partition(self, partition: int) -> torch.Tensor:
        """Occupied slots whose keys came from ``partition``."""
        mask = self._key_of_mask() & (self.partition == partition)
        return torch.nonzero(mask).flatten()

    def drop_partition(self, partition: int) -> list[str]:
        """Forget every key of ``partition`` (its new owner restores them)."""
        return self._free_slots(self.slots_of_partition(partition), cause=None)

    def row_dtype(self) -> np.dtype:
        """Numpy record layout of one key's persisted state."""
        fields = [("recurrent", np.float32, self.state_shape)]
        fields += [(name, np.float32, (self.width,)) for name in _FLOAT_FIELDS]
        fields += [(name, torch.empty(0, dtype=d).numpy().dtype) for name, d in _SCALAR_FIELDS.items()]
        return np.dtype(fields)

    def snapshot(self, slots: torch.Tensor) -> list[tuple[str, bytes]]:
        """Serialise keys' rows: ``(key, bytes)`` pairs in the :meth:`row_dtype` layout."""
        rows = np.zeros(len(slots), dtype=self.row_dtype())
        rows["recurrent"] = self.recurrent[slots].numpy()
        for name in (*_FLOAT_FIELDS, *_SCALAR_FIELDS):
            rows[name] = getattr(self, name)[slots].numpy()
        return [(self._key_of[s], rows[i].tobytes()) for i, s in enumerate(slots.tolist())]

    def restore(self, items: Iterable[tuple[str, bytes]], partition: int) -> int:
        """Load serialised rows (from :meth:`snapshot`) for keys of ``partition``."""
        items = list(items)
        if not items:
            return 0
        keys = [k for k, _ in items]
        rows = np.frombuffer(b"".join(b for _, b in items), dtype=self.row_dtype())
        slots = torch.from_numpy(self.assign(keys, np.zeros(0), np.full(len(keys), partition)))
        self.recurrent[slots] = torch.from_numpy(rows["recurrent"].copy())
        for name in (*_FLOAT_FIELDS, *_SCALAR_FIELDS):
            getattr(self, name)[slots] = torch.from_numpy(rows[name].copy())
        self.dirty[slots] = False
        return len(keys)

    def take_dirty(self, partition: int | None = None) -> torch.Tensor:
        """Slots changed since the last call (optionally of one partition); clears the marks."""
        mask = self.dirty & self._key_of_mask()
        if partition is not None:
            mask &= self.partition == partition
        slots = torch.nonzero(mask).flatten()
        self.dirty[slots] = False
        return slots
