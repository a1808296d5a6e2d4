"""Reading the replay buffer: finding complete windows, sampling them, copying them out.

Readers never block the writer (:mod:`streamlstm.learning.buffer`): they copy what
they need and then check, from the ring's published write heads, that nothing they
copied was overwritten meanwhile (a seqlock), dropping windows that were.

**Windows and burn-in.** A window is ``window`` consecutive steps of one key starting
at a snapshot; the first ``burn_in`` steps run without gradient from the stored state
(which the serving weights produced, so it is slightly stale after an update), and
only the rest is trained and scored.

**Sampling.** Training windows are drawn with probability proportional to
``recency / windows of the key``: every key gets the same total weight, so the busiest
key does not dominate, and recency halves every ``recency_half_life`` share of the rows
held, so recent data is favoured while the oldest still gets a look (1/16 at the
default 0.25). Validation windows are those holding rows newer than a cut (the rows
the candidate under test had not seen), newest first and round-robin over keys (each
key's newest window before any key's second newest), scored on those rows only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from streamlstm.learning.buffer import Ring


@dataclass
class Candidates:
    """Complete windows found in the ring (positions resolved, data not yet copied)."""

    pos: torch.Tensor  # int64 [N, W] ring positions of the window's rows
    snap_pos: torch.Tensor  # int64 [N]
    snap_seq: torch.Tensor  # int64 [N]
    slot: torch.Tensor  # int64 [N]
    start: torch.Tensor  # int64 [N] global row number of the first row
    end: torch.Tensor  # int64 [N] global row number of the last row
    rows_written: int

    def __len__(self) -> int:
        return self.start.numel()

    def take(self, index: torch.Tensor) -> Candidates:
        return Candidates(
            self.pos[index],
            self.snap_pos[index],
            self.snap_seq[index],
            self.slot[index],
            self.start[index],
            self.end[index],
            self.rows_written,
        )


@dataclass
class Windows:
    """Copied training windows, time-major for the recurrent layers."""

    x: torch.Tensor  # [W, N, F]
    y: torch.Tensor  # [W, N, F]
    state: torch.Tensor  # [N, layers, parts, hidden]
    slot: torch.Tensor  # [N]

    def __len__(self) -> int:
        return self.state.shape[0]

    def take(self, index: torch.Tensor | slice) -> Windows:
        return Windows(self.x[:, index], self.y[:, index], self.state[index], self.slot[index])

    def to(self, device: torch.device | str) -> Windows:
        return Windows(*(t.to(device) for t in (self.x, self.y, self.state, self.slot)))


class ReplayReader:
    """Finds, selects and copies windows; safe to use while the engine keeps writing.

    Picklable with the ring's tensors, so a child process can read shared memory.
    """

    def __init__(self, ring: Ring, window: int, burn_in: int, half_life: float) -> None:
        self.ring = ring
        self.window = window
        self.burn_in = burn_in
        self.half_life = half_life

    def candidates(self) -> Candidates:
        """Every window whose rows and labels are all present, in the ring right now."""
        r, w = self.ring, self.window
        rows_written, snaps_written = r.heads.tolist()
        seq = torch.arange(max(0, snaps_written - r.snaps), snaps_written)
        spos = seq % r.snaps
        start = r.snap_row[spos]
        ok = (r.snap_seq[spos] == seq) & (start >= max(0, rows_written - r.rows))
        seq, spos, start = seq[ok], spos[ok], start[ok]
        first = start % r.rows
        slot, step0 = r.slot[first], r.step[first]
        ok = r.ids[first] == start
        pos = torch.empty(len(start), w, dtype=torch.int64)
        cur = start
        for t in range(w):
            p = cur.clamp(min=0) % r.rows
            ok &= (cur >= 0) & (r.ids[p] == cur) & (r.slot[p] == slot) & (r.step[p] == step0 + t)
            if t >= self.burn_in:
                ok &= ~torch.isnan(r.y[p]).any(1)
            pos[:, t] = p
            end = cur
            cur = r.next[p] if t + 1 < w else cur
        # Rows overwritten while we looked are caught by the head check, here and in gather.
        ok &= start >= r.heads[0].item() - r.rows
        keep = torch.nonzero(ok).flatten()
        keep = keep[torch.argsort(start[keep])]  # canonical order: by first row
        return Candidates(
            pos[keep], spos[keep], seq[keep], slot[keep], start[keep], end[keep], rows_written
        )

    def newest_first(self, cands: Candidates, index: torch.Tensor) -> torch.Tensor:
        """``index`` ordered newest first, round-robin over keys: every key's newest
        window, then every key's second newest, and so on."""
        by_new = index[torch.argsort(cands.start[index], descending=True, stable=True)]
        grouped = by_new[torch.argsort(cands.slot[by_new], stable=True)]
        slots = cands.slot[grouped]
        first = torch.ones(len(grouped), dtype=torch.bool)
        first[1:] = slots[1:] != slots[:-1]
        positions = torch.arange(len(grouped))
        group_start = torch.cummax(torch.where(first, positions, 0), 0).values
        rank = torch.empty(len(cands), dtype=torch.int64)
        rank[grouped] = positions - group_start
        return by_new[torch.argsort(rank[by_new], stable=True)]

    def split(
        self, cands: Candidates, n_val: int, cut: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validation windows (those holding rows newer than ``cut``, newest first,
        round-robin over keys), training windows (all) and their sampling weights
        (key-balanced, favouring recent windows)."""
        fresh = torch.nonzero(cands.end > cut).flatten()
        val = self.newest_first(cands, fresh)[:n_val]
        key_ids, inverse = torch.unique(cands.slot, return_inverse=True)
        per_key = torch.bincount(inverse, minlength=len(key_ids))
        age = (cands.rows_written - cands.end).double()
        held = min(cands.rows_written, self.ring.rows)
        recency = torch.pow(0.5, age / max(1.0, self.half_life * held))
        return val, torch.arange(len(cands)), recency / per_key[inverse]

    def gather(self, cands: Candidates, cut: int | None = None) -> Windows:
        """Copy windows out of the ring (labels of rows up to ``cut`` masked, for scoring
        only newer rows); drop any window overwritten while copying."""
        r = self.ring
        x, y = r.x[cands.pos], r.y[cands.pos]
        if cut is not None:
            y = torch.where((r.ids[cands.pos] <= cut).unsqueeze(-1), math.nan, y)
        state = r.snap_state[cands.snap_pos]
        rows_written, snaps_written = r.heads.tolist()
        ok = (cands.start >= rows_written - r.rows) & (cands.snap_seq >= snaps_written - r.snaps)
        keep = torch.nonzero(ok).flatten()
        return Windows(
            x[keep].transpose(0, 1).contiguous(),
            y[keep].transpose(0, 1).contiguous(),
            state[keep],
            cands.slot[keep],
        )

    def sample(
        self, n_train: int, n_val: int, generator: torch.Generator, cut: int = -1
    ) -> tuple[Windows, Windows, int] | None:
        """``n_train`` training windows (drawn with replacement), up to ``n_val``
        validation windows scored only on rows newer than ``cut``, and the rows written
        so far (the next run's cut); None when the ring holds no complete window."""
        cands = self.candidates()
        if len(cands) == 0:
            return None
        val, train, weights = self.split(cands, n_val, cut)
        picks = train[torch.multinomial(weights, n_train, replacement=True, generator=generator)]
        train_w = self.gather(cands.take(picks))
        if len(train_w) == 0:
            return None
        return train_w, self.gather(cands.take(val), cut), cands.rows_written
