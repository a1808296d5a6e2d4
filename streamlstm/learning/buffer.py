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
chunk in one vectorised pass, linking each key's steps with a segmented scan. Writers
never wait: readers (:mod:`streamlstm.learning.windows`) copy what they need and then
check that nothing they copied was overwritten meanwhile.

**Labels.** A label is the correction the prediction at step t should have made to the
key's values, in the units that prediction was made in. In self-supervised mode that is
the key's change to step t+1, ``(v[t+1] - v[t]) / std[t]`` with the key's scaler as it
was at step t, so training minimises exactly the error the engine scores; it is written
into row t when step t+1 arrives. An event with an explicit ``target`` carries its own
label at once, ``(target - v[t]) / std[t]``, and keeps it.

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
from streamlstm.learning.windows import ReplayReader

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


def ring_sizes(
    width: int, state_shape: tuple[int, int, int], budget_bytes: int, stride: int
) -> tuple[int, int]:
    """Rows and snapshots that fit the budget (two snapshots per ``stride`` rows)."""
    row_bytes = 8 * width + 4 * 8
    snap_bytes = 4 * math.prod(state_shape) + 2 * 8
    rows = int(budget_bytes // (row_bytes + 2 * snap_bytes / stride))
    return rows, max(4, math.ceil(2 * rows / stride))


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
