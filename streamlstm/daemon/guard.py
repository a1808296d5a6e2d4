"""The last line of defence around the engine: one bad event never stops the daemon.

The decoder already rejects every input it can recognise as unusable, so a failure in
the engine (or in encoding its outputs) is a bug. Stopping on it would stop the whole
group on one record: every restart would read it again. Instead, the batch is retried
event by event, in input order (so each key's events keep their order); the events that
still fail alone are dead-lettered as ``internal_error`` with their traceback logged,
and everything else is predicted.

Caveat (state): the engine may have applied part of the batch before it failed (whole
chunks of ``engine.max_batch`` events, or the step groups before the failing one). Those
events are applied again by the retry, so their keys' state steps twice on the same
event. That is a small, transient distortion, chosen over losing their predictions; a
key whose own event fails is left as the engine left it. The normal path pays nothing
for this: no snapshot is taken.

A key whose event failed alone is a suspect: in later batches its events run one by
one beside the batch (splitting a batch by key keeps each key's order), so a poisoned
key does not send every batch it appears in down the slow path.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import orjson

from streamlstm.events import EventBatch, Rejection

log = logging.getLogger(__name__)

MAX_SUSPECTS = 1024  # keys remembered as failing alone (their events skip the batch path)
# (events, partitions, offsets) -> (one encoded output per event, anomalies)
Step = Callable[[EventBatch, np.ndarray, np.ndarray], tuple[list[bytes], int]]


@dataclass
class Guarded:
    """What a guarded batch produced: outputs of the ``rows`` that succeeded, in order."""

    rows: np.ndarray  # int64 positions in the batch that were predicted
    values: list[bytes]  # their encoded outputs, one per row
    anomalies: int = 0
    failures: list[Rejection] = field(default_factory=list)  # internal_error, per message


class EngineGuard:
    """Runs batches through ``step``; on failure, event by event (see the module docstring).

    Keys whose event failed alone are suspects (the last ``max_suspects``): later
    batches run without their events, which go one by one beside, so one poisoned key
    costs its own events a slow path, not every batch it appears in. A suspect whose
    event succeeds is cleared.
    """

    def __init__(self, max_suspects: int = MAX_SUSPECTS) -> None:
        self.max_suspects = max_suspects
        self.suspects: OrderedDict[str, None] = OrderedDict()

    def process(
        self,
        step: Step,
        batch: EventBatch,
        partition: np.ndarray,
        offset: np.ndarray,
        payloads: list[bytes | None],
        rejections: list[Rejection],
    ) -> Guarded:
        """Outputs of every event that succeeded, in batch order; ``internal_error`` for
        the rest (``payloads`` and the decoder's ``rejections`` locate an array element).
        """
        n = len(batch)
        ctx = _Context(step, batch, partition, offset, payloads, rejections)
        if self.suspects:
            suspect = np.fromiter((k in self.suspects for k in batch.keys), bool, n)
            if suspect.any():
                rest = self._run(ctx, np.flatnonzero(~suspect))
                alone = self._one_by_one(ctx, np.flatnonzero(suspect))
                return _merge(rest, alone)
        return self._run(ctx, np.arange(n, dtype=np.int64))

    def _run(self, ctx: _Context, rows: np.ndarray) -> Guarded:
        """``rows`` as one batch, or one by one if that fails."""
        if not len(rows):
            return Guarded(rows, [])
        whole = len(rows) == len(ctx.batch)
        try:
            values, anomalies = ctx.step(
                ctx.batch if whole else ctx.batch.take(rows),
                ctx.partition[rows],
                ctx.offset[rows],
            )
            return Guarded(rows, values, anomalies)
        except Exception:
            log.exception("a batch of %d events failed: retrying event by event", len(rows))
        guarded = self._one_by_one(ctx, rows)
        log.warning(
            "batch retried: %d events predicted, %d dead-lettered",
            len(guarded.rows),
            len(guarded.failures),
        )
        return guarded

    def _one_by_one(self, ctx: _Context, rows: np.ndarray) -> Guarded:
        done: list[int] = []
        out: list[bytes] = []
        anomalies = 0
        failures: list[Rejection] = []
        batch, partition, offset = ctx.batch, ctx.partition, ctx.offset
        for i in rows.tolist():
            one = slice(i, i + 1)
            key = batch.keys[i]
            try:
                values, hits = ctx.step(batch.take(one), partition[one], offset[one])
            except Exception as exc:
                log.error(
                    "event at partition %d offset %d (key %r) failed alone: dead-lettered as "
                    "internal_error",
                    int(partition[i]),
                    int(offset[i]),
                    key[:64],
                    exc_info=exc,
                )
                failures.append(_rejection(batch, i, exc, ctx.payloads, ctx.rejections))
                self.suspects[key] = None
                self.suspects.move_to_end(key)
                while len(self.suspects) > self.max_suspects:
                    self.suspects.popitem(last=False)
                continue
            self.suspects.pop(key, None)
            done.append(i)
            out.extend(values)
            anomalies += hits
        return Guarded(np.array(done, dtype=np.int64), out, anomalies, failures)


@dataclass
class _Context:
    step: Step
    batch: EventBatch
    partition: np.ndarray
    offset: np.ndarray
    payloads: list[bytes | None]
    rejections: list[Rejection]


def _merge(a: Guarded, b: Guarded) -> Guarded:
    """Two guarded parts of one batch, back in batch order."""
    rows = np.concatenate([a.rows, b.rows])
    values = [*a.values, *b.values]
    order = np.argsort(rows, kind="stable")
    return Guarded(
        rows[order],
        [values[i] for i in order.tolist()],
        a.anomalies + b.anomalies,
        [*a.failures, *b.failures],
    )


def merged(rejections: list[Rejection], failures: list[Rejection]) -> list[Rejection]:
    """The decoder's rejections and the engine's failures, in message (and element) order."""
    return sorted([*rejections, *failures], key=_position)


def _position(r: Rejection) -> tuple[int, int]:
    return r.message, -1 if r.element is None else r.element


def _rejection(
    batch: EventBatch,
    i: int,
    exc: BaseException,
    payloads: list[bytes | None],
    rejections: list[Rejection],
) -> Rejection:
    """An ``internal_error`` for event ``i``: its message, or its element of an array."""
    message = int(batch.source[i])
    try:
        detail = f"engine: {type(exc).__name__}: {exc}"[:200]
    except Exception:
        detail = f"engine: {type(exc).__name__}"
    payload = payloads[message]
    if payload is None or payload.lstrip()[:1] != b"[":
        return Rejection(message, None, "internal_error", detail)
    # The j-th event decoded from this array is its j-th element not rejected by the decoder.
    j = int(np.count_nonzero(batch.source[:i] == message))
    skipped = {r.element for r in rejections if r.message == message and r.element is not None}
    element = -1
    while j >= 0:
        element += 1
        if element not in skipped:
            j -= 1
    event: dict[str, object] = {
        "key": batch.keys[i],
        "ts": float(batch.ts[i]),
        "values": batch.values[i].tolist(),
    }
    if batch.target is not None and not np.isnan(batch.target[i]).all():
        event["target"] = batch.target[i].tolist()
    return Rejection(message, element, "internal_error", detail, orjson.dumps(event))
