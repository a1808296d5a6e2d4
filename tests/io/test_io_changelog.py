"""The changelog codec: a row comes back exactly; anything else is rejected, never misread."""

from __future__ import annotations

from functools import partial

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from streamlstm.io.changelog import (
    CLOCK_SKEW_SECONDS,
    MAGIC,
    VERSION,
    decode,
    encode,
    max_restored_ts,
    plausible,
    record_size,
)
from streamlstm.validation import MAX_TS

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


def test_impossible_values_are_rejected_and_old_times_pass() -> None:
    rows, ts, off = _rows(9)
    ts[0] = -3e10  # the year 1019: history is normal
    rows[1, 2] = np.nan
    rows[2, 0] = -np.inf
    ts[3] = np.nan
    ts[4] = 1.764e12  # a millisecond timestamp: past year 9999
    ts[5] = -1e300
    off[6] = -5
    ts[7], off[7] = 0.0, -1  # a key with no offset yet
    ts[8] = np.inf
    blobs = encode(3, rows, ts, off)
    out = decode([*blobs, blobs[0][:-1]], fingerprint=3, width=WIDTH)
    assert out.ok.tolist() == [True, *[False] * 6, True, False, False]
    assert out.invalid == 7  # the truncated one is another layout, not counted here
    np.testing.assert_array_equal(out.rows, rows[[0, 7]])
    assert out.last_ts.tolist() == [-3e10, 0.0] and out.offset.tolist() == [off[0], -1]


def test_the_far_future_bound_follows_max_future_seconds() -> None:
    now = 1.764e9
    bound = max_restored_ts(86_400.0, now=now)
    assert bound == now + 86_400.0 + CLOCK_SKEW_SECONDS
    assert max_restored_ts(None) == MAX_TS == max_restored_ts(1e30, now=now)
    rows, _, off = _rows(3)
    ts = np.array([now + 86_400.0, bound + 1.0, now - 1e9])
    check = partial(plausible, max_ts=bound)
    out = decode(encode(3, rows, ts, off), fingerprint=3, width=WIDTH, check=check)
    assert out.ok.tolist() == [True, False, True] and out.invalid == 1


def test_float16_pairs_are_checked_as_such() -> None:
    rows, ts, off = _rows(2)
    rows[:, :2] = np.array([[0.5, -0.25, 1.0, 2.0], [0.5, np.inf, 1.0, 2.0]], np.float16).view(
        np.float32
    )
    assert np.isfinite(rows).all()  # a float16 infinity hides in a finite float32
    blobs = encode(3, rows, ts, off)
    assert decode(blobs, fingerprint=3, width=WIDTH).ok.all()
    check = partial(plausible, halves=slice(0, 2))
    out = decode(blobs, fingerprint=3, width=WIDTH, check=check)
    assert out.ok.tolist() == [True, False] and out.invalid == 1
