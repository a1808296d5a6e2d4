"""What the engine hands out: a batch's per-event outputs and, to learning, its steps.

:class:`BatchOutput` holds a micro-batch's results in columns (one row per event);
:class:`StepRecord` is one batched recurrent step, handed to a :class:`StepConsumer`
(the replay buffer, pretraining) with the state before the step; :func:`step_groups`
splits a batch into those steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One batched recurrent step of distinct keys: what the engine hands to learning.

    The tensors are the engine's: a consumer keeps references only to what the engine
    does not change afterwards, and copies the state (the step overwrites it).
    """

    slots: torch.Tensor  # int64 [B] the keys' slots in the state store
    x: torch.Tensor  # float32 [B, F] the network's inputs, before clipping
    label_prev: torch.Tensor  # float32 [B, F] this event as the label of the key's last step
    count: torch.Tensor  # float32 [B] the key's events including this one (a break: new key)
    state: torch.Tensor  # float32 [B, layers, parts, hidden] recurrent state before the step
    positions: torch.Tensor  # int64 [B] the events' places in the chunk (see begin)
    own_label: torch.Tensor | None = None  # float32 [B, F] explicit labels (NaN: none)


class StepConsumer(Protocol):
    """Where the engine's steps go, chunk by chunk (the replay buffer; pretraining)."""

    def begin(self, events: int, capacity: int) -> None:
        """A chunk of ``events`` events starts; the state store has ``capacity`` slots."""

    def record(self, step: StepRecord) -> None:
        """One batched step of the chunk; a key's steps come in its event order."""

    def end(self) -> None:
        """The chunk is complete."""


@dataclass
class BatchOutput:
    """Engine results in columns, row ``i`` for event ``i`` of the input batch."""

    keys: list[str]
    ts: np.ndarray  # float64 [N]
    prediction: np.ndarray  # float32 [N, F], input units
    error: np.ndarray  # float32 [N], NaN where there was nothing to score
    squared_error: np.ndarray  # float32 [N], mean over features, NaN like error
    anomaly_score: np.ndarray  # float32 [N], NaN where error is NaN
    model_version: int
    drift: np.ndarray | None = None  # bool [N], set by the drift detectors
    scaled_error: np.ndarray | None = None  # float32 [N], error in the key's std units
    detections: dict[str, int] = field(default_factory=dict)  # detector -> drifts this batch

    def __len__(self) -> int:
        return len(self.keys)

    def records(self) -> Iterator[dict[str, Any]]:
        """One JSON-ready dict per event (NaN becomes None)."""
        predictions = self.prediction.tolist()
        errors = self.error.tolist()
        scores = self.anomaly_score.tolist()
        ts = self.ts.tolist()
        drift = self.drift.tolist() if self.drift is not None else None
        for i, key in enumerate(self.keys):
            error = errors[i]
            record = {
                "key": key,
                "ts": ts[i],
                "prediction": predictions[i],
                "error": None if error != error else error,
                "anomaly_score": None if error != error else scores[i],
                "model_version": self.model_version,
            }
            if drift is not None and drift[i]:
                record["drift"] = True
            yield record


def step_groups(slots: np.ndarray) -> list[np.ndarray]:
    """Split batch positions into batched steps: group r holds every key's r-th event.

    Within a group, positions are ordered by slot, so the gather and scatter walk the
    state table in memory order.

    >>> [g.tolist() for g in step_groups(np.array([7, 3, 7, 7, 1]))]
    [[4, 1, 0], [2], [3]]
    """
    order = np.argsort(slots, kind="stable")
    ordered = slots[order]
    starts = np.ones(len(slots), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    positions = np.arange(len(slots))
    rank = positions - np.maximum.accumulate(np.where(starts, positions, 0))
    if len(rank) == 0:
        return []
    return [order[rank == r] for r in range(int(rank.max()) + 1)]
