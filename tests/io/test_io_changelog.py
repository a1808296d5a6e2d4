"""The changelog codec: a row comes back exactly; anything else is rejected, never misread."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from streamlstm.io.changelog import MAGIC, VERSION, decode, encode, record_size

WIDTH = 5


def _rows(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    return (
        rng.normal(size=(n, WIDTH)).astype(np.float32),
        rng.uniform(0, 2e9, n),
        rng.integers(0, 2**62, n),
    )


def test_roundtrip_is_exact() -> None:
    rows, ts, off = _rows(50)
    out = decode(encode(123, rows, ts, off), fingerprint=123, width=WIDTH)
    assert out.ok.all()
    np.testing.assert_array_equal(out.rows, rows)
    np.testing.assert_array_equal(out.last_ts, ts)
    np.testing.assert_array_equal(out.offset, off)


def test_layout_header() -> None:
    blob = encode(7, *_rows(1))[0]
    assert len(blob) == record_size(WIDTH) == 27 + 4 * WIDTH
    assert int.from_bytes(blob[:2], "little") == MAGIC and blob[2] == VERSION


def test_another_layout_version_or_magic_is_rejected() -> None:
    blobs = encode(7, *_rows(3))
    assert not decode(blobs, fingerprint=8, width=WIDTH).ok.any()  # another row layout
    bumped = blobs[0][:2] + bytes([VERSION + 1]) + blobs[0][3:]
    foreign = b"XX" + blobs[1][2:]
    out = decode([bumped, foreign, blobs[2]], fingerprint=7, width=WIDTH)
    assert out.ok.tolist() == [False, False, True] and len(out.rows) == 1
    assert not decode(blobs, fingerprint=7, width=WIDTH + 1).ok.any()  # a wider row


def test_empty_input() -> None:
    out = decode([], fingerprint=7, width=WIDTH)
    assert out.ok.shape == (0,) and out.rows.shape == (0, WIDTH)


@given(st.lists(st.binary(max_size=80), max_size=8), st.integers(0, 200))
def test_truncated_or_arbitrary_bytes_never_raise(junk: list[bytes], cut: int) -> None:
    good = encode(9, *_rows(2))
    values = [*junk, good[0][:cut], good[1]]
    out = decode(values, fingerprint=9, width=WIDTH)
    assert out.ok[-1] and len(out.rows) == int(out.ok.sum())
    if cut < len(good[0]):
        assert not out.ok[-2]
