"""Drift detectors over the prediction-error stream: one global, one per key.

* **Global**: river's ADWIN over the mean error of each block of ``drift.adwin_block``
  scored events (in each key's own standard-deviation units, so keys of any scale
  weigh alike). A few updates per batch cost nothing per event, and fixed blocks keep
  ADWIN's samples alike whatever the batch sizes (which follow the load); ADWIN then
  says when the stream as a whole got harder. The event closing the block is marked.
* **Per key**: the Page-Hinkley test, vectorised over all keys of a batch. Its
  statistics are columns of the key's state row (``streamlstm.rows.RowLayout.PH``), so they are
  gathered with the row, persisted with it, and cost a few element-wise tensor ops
  per batched step. The semantics are exactly ``river.drift.PageHinkley``'s
  (``tests/test_drift_page_hinkley.py`` feeds both the same sequences), including its
  quirks: the mean is a plain running mean, the statistics reset on the update
  *after* a detection, and the decrease maximum starts at -1.

>>> import torch
>>> ph = VectorPageHinkley(2, threshold=5.0, min_instances=5, mode="both")
>>> points = [ph.update(torch.tensor([0.0, 0.0] if t < 20 else [0.0, 3.0])) for t in range(30)]
>>> [t for t, hit in enumerate(points) if hit[1]], [t for t, hit in enumerate(points) if hit[0]]
([21], [])
"""

from __future__ import annotations

import math

import numpy as np
import torch

from streamlstm.config import DriftSettings

DETECTORS = ("adwin", "page_hinkley")


# A stream's statistics: mean, n, increase sum, decrease sum, increase min, decrease max,
# drift flag. ``n == 0`` marks a stream that has not started (state rows start as zeros),
# so the initial min (+inf) and max (-1, river's value) need not be stored.
PH_FIELDS = ("ph_mean", "ph_n", "ph_inc", "ph_dec", "ph_min", "ph_max", "ph_drift")
_INITIAL = (0.0, 0.0, 0.0, 0.0, math.inf, -1.0, 0.0)


def page_hinkley_update(
    block: torch.Tensor,
    x: torch.Tensor,
    active: torch.Tensor | None,
    delta: float,
    threshold: float,
    alpha: float,
    min_instances: int,
    mode: str = "both",
) -> torch.Tensor:
    """Feed ``x[i]`` to stream ``i`` where ``active[i]``; return where drift was detected.

    ``block`` is ``[B, 7]`` (see ``PH_FIELDS``), updated in place; streams that are not
    active keep their statistics. Mirrors ``river.drift.PageHinkley.update`` line by
    line, in the same order of floating-point operations.
    """
    n, drift = block[:, 1], block[:, 6]
    reset = ((n == 0) | (drift > 0)).unsqueeze(1)
    initial = torch.tensor(_INITIAL, dtype=block.dtype)
    mean, n, inc, dec, low, high, _ = torch.where(reset, initial, block).unbind(1)
    n = n + 1
    mean = mean + (x - mean) / n
    dev = x - mean
    inc = alpha * inc + dev - delta
    dec = alpha * dec + dev + delta
    low = torch.minimum(low, inc)
    high = torch.maximum(high, dec)
    if mode == "up":
        test = inc - low > threshold
    elif mode == "down":
        test = high - dec > threshold
    else:
        test = (inc - low > threshold) | (high - dec > threshold)
    hit = test & (n >= min_instances)
    if active is not None:
        hit &= active
    new = torch.stack((mean, n, inc, dec, low, high, hit.to(block.dtype)), 1)
    block.copy_(new if active is None else torch.where(active.unsqueeze(1), new, block))
    return hit


class VectorPageHinkley:
    """``size`` independent Page-Hinkley tests, updated together (river's defaults)."""

    def __init__(
        self,
        size: int,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 0.0001,
        mode: str = "both",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if mode not in ("up", "down", "both"):
            raise ValueError(f"mode must be up, down or both, got {mode!r}")
        self.block = torch.zeros(size, len(PH_FIELDS), dtype=dtype)
        self.params = (delta, threshold, alpha, min_instances, mode)

    def update(self, x: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """One value per stream; returns a bool tensor of detections."""
        x = x.to(self.block.dtype)
        return page_hinkley_update(self.block, x, active, *self.params)


class DriftMonitor:
    """The detectors of one engine: per-key Page-Hinkley in state rows, global ADWIN."""

    def __init__(self, settings: DriftSettings) -> None:
        from river.drift import ADWIN  # river is heavy to import; only engines need it

        self.settings = settings
        self.enabled = settings.enabled
        self.adwin = ADWIN(delta=settings.adwin_delta)
        self._block_sum = 0.0
        self._block_count = 0

    def per_key(
        self, block: torch.Tensor, error: torch.Tensor, scored: torch.Tensor
    ) -> torch.Tensor:
        """Update the keys' Page-Hinkley columns ([B, 7] view of their state rows) with
        their std-unit errors; returns the keys where drift was detected."""
        s = self.settings
        return page_hinkley_update(
            block,
            torch.nan_to_num(error),
            scored,
            s.ph_delta,
            s.ph_threshold,
            s.ph_alpha,
            s.ph_min_instances,
            s.ph_mode,
        )

    def global_errors(self, scaled_error: np.ndarray) -> list[int]:
        """Feed a batch's std-unit errors (NaN: unscored) into ADWIN's blocks; return the
        batch positions of events that closed a block on which ADWIN detected drift."""
        known = np.flatnonzero(~np.isnan(scaled_error))
        values = scaled_error[known].astype(np.float64)
        block = self.settings.adwin_block
        hits = []
        pos = 0
        while pos < len(values):
            take = min(block - self._block_count, len(values) - pos)
            self._block_sum += float(values[pos : pos + take].sum())
            self._block_count += take
            pos += take
            if self._block_count == block:
                self.adwin.update(self._block_sum / block)
                self._block_sum, self._block_count = 0.0, 0
                if self.adwin.drift_detected:
                    hits.append(int(known[pos - 1]))
        return hits
