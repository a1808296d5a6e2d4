"""Bounded replay buffer of each key's recent normalised steps, with stored start states.

**Layout.** One global ring of rows, one row per recorded step of any key: the
network's input ``x`` (before clipping), its label ``y`` and the row's place in its
key's chain (``slot``, ``step``, ``next``). A key's rows are linked in order by ``next``,
so the ring holds every key's recent history without reserving space per key (a key
that is quiet for a while simply has older rows). Every ``stride`` steps of a key, the
recurrent state *before* that step is stored in a second ring: a snapshot, where a
training window may start. Both rings are preallocated from ``training.replay_bytes``;
the oldest rows and snapshots are overwritten first. Rows are numbered in event order
(not in the engine's grouping), so the ring does not depend on batch sizes. The buffer
is the engine's :class:`~streamlstm.engine.StepConsumer`: it keeps each
:class:`~streamlstm.engine.StepRecord` of a chunk (a list append) and writes the whole
chunk in one vectorised pass, linking each key's steps with a segmented scan. Writers never wait:
readers copy what they need and then check, from the published write heads, that
nothing they copied was overwritten meanwhile (a seqlock), dropping windows that were.

**Labels.** A label is the correction the prediction at step t should have made to the
key's values, in the units that prediction was made in. In self-supervised mode that is
the key's change to step t+1, ``(v[t+1] - v[t]) / std[t]`` with the key's scaler as it
was at step t, so training minimises exactly the error the engine scores; it is written
into row t when step t+1 arrives. An event with an explicit ``target`` carries its own
label at once, ``(target - v[t]) / std[t]``, and keeps it.

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

>>> buf = ReplayBuffer(width=1, state_shape=(1, 1, 2), budget_bytes=2**16, window=4, burn_in=1)
>>> for t in range(12):  # one key (slot 3), one event per chunk
...     v = torch.tensor([[float(t)]])
...     buf.begin(events=1, capacity=4)
...     buf.record(StepRecord(torch.tensor([3]), v, v, torch.tensor([t + 1.0]),
...                           torch.zeros(1, 1, 1, 2), positions=torch.tensor([0])))
...     buf.end()
>>> cands = buf.reader().candidates()
>>> cands.start.tolist()  # windows start at steps 0, 2, 4, 6 (steps 8+ lack labels or rows)
[0, 2, 4, 6]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from streamlstm.config import Settings
from streamlstm.engine import StepRecord

_EXACT_COUNT = 2**24  # float32 counts stop growing here; treat equal counts as continuing


@dataclass
class Ring:
    """The buffer's storage (shared memory when a child process reads it)."""

    x: torch.Tensor  # float32 [R, F] normalised inputs (not clipped)
    y: torch.Tensor  # float32 [R, F] labels, NaN until known
    ids: torch.Tensor  # int64 [R] global row number held at this position, -1: empty
    slot: torch.Tensor  # int64 [R] the key's slot in the state store
    step: torch.Tensor  # int64 [R] position in the key's chain
    next: torch.Tensor  # int64 [R] global row number of the key's next row, -1: none yet
    snap_state: torch.Tensor  # float32 [S, layers, parts, hidden] state before the row
    snap_row: torch.Tensor  # int64 [S] global row number where the window starts
    snap_seq: torch.Tensor  # int64 [S] snapshot number held at this position, -1: empty
    heads: torch.Tensor  # int64 [2] rows and snapshots written (published before writing)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def snaps(self) -> int:
        return self.snap_row.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in vars(self).values())


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


