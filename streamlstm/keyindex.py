"""The state store's index: stream key -> slot of its row (:class:`~streamlstm.state.KeyedState`).

A dict (the truth: ``get``, ``in``, iteration, ``len``), and beside it, where the C code
builds (:mod:`streamlstm.native`), a copy in a C hash table (``key_table.c``) that looks
up a whole batch in one call. A dict lookup of a batch of 4,096 of 100k keys waits on
memory several times per key, one wait after the other (the key's str object, the dict's
index and entry, the slot's int object: ~1 us per key); the table holds the keys' bytes
in its buckets and fetches all of a batch's buckets before comparing any. Keys it does
not hold (longer than a bucket's 23 UTF-8 bytes, or with a NUL character: its batches
are NUL-separated) are looked up in the dict, and so is a whole batch holding a NUL.
Without the C code, the dict alone: one ``operator.itemgetter`` call per batch (a key
not held reads as -1).

Keys enter and leave with :meth:`add` and :meth:`remove` (``index[key] = slot`` and
``del index[key]`` do the same for one key), so both copies always agree.

>>> index = KeyIndex({"a": 3, "b": 5})
>>> index.slots(["b", "new", "a"]).tolist(), index.slots(["a"]).tolist(), index.slots([]).size
([5, -1, 3], [3], 0)
>>> index.remove(["a"]); index.add(["c"], [7]); index.slots(["a", "c"]).tolist()
[-1, 7]
"""

from __future__ import annotations

import ctypes
import operator
import sys
from collections.abc import Mapping, Sequence
from itertools import islice
from typing import Any, NoReturn

import numpy as np

from streamlstm import native

BUCKET = 32  # bytes: the C file's struct bucket
KEY_MAX = 23  # key bytes a bucket holds (KEY_MAX there)
_LONG = -2  # the lookup's answer for a key longer than that
_SIGNATURES = {
    "key_table_lookup": "PIPIIPP",
    "key_table_insert": "PIPIIPP",
    "key_table_remove": "PIPIIP",
}


def _load() -> ctypes.CDLL | None:
    lib = native.load()
    if lib is not None:
        native.declare(lib, _SIGNATURES, returns=set(_SIGNATURES))
    return lib


def _blob(keys: Sequence[str]) -> bytes:
    """The keys as the C table reads them: UTF-8 (lone surrogates too), NUL-separated."""
    return "\0".join(keys).encode("utf-8", "surrogatepass")


class KeyIndex(dict[str, int]):
    """Key -> slot; ``index[key]`` is -1 for a key not held (``get`` is as a dict's)."""

    def __init__(self, items: Mapping[str, int] | None = None, native_table: bool = True) -> None:
        super().__init__()
        self._lib = _load() if native_table else None
        self._buffer = np.zeros(0, np.uint8)  # owns the buckets (a 64-byte aligned view)
        self._table = self._buffer
        self._buckets = 0
        self._used = 0  # buckets holding a key or a deleted mark: at most half of them
        if self._lib is not None:
            self._rebuild(0)
        if items:
            self.add(list(items), list(items.values()))

    def __missing__(self, key: str) -> int:
        return -1

    def __setitem__(self, key: str, slot: int) -> None:
        self.add([key], [slot])

    def __delitem__(self, key: str) -> None:
        self.remove([key])

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("KeyIndex changes through add and remove only (the C copy follows)")

    pop = popitem = clear = update = setdefault = __ior__ = _refuse

    @property
    def native(self) -> bool:
        """Whether batches are looked up in the C table."""
        return self._lib is not None

    def add(self, keys: Sequence[str], slots: Sequence[int]) -> None:
        """Map each of ``keys`` to the slot at the same position."""
        for key, slot in zip(keys, slots, strict=True):
            dict.__setitem__(self, key, slot)
        if self._lib is None:
            return
        if 2 * (self._used + len(keys)) > self._buckets:
            self._rebuild(len(self))  # holds every key of the dict, these too
            return
        taken = self._call("key_table_insert", keys, np.asarray(slots, np.int64))
        if taken < 0:  # a key with a NUL (not held in the table): the others
            fit = [i for i, key in enumerate(keys) if "\0" not in key]
            taken = self._call(
                "key_table_insert", [keys[i] for i in fit], np.asarray(slots, np.int64)[fit]
            )
        self._used += taken

    def remove(self, keys: Sequence[str]) -> None:
        """Forget ``keys`` (each must be held)."""
        for key in keys:
            dict.__delitem__(self, key)
        if self._lib is not None and self._call("key_table_remove", keys) < 0:
            self._call("key_table_remove", [key for key in keys if "\0" not in key])

    def slots(self, keys: list[str]) -> np.ndarray:
        """The slots of ``keys`` (int64), -1 for a key not held."""
        if len(keys) < 2:  # itemgetter of one key returns it bare, of none fails
            return np.array([self[k] for k in keys], np.int64)
        if self._lib is not None:
            out = np.empty(len(keys), np.int64)
            if self._call("key_table_lookup", keys, out) == 0:
                long = np.flatnonzero(out == _LONG)
                if len(long):
                    out[long] = [self[keys[i]] for i in long.tolist()]
                return out
        return np.fromiter(operator.itemgetter(*keys)(self), np.int64, len(keys))

    def _call(self, name: str, keys: Sequence[str], *arrays: np.ndarray) -> int:
        """A C table function on ``keys`` (and their slots' array); -1 if the keys do not
        fit it (a NUL character in one). No keys: 0."""
        assert self._lib is not None
        if not keys:
            return 0
        blob = _blob(keys)
        scratch = np.empty(3 * len(keys), np.int64)
        function = getattr(self._lib, name)
        table = self._table.ctypes.data
        at = [a.ctypes.data for a in arrays]
        return int(
            function(table, self._buckets, blob, len(blob), len(keys), *at, scratch.ctypes.data)
        )

    def _rebuild(self, keys: int) -> None:
        """A table of a power-of-two number of buckets, at most 40% of them for ``keys``
        keys (room for keys / 4 more before the next rebuild: a rebuild's cost, spread over
        the keys added or removed since the last, stays a few inserts per key), filled from
        the dict (its keys with a NUL character left out)."""
        buckets = 64
        while 2 * buckets < 5 * keys:
            buckets *= 2
        size = buckets * BUCKET
        self._buffer = np.full(size + 64, 0xFF, np.uint8)  # every bucket's slot: -1, empty
        start = -self._buffer.ctypes.data % 64  # a bucket never straddles two cache lines
        self._table, self._buckets, self._used = self._buffer[start : start + size], buckets, 0
        held = [k for k in self if "\0" not in k]
        self._used = self._call(
            "key_table_insert", held, np.fromiter(map(self.get, held), np.int64, len(held))
        )

    def bytes_per_key(self, *beside: object) -> float:
        """Python memory per key: dict entry, key string, slot number (an int object past
        256), the C table's buckets and the containers ``beside`` (the store's slot lists),
        shared by the keys."""
        if not self:
            return 0.0
        sample = list(islice(self.items(), 1000))  # not a copy of every key's entry
        own = sum(_block(k) + (_block(v) if v > 256 else 0) for k, v in sample)
        shared = sum(map(sys.getsizeof, (self, *beside))) + self._buffer.nbytes
        return own / len(sample) + shared / len(self)


def _block(obj: object) -> int:  # bytes Python's allocator gives an object: 16-aligned
    return -(-sys.getsizeof(obj) // 16) * 16
