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


def occurrence_rank(slots: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same slot (0, 1, 2, ...)."""
    order = np.argsort(slots, kind="stable")
    ordered = slots[order]
    starts = np.ones(len(slots), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    positions = np.arange(len(slots))
    group_start = np.maximum.accumulate(np.where(starts, positions, 0))
    rank = np.empty(len(slots), dtype=np.int64)
    rank[order] = positions - group_start
    return rank


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
        score = np.full(n, np.nan, dtype=np.float32)
        step = self.settings.engine.max_batch
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            self._process_chunk(
                batch.take(rows) if n > step else batch,
                None if partition is None else partition[rows],
                None if offset is None else offset[rows],
                prediction[rows],
                error[rows],
                score[rows],
            )
        return BatchOutput(batch.keys, batch.ts, prediction, error, score, self.model_version)

    def _process_chunk(
        self,
        batch: EventBatch,
        partition: np.ndarray | None,
        offset: np.ndarray | None,
        prediction: np.ndarray,
        error: np.ndarray,
        score: np.ndarray,
    ) -> None:
        slots = self.store.assign(batch.keys, batch.ts, partition)
        rank = occurrence_rank(slots)
        values = torch.from_numpy(batch.values)
        target = None if batch.target is None else torch.from_numpy(batch.target)
        ts = torch.from_numpy(batch.ts)
        out_pred, out_err, out_score = (torch.from_numpy(a) for a in (prediction, error, score))
        groups = int(rank.max()) + 1 if len(rank) else 0
        for r in range(groups):
            # The common case, every key once: no gather of the batch columns at all.
            rows = None if groups == 1 else torch.from_numpy(np.flatnonzero(rank == r))

            def pick(t: torch.Tensor, rows: torch.Tensor | None = rows) -> torch.Tensor:
                return t if rows is None else t[rows]

            s = pick(torch.from_numpy(slots))
            pred, err, sc = self._step_group(s, pick(values), None if target is None else pick(target))
            self.store.last_ts[s] = pick(ts)
            if offset is not None:
                self.store.offset[s] = pick(torch.from_numpy(offset))
            if rows is None:
                out_pred.copy_(pred), out_err.copy_(err), out_score.copy_(sc)
            else:
                out_pred[rows], out_err[rows], out_score[rows] = pred, err, sc

    def _step_group(
        self, s: torch.Tensor, x: torch.Tensor, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One event for each of B distinct keys (slots ``s``): score, normalise, step."""
        st, cfg = self.store, self.settings
        clip = cfg.engine.input_clip
        mean, var, count = st.mean.index_select(0, s), st.var.index_select(0, s), st.count[s]

        # 1. Score the pending prediction, in input units and in the key's std units.
        has_pending = st.has_pending[s]
        abs_err = (x - st.pending.index_select(0, s)).abs()
        err = torch.where(has_pending, abs_err.mean(1), torch.nan)
        std_err = (abs_err / torch.sqrt(var + _VAR_EPS)).clamp(max=clip).mean(1)
        score = self._score(s, std_err, has_pending)

        # 2. Online scaler: exact mean/variance for `scaler_window` events, then exponential.
        count = count + 1
        alpha = (1.0 / count.clamp(max=cfg.state.scaler_window).to(x.dtype)).unsqueeze(1)
        delta = x - mean
        mean = mean + alpha * delta
        var = (1.0 - alpha) * (var + alpha * delta * delta)
        std = torch.sqrt(var + _VAR_EPS)
        xn = ((x - mean) / std).clamp(-clip, clip)

        # 3. One batched recurrent step.
        state = st.recurrent.index_select(0, s)
        if self.recorder is not None:
            self.recorder(s, xn, state)
        pred_n, new_state = self._inference_model.step(xn, state)
        pred = pred_n * std + mean

        # 4. Write back; with an explicit target the prediction is scored at once.
        st.recurrent.index_copy_(0, s, new_state)
        st.mean.index_copy_(0, s, mean)
        st.var.index_copy_(0, s, var)
        st.pending.index_copy_(0, s, pred)
        st.count[s] = count
        if target is None:
            st.has_pending[s] = True
        else:
            labelled = ~torch.isnan(target).any(1)
            st.has_pending[s] = ~labelled
            target_err = (pred - target).abs()
            err = torch.where(labelled, target_err.mean(1), err)
            target_std_err = (target_err / std).clamp(max=clip).mean(1)
            labelled_score = self._score(s, target_std_err, labelled)
            score = torch.where(labelled, labelled_score, score)
        st.dirty[s] = True
        return pred, err, torch.where(torch.isnan(err), torch.nan, score)

    def _score(self, s: torch.Tensor, std_err: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """Anomaly score for rows in ``scored``; statistics of other rows are left alone."""
        st, cfg = self.store, self.settings.state
        all_scored = bool(scored.all())
        if not all_scored and not bool(scored.any()):
            return torch.zeros_like(std_err)
        rows = s if all_scored else s[scored]
        stats = anomaly.AnomalyStats(
            st.err_short[rows], st.err_mean[rows], st.err_var[rows], st.err_count[rows]
        )
        values = anomaly.update(
            stats,
            std_err if all_scored else std_err[scored],
            cfg.anomaly_short_alpha,
            cfg.anomaly_long_alpha,
            cfg.anomaly_min_events,
        )
        st.err_short[rows], st.err_mean[rows] = stats.short, stats.mean
        st.err_var[rows], st.err_count[rows] = stats.var, stats.count
        if all_scored:
            return values
        score = torch.zeros_like(std_err)
        score[scored] = values
        return score