def ring_sizes(
    width: int, state_shape: tuple[int, int, int], budget_bytes: int, stride: int
) -> tuple[int, int]:
    """Rows and snapshots that fit the budget (two snapshots per ``stride`` rows)."""
    row_bytes = 8 * width + 4 * 8
    snap_bytes = 4 * math.prod(state_shape) + 2 * 8
    rows = int(budget_bytes // (row_bytes + 2 * snap_bytes / stride))
    return rows, max(4, math.ceil(2 * rows / stride))


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


class _Kept(NamedTuple):
    """A recorded step until its chunk is written: the record, which of its rows start a
    snapshot, and those rows' states (copied: the engine overwrites the state)."""

    step: StepRecord
    snap: torch.Tensor  # bool [B]
    snap_state: torch.Tensor  # [snapshots, layers, parts, hidden]


class ReplayBuffer:
    """The writer side: the engine's :class:`~streamlstm.engine.StepConsumer` (see module
    docs)."""

    def __init__(
        self,
        width: int,
        state_shape: tuple[int, int, int],
        budget_bytes: int,
        window: int,
        burn_in: int = 0,
        half_life: float = 0.25,
        stride: int | None = None,
        shared: bool = False,
    ) -> None:
        self.width = width
        self.state_shape = state_shape
        self.window = window
        self.burn_in = burn_in
        self.half_life = half_life
        self.stride = stride or max(1, window // 2)
        rows, snaps = ring_sizes(width, state_shape, budget_bytes, self.stride)
        if rows < 2 * window:
            raise ValueError(
                f"training.replay_bytes={budget_bytes} holds {rows} rows, fewer than two "
                f"windows of {window}; raise it or lower training.window"
            )
        self.ring = Ring(
            x=torch.zeros(rows, width),
            y=torch.full((rows, width), math.nan),
            ids=torch.full((rows,), -1, dtype=torch.int64),
            slot=torch.zeros(rows, dtype=torch.int64),
            step=torch.zeros(rows, dtype=torch.int64),
            next=torch.full((rows,), -1, dtype=torch.int64),
            snap_state=torch.zeros(snaps, *state_shape),
            snap_row=torch.full((snaps,), -1, dtype=torch.int64),
            snap_seq=torch.full((snaps,), -1, dtype=torch.int64),
            heads=torch.zeros(2, dtype=torch.int64),
        )
        if shared:
            for tensor in vars(self.ring).values():
                tensor.share_memory_()
        self._rows = 0
        self._base = 0  # first row number of the chunk being recorded (see begin)
        self._kept: list[_Kept] = []
        self._snaps = 0
        # Per-slot writer bookkeeping (grows with the state store).
        self.last_id = torch.zeros(0, dtype=torch.int64)
        self.last_count = torch.zeros(0)
        self.chain_step = torch.zeros(0, dtype=torch.int64)

    @classmethod
    def from_settings(
        cls, settings: Settings, state_shape: tuple[int, int, int], width: int, shared: bool = False
    ) -> ReplayBuffer:
        t = settings.training
        return cls(
            width,
            state_shape,
            t.replay_bytes,
            t.window,
            t.burn_in,
            t.recency_half_life,
            shared=shared,
        )

    def reader(self) -> ReplayReader:
        return ReplayReader(self.ring, self.window, self.burn_in, self.half_life)

    @property
    def rows_written(self) -> int:
        return self._rows

    def nbytes(self) -> int:
        """Memory of the rings plus the per-key bookkeeping."""
        meta = self.last_id, self.last_count, self.chain_step
        return self.ring.nbytes() + sum(t.numel() * t.element_size() for t in meta)

    def ensure_slots(self, capacity: int) -> None:
        """Grow the per-slot bookkeeping to the state store's capacity."""
        old = self.last_id.numel()
        if capacity <= old:
            return
        grown = max(capacity, 2 * old)
        self.last_id = torch.cat([self.last_id, torch.full((grown - old,), -1)])
        self.last_count = torch.cat([self.last_count, torch.zeros(grown - old)])
        self.chain_step = torch.cat([self.chain_step, torch.zeros(grown - old, dtype=torch.int64)])

    def begin(self, events: int, capacity: int) -> None:
        """Reserve row numbers for a chunk of ``events`` events, in event order, so the
        ring's layout does not depend on how the engine groups or sizes batches (and grow
        the per-slot bookkeeping to the store's ``capacity``). The chunk's steps are then
        :meth:`record`-ed and written together by :meth:`end`."""
        self.ensure_slots(capacity)
        self._base = self._rows
        self._rows += events
        self.ring.heads[0] = self._rows  # publish first: readers re-check after copying
        self._kept = []

    def record(self, step: StepRecord) -> None:
        """Keep one batched step of the chunk (cheap: written by :meth:`end`)."""
        # Snapshot every `stride`-th event of a key (its first included): only those
        # states are copied, since the state tensor is overwritten after the step.
        snap = torch.remainder(step.count - 1, self.stride) == 0
        self._kept.append(_Kept(step, snap, step.state[snap]))

    def end(self) -> None:
        """Write the chunk's recorded steps into the ring in one vectorised pass."""
        kept, self._kept = self._kept, []
        if not kept:
            return
        r = self.ring
        steps = [k.step for k in kept]
        slots = torch.cat([p.slots for p in steps])
        x = torch.cat([p.x for p in steps])
        label_prev = torch.cat([p.label_prev for p in steps])
        count = torch.cat([p.count for p in steps])
        positions = torch.cat([p.positions for p in steps])
        n = slots.numel()
        if int(slots.max()) >= self.last_id.numel():
            self.ensure_slots(int(slots.max()) + 1)
        ids = positions + self._base
        pos = ids % r.rows

        # Chains: a key's steps are in event order within the chunk (groups are ranks),
        # so a stable sort by slot lines each key's steps up; the first continues the
        # key's chain from earlier chunks if its event count follows on.
        order = torch.argsort(slots, stable=True)
        ss, sid, scount = slots[order], ids[order], count[order]
        first = torch.ones(n, dtype=torch.bool)
        first[1:] = ss[1:] != ss[:-1]
        prev = torch.where(first, self.last_id[ss], torch.roll(sid, 1))
        prev_count = torch.where(first, self.last_count[ss], torch.roll(scount, 1))
        same = (scount == prev_count + 1) | ((scount == prev_count) & (scount >= _EXACT_COUNT))
        cont = (prev >= 0) & same
        index = torch.arange(n)
        run_start = torch.cummax(torch.where(first | ~cont, index, 0), 0).values
        base = torch.where(cont & first, self.chain_step[ss] + 1, 0)
        sstep = base[run_start] + (index - run_start)

        r.x.index_copy_(0, pos, x)
        if all(p.own_label is None for p in steps):
            r.y.index_fill_(0, pos, math.nan)
        else:
            own = [
                torch.full_like(p.x, math.nan) if p.own_label is None else p.own_label
                for p in steps
            ]
            r.y.index_copy_(0, pos, torch.cat(own))
        spos = pos[order]
        r.slot.index_copy_(0, spos, ss)
        r.step.index_copy_(0, spos, sstep)
        r.next.index_fill_(0, pos, -1)
        r.ids.index_copy_(0, pos, ids)
        # Link each step to the key's previous row (if still held) and label that row.
        link = torch.nonzero(cont & (prev >= self._rows - r.rows)).flatten()
        at = prev[link] % r.rows
        r.next.index_copy_(0, at, sid[link])
        old = r.y[at]
        fresh = label_prev[order][link]
        r.y.index_copy_(0, at, torch.where(torch.isnan(old), fresh, old))
        last = torch.ones(n, dtype=torch.bool)
        last[:-1] = ss[1:] != ss[:-1]
        self.last_id[ss[last]] = sid[last]
        self.last_count[ss[last]] = scount[last]
        self.chain_step[ss[last]] = sstep[last]

        snap = torch.cat([k.snap for k in kept])
        k = int(snap.sum())
        if k:
            start = self._snaps
            self._snaps = start + k
            r.heads[1] = self._snaps
            seq = torch.arange(start, start + k)
            at = seq % r.snaps
            r.snap_state.index_copy_(0, at, torch.cat([k.snap_state for k in kept]))
            r.snap_row.index_copy_(0, at, ids[snap])
            r.snap_seq.index_copy_(0, at, seq)
