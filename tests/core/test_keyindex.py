"""The store's key index: its C table answers as the dict does, through any mix of keys."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from streamlstm import native
from streamlstm.keyindex import KEY_MAX, KeyIndex

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
# Short and long (past a bucket's 23 bytes), non-ASCII, empty, a NUL, a lone surrogate.
ODD = ["", "a", "ä" * 11, "ä" * 12, "x" * KEY_MAX, "x" * (KEY_MAX + 1), "nul\0key", "\ud800"]


@needs_compiler
def test_the_c_table_agrees_with_the_dict_through_adds_and_removes() -> None:
    rng = np.random.default_rng(0)
    index, truth = KeyIndex(), KeyIndex(native_table=False)
    assert index.native, native._failure
    pool = [*ODD, *(f"key-{i}" * (1 + i % 4) for i in range(3000))]
    held: dict[str, int] = {}
    for round_ in range(40):  # grows, shrinks, rebuilds (deleted marks fill the table)
        fresh = [k for k in rng.choice(pool, 150) if k not in held]
        fresh = list(dict.fromkeys(fresh))
        slots = rng.integers(0, 10**6, len(fresh)).tolist()
        for index_ in (index, truth):
            index_.add(fresh, slots)
        held.update(zip(fresh, slots, strict=True))
        gone = [k for k in held if rng.random() < 0.2 * (round_ % 3 == 2)]
        for index_ in (index, truth):
            index_.remove(gone)
        for k in gone:
            del held[k]
        asked = list(rng.choice(pool, 500))
        for keys in (asked, [k for k in asked if "\0" not in k]):
            assert index.slots(keys).tolist() == truth.slots(keys).tolist()
            assert index.slots(keys).tolist() == [held.get(k, -1) for k in keys]
    assert dict(index) == dict(truth) == held


@needs_compiler
def test_single_key_changes_follow_and_other_changes_are_refused() -> None:
    index = KeyIndex({"a": 1})
    index["b"] = 2
    index["a"] = 3  # a new slot for a held key
    del index["b"]
    assert index.slots(["a", "b"]).tolist() == [3, -1]
    with pytest.raises(TypeError):
        index.pop("a")
    with pytest.raises(TypeError):
        index.update({"c": 4})


def test_without_the_c_code_the_dict_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", "no compiler here")
    index = KeyIndex({"a": 1, "b": 2})
    assert not index.native
    assert index.slots(["b", "c", "a"]).tolist() == [2, -1, 1]


@needs_compiler
def test_keys_with_a_nul_do_not_rebuild_the_table() -> None:
    """Keys with a NUL (JSON's \\u0000) live in the dict only. Before, each batch adding or
    removing one rebuilt the table from every key (~0.1 s at 100k keys)."""
    index = KeyIndex({f"k{i}": i for i in range(100)})
    table = index._buffer
    index.add(["new", "nul\0a"], [200, 201])
    index.add(["nul\0b"], [202])  # nothing for the table
    index.remove(["nul\0a", "k1"])
    assert index._buffer is table and index._used == 101  # 100 + "new" (k1: a deleted mark)
    keys = ["new", "k1", "k2", "nul\0b", "nul\0a"]
    assert index.slots(keys).tolist() == [200, -1, 2, 202, -1]
    assert index.slots(keys[:3]).tolist() == [200, -1, 2]
