"""What a key's state row holds: named column ranges of one contiguous float32 row.

The recurrent state, the scaler, the forecasters' pending values, the combination's
losses and the anomaly and drift statistics of a key sit side by side, so a batch of keys
is gathered and written back in one operation each (``streamlstm.state``).

The recurrent state is most of a row, so it may be stored in float16 (``state.
recurrent_dtype``), two values per float32 column: half the bytes per key, for a state
that needs no more (h is in [-1, 1], c a small sum of such; float16 keeps 11 significant
bits). The step computes in float32 and rounds once, to nearest even, when it writes the
state back. A value past float16's range (65504) becomes an infinity: the row is reset
as non-finite, as an overflow in float32 would be.
"""

from __future__ import annotations

import hashlib
import math

import torch

from streamlstm.anomaly import REPEAT_COUNTS, SCALES
from streamlstm.combine import experts

# state.recurrent_dtype: how a row stores the recurrent state
RECURRENT_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class RowLayout:
    """Named column ranges of a key's float32 row.

    >>> layout = RowLayout(state_shape=(1, 2, 4), width=3)
    >>> layout.columns["mean"], layout.width  # the 8 float16 state values: 4 columns
    (slice(4, 7, None), 52)
    >>> RowLayout(state_shape=(1, 2, 4), width=3, recurrent_dtype="float32").width
    56
    """

    # Page-Hinkley statistics of the key's error stream (``streamlstm.drift``) live here too,
    # so they are gathered with the row and travel with the key's snapshot.
    PH = ("ph_mean", "ph_n", "ph_inc", "ph_dec", "ph_min", "ph_max", "ph_drift")
    SCALARS: tuple[str, ...] = ("count", "has_pending", "err_mean", "err_count", "err_peak")
    SCALARS += ("err_since", "err_gap", *PH)  # the rhythm of a key's incidents (anomaly.py)

    def __init__(
        self,
        state_shape: tuple[int, int, int],
        width: int,
        typical_step: bool = False,
        recurrent_dtype: str = "float16",
        season: int | None = None,
    ) -> None:
        if recurrent_dtype not in RECURRENT_DTYPES:
            raise ValueError(f"recurrent_dtype must be one of {sorted(RECURRENT_DTYPES)}")
        self.state_shape = state_shape
        self.value_width = width
        self.season = season  # engine.season_events: the seasonal forecaster's period
        self.experts = experts(season is not None)
        self.recurrent_dtype = RECURRENT_DTYPES[recurrent_dtype]
        self.state_values = math.prod(state_shape)
        # float32 columns the state takes: two float16 values per column
        per_column = 4 // self.recurrent_dtype.itemsize
        sizes = {
            "recurrent": -(-self.state_values // per_column),
            "mean": width,
            "var": width,
            # The forecasters' own next values, side by side in ``experts`` order (one
            # [B, K, F] view, no copy): the network's, persistence's (the key's last
            # values, also its change inputs and labels), the EWMA's level and, with a
            # season, the value one period before the next event.
            "net_pending": width,
            "last": width,
            "ewma": width,
            **({"seasonal": width} if season else {}),
            "hedge": len(self.experts) * width,  # the forecasters' discounted losses
            "err_scales": len(SCALES),  # error averages over the anomaly time scales
            "err_var": len(SCALES),  # each average's long variance (autocorrelated errors)
            "err_repeats": REPEAT_COUNTS,  # exact repeats of the key's values (stuck feeds)
        }
        if season:  # the key's last `season` values, a ring, and its next slot
            sizes["season"] = season * width
            sizes["season_at"] = 1
        if typical_step:  # only engine.max_step reads it: a layout without it is 8% smaller
            sizes["step"] = width  # the key's typical absolute step-to-step change
        sizes.update(dict.fromkeys(self.SCALARS, 1))
        self.columns: dict[str, slice] = {}
        start = 0
        for name, size in sizes.items():
            self.columns[name] = slice(start, start + size)
            start += size
        self.width = start

    @property
    def fingerprint(self) -> int:
        """A 64-bit digest of the layout (field names, ranges, shapes): a persisted row
        whose fingerprint differs was written by another layout and must not be read.

        >>> RowLayout((1, 2, 4), 3).fingerprint == RowLayout((1, 2, 4), 3).fingerprint
        True
        >>> RowLayout((1, 2, 4), 3).fingerprint == RowLayout((1, 2, 8), 3).fingerprint
        False
        >>> RowLayout((2, 2, 4), 3, recurrent_dtype="float32").fingerprint == RowLayout(
        ...     (2, 2, 4), 3, recurrent_dtype="float16").fingerprint
        False
        """
        spec = repr((self.state_shape, self.value_width, sorted(self.columns.items())))
        if self.recurrent_dtype != torch.float32:  # float32 rows keep their first digest
            spec += repr(self.recurrent_dtype)
        digest = hashlib.blake2b(spec.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF

    def block(self, rows: torch.Tensor, first: str, last: str) -> torch.Tensor:
        """A ``[B, n]`` view of consecutive scalar columns ``first`` .. ``last``."""
        return rows[:, self.columns[first].start : self.columns[last].stop]

    def forecasters(self, rows: torch.Tensor) -> torch.Tensor:
        """A ``[B, len(experts), width]`` view of the forecasters' next values."""
        first, k = self.columns["net_pending"].start, len(self.experts)
        return rows[:, first : first + k * self.value_width].view(len(rows), k, self.value_width)

    def losses(self, rows: torch.Tensor) -> torch.Tensor:
        """A ``[B, len(experts), width]`` view of the forecasters' discounted losses."""
        k = len(self.experts)
        return self.field(rows, "hedge").view(len(rows), k, self.value_width)

    def field(self, rows: torch.Tensor, name: str) -> torch.Tensor:
        """A view of one field of ``rows`` ([B, width]); scalars come as ``[B]``, the
        recurrent state as ``[B, *state_shape]`` in its storage dtype."""
        view = rows[:, self.columns[name]]
        if name == "recurrent":  # float16: the float32 columns' bytes, two values each
            values = view.view(self.recurrent_dtype)[:, : self.state_values]
            return values.view(len(rows), *self.state_shape)
        return view[:, 0] if name in self.SCALARS else view
