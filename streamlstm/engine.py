"""The micro-batch step: decoded events in, prediction records out. No Kafka here.

For each event, in the key's arrival order:

1. score the key's pending prediction against the new values (``error``: mean absolute
   error over features, input units) and turn it into an ``anomaly_score``;
2. update the key's online scaler and normalise the values;
3. advance the key's recurrent state one step and predict its next values;
4. de-normalise the prediction and keep it pending for the key's next event.

All keys of a batch advance together: the k-th events of all keys present form one
batched step, so a batch costs ``max events per key`` model calls, not one per event.

>>> from streamlstm.config import load_settings
>>> from streamlstm.events import EventBatch
>>> settings = load_settings(overrides={"model.input_size": "2", "model.hidden_size": "8"})
>>> engine = Engine.from_settings(settings)
>>> out = engine.process(EventBatch.from_arrays(["a", "a"], [0, 1], [[1, 2], [1, 2]]))
>>> [r["error"] for r in out.records()]
[None, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from streamlstm import anomaly
from streamlstm.config import Settings
from streamlstm.events import EventBatch
from streamlstm.model import RecurrentModel, quantize_for_inference
from streamlstm.state import KeyedState

_VAR_EPS = 1e-8

# (slots, normalised inputs [B, F], recurrent state before the step [B, L, P, H])
StepRecorder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


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


class Engine:
    """Per-key recurrent inference over micro-batches, with weights swappable between them."""

    def __init__(self, model: RecurrentModel, settings: Settings, model_version: int = 0) -> None:
        torch.set_num_threads(settings.engine.torch_threads)
        self.settings = settings
        self.model = model.eval()
        self._inference_model = self._prepare(model)
        self.model_version = model_version
        self.store = KeyedState(
            state_shape=model.state_shape,
            width=model.input_size,
            max_keys=settings.state.max_keys,
            ttl_seconds=settings.state.ttl_seconds,
            initial_capacity=settings.state.initial_capacity,
        )
        self.recorder: StepRecorder | None = None
        self._offered: tuple[dict[str, torch.Tensor], int] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, model_version: int = 0) -> Engine:
        """An engine with a freshly initialised model (seeded by ``model.seed``)."""
        m = settings.model
        if m.input_size is None:
            raise ValueError("model.input_size is not set")
        model = RecurrentModel(m.input_size, m.hidden_size, m.num_layers, m.cell, m.dropout, m.seed)
        return cls(model, settings, model_version)

    def _prepare(self, model: RecurrentModel) -> RecurrentModel:
        return quantize_for_inference(model) if self.settings.model.quantize else model

    # -- weights -----------------------------------------------------------------

    def offer_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Queue new weights; they take effect at the start of the next batch, never inside one."""
        self._offered = (state_dict, version)

    def _adopt_offered(self) -> None:
        offered, self._offered = self._offered, None
        if offered is None:
            return
        state_dict, version = offered
        self.model.load_state_dict(state_dict)
        self.model.eval()
        self._inference_model = self._prepare(self.model)
        self.model_version = version

    # -- the step ----------------------------------------------------------------

    @torch.inference_mode()
    def process(
        self,
        batch: EventBatch,
        partition: np.ndarray | None = None,
        offset: np.ndarray | None = None,
    ) -> BatchOutput:
        """Run a batch of events (any size; split into ``engine.max_batch`` chunks)."""
        self._adopt_offered()
        n, width = len(batch), self.model.input_size
        prediction = np.empty((n, width), dtype=np.float32)
        error = np.full(n, np.nan, dtype=np.float32)
        squared = np.full(n, np.nan, dtype=np.float32)
        score = np.full(n, np.nan, dtype=np.float32)
        step = self.settings.engine.max_batch
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            self._process_chunk(
                batch.take(rows) if n > step else batch,
                None if partition is None else partition[rows],
                None if offset is None else offset[rows],
                (prediction[rows], error[rows], squared[rows], score[rows]),
            )
        return BatchOutput(
            batch.keys, batch.ts, prediction, error, squared, score, self.model_version
        )

    def _process_chunk(
        self,
        batch: EventBatch,
        partition: np.ndarray | None,
        offset: np.ndarray | None,
        outputs: tuple[np.ndarray, ...],
    ) -> None:
        """Run one chunk, writing prediction, error, squared error and score into ``outputs``."""
        slots = self.store.assign(batch.keys, batch.ts, partition)
        values = torch.from_numpy(batch.values)
        target = None if batch.target is None else torch.from_numpy(batch.target)
        ts = torch.from_numpy(batch.ts)
        columns = [torch.from_numpy(a) for a in outputs]
        for group in step_groups(slots):
            rows = torch.from_numpy(group)

            def pick(t: torch.Tensor, rows: torch.Tensor = rows) -> torch.Tensor:
                return t.index_select(0, rows)

            s = pick(torch.from_numpy(slots))
            results = self._step_group(s, pick(values), None if target is None else pick(target))
            self.store.last_ts[s] = pick(ts)
            if offset is not None:
                self.store.offset[s] = pick(torch.from_numpy(offset))
            for column, result in zip(columns, results, strict=True):
                column.index_copy_(0, rows, result)

    def _step_group(
        self, s: torch.Tensor, x: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """One event for each of B distinct keys (slots ``s``): score, normalise, step.

        The keys' rows are gathered once, updated through field views, and written back
        with one ``index_copy_``.
        """
        cfg = self.settings
        clip = cfg.engine.input_clip
        rows = self.store.table.index_select(0, s)
        field = partial(self.store.layout.field, rows)
        mean, var, count, has_pending = (
            field("mean"),
            field("var"),
            field("count"),
            field("has_pending"),
        )

        # 1. Score the pending prediction, in input units and in the key's std units.
        pending = has_pending > 0
        diff = x - field("pending")
        abs_err = diff.abs()
        err = torch.where(pending, abs_err.mean(1), torch.nan)
        squared = torch.where(pending, (diff * diff).mean(1), torch.nan)
        std_err = (abs_err / torch.sqrt(var + _VAR_EPS)).clamp(max=clip).mean(1)
        score = self._score(field, std_err, pending)

        # 2. Online scaler: exact mean/variance for `scaler_window` events, then exponential.
        count += 1
        alpha = (1.0 / count.clamp(max=cfg.state.scaler_window)).unsqueeze(1)
        delta = x - mean
        mean += alpha * delta
        var.copy_((1.0 - alpha) * (var + alpha * delta * delta))
        std = torch.sqrt(var + _VAR_EPS)
        xn = ((x - mean) / std).clamp(-clip, clip)

        # 3. One batched recurrent step.
        state = field("recurrent")
        if self.recorder is not None:
            self.recorder(s, xn, state)
        pred_n, new_state = self._inference_model.step(xn, state)
        pred = pred_n * std + mean
        state.copy_(new_state)
        field("pending").copy_(pred)

        # 4. With an explicit target the prediction is scored at once, not left pending.
        if target is None:
            has_pending.fill_(1.0)
        else:
            labelled = ~torch.isnan(target).any(1)
            has_pending.copy_((~labelled).float())
            target_diff = pred - target
            target_err = target_diff.abs()
            err = torch.where(labelled, target_err.mean(1), err)
            squared = torch.where(labelled, (target_diff * target_diff).mean(1), squared)
            target_std_err = (target_err / std).clamp(max=clip).mean(1)
            score = torch.where(labelled, self._score(field, target_std_err, labelled), score)
        self.store.table.index_copy_(0, s, rows)
        self.store.dirty[s] = True
        return pred, err, squared, torch.where(torch.isnan(err), torch.nan, score)

    def _score(
        self, field: Callable[[str], torch.Tensor], std_err: torch.Tensor, scored: torch.Tensor
    ) -> torch.Tensor:
        """Anomaly score for rows in ``scored``; other rows' statistics are left alone."""
        cfg = self.settings.state
        names = ("err_short", "err_mean", "err_var", "err_count")
        before = anomaly.AnomalyStats(*(field(n).clone() for n in names))
        after = anomaly.AnomalyStats(*(field(n) for n in names))
        score = anomaly.update(
            after, std_err, cfg.anomaly_short_alpha, cfg.anomaly_long_alpha, cfg.anomaly_min_events
        )
        if not bool(scored.all()):
            for name in names:
                field(name).copy_(torch.where(scored, field(name), getattr(before, name[4:])))
        return torch.where(scored, score, 0.0)
