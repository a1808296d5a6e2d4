"""The micro-batch step: decoded events in, prediction records out. No Kafka here.

For each event, in the key's arrival order:

1. score the key's pending prediction against the new values (``error``: mean absolute
   error over features, input units) and turn it into an ``anomaly_score``;
2. update the key's online scaler and normalise the values;
3. advance the key's recurrent state one step and predict its next values: the
   network sees the normalised values (``model.inputs = "level"``) or their change
   since the key's last event (``"change"``, robust when levels drift), clipped to
   ``engine.input_clip``; its output minus its input is a correction, in the key's
   standard deviations, added to the current values (so an untrained network is the
   persistence forecast, and an outlier is never "predicted" as the clip value);
   ``engine.max_step`` optionally caps that move at a multiple of the key's typical
   step-to-step change, a trust region against extrapolating from inputs unlike any
   the network was trained on (a sudden level shift read as a spike to revert);
4. de-normalise the prediction and keep it pending for the key's next event.

Beside the step: one :class:`StepConsumer` (``attach_learner``; the replay buffer, or
pretraining's capture) gets a typed :class:`StepRecord` of each batched step, and
:class:`~streamlstm.drift.DriftMonitor` runs the per-key Page-Hinkley test inside the
step and ADWIN over blocks of errors; drift marks the output (``BatchOutput.drift``).

All keys of a batch advance together: the k-th events of all keys present form one
batched step, so a batch costs ``max events per key`` model calls, not one per event.
Steps run fused (:mod:`streamlstm.fused`) or plainly, the reference: the same outputs.

>>> from streamlstm.config import load_settings
>>> from streamlstm.events import EventBatch
>>> settings = load_settings(overrides={"model.input_size": "2", "model.hidden_size": "8"})
>>> engine = Engine.from_settings(settings)
>>> out = engine.process(EventBatch.from_arrays(["a", "a"], [0, 1], [[1, 2], [1, 2]]))
>>> [r["error"] for r in out.records()]
[None, 0.0]
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from streamlstm import anomaly, combine
from streamlstm.config import Settings
from streamlstm.drift import DriftMonitor
from streamlstm.events import EventBatch
from streamlstm.fused import FusedStep
from streamlstm.model import RecurrentModel, quantize_for_inference
from streamlstm.state import KeyedState
from streamlstm.steps import BatchOutput, StepConsumer, StepRecord, step_groups

# The scaler's floor is relative to the key's level: differences below float32's resolution
# of the level are noise, whatever the unit (an absolute floor would treat millivolts and
# kilopascals differently). The tiny absolute term only keeps an all-zero key finite.
_VAR_REL_EPS = 1e-14
_VAR_ABS_EPS = 1e-30


# The typical step size is exact over a key's first changes, then exponential over ~100.
_STEP_WINDOW = 100


def _std(var: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(var + _VAR_REL_EPS * mean * mean + _VAR_ABS_EPS)


class Engine:
    """Per-key recurrent inference over micro-batches, with weights swappable between them."""

    def __init__(self, model: RecurrentModel, settings: Settings, model_version: int = 0) -> None:
        torch.set_num_threads(settings.engine.torch_threads)
        self.settings = settings
        self.model = model.eval()
        self.model_version = model_version
        self.store = KeyedState(
            state_shape=model.state_shape,
            width=model.input_size,
            max_keys=settings.state.max_keys,
            ttl_seconds=settings.state.ttl_seconds,
            initial_capacity=settings.state.initial_capacity,
            typical_step=settings.engine.max_step is not None,
            recurrent_dtype=settings.state.recurrent_dtype,
            season=settings.engine.season_events,
        )
        self.fused_step: FusedStep | None = None  # None: the plain step runs
        self._inference_model = self._prepare(model)
        self.learner: StepConsumer | None = None
        self._level_inputs = settings.model.inputs == "level"
        self.drift = DriftMonitor(settings.drift)
        self._offered: tuple[dict[str, torch.Tensor], int] | None = None
        self._offer_lock = threading.Lock()  # the trainer and the model topic offer

    @classmethod
    def from_settings(
        cls, settings: Settings, model_version: int = 0, resume: bool = True
    ) -> Engine:
        """An engine with a freshly initialised model (seeded by ``model.seed``), or, with
        ``resume`` and ``training.checkpoint_dir`` set, the newest valid checkpoint there
        (raises :class:`~streamlstm.learning.checkpoint.CheckpointError` on an architecture
        mismatch).
        """
        model = RecurrentModel.from_settings(settings.model)
        if resume and settings.training.checkpoint_dir is not None:
            from streamlstm.learning.checkpoint import architecture, latest_checkpoint

            expect = architecture(model, settings)
            ckpt = latest_checkpoint(settings.training.checkpoint_dir, expect)
            if ckpt is not None:
                model.load_state_dict(ckpt.state_dict)
                model_version = ckpt.version
        return cls(model, settings, model_version)

    def leader_shares(self) -> dict[str, float]:
        """Share of the live keys each forecaster leads: the combination as a metric summary
        (never per key: keys are unbounded)."""
        rows, names = self.store.table[self.store.occupied()], self.store.layout.experts
        if len(rows) == 0:
            return dict.fromkeys(names, 0.0)
        led = combine.leaders(self.store.layout.losses(rows))
        counts = torch.bincount(led, minlength=len(names)).tolist()
        return {name: n / len(rows) for name, n in zip(names, counts, strict=True)}

    def attach_learner(self, learner: StepConsumer | None) -> None:
        """Hand every batched step to ``learner`` (None detaches)."""
        self.learner = learner

    def _prepare(self, model: RecurrentModel) -> RecurrentModel:
        """The model the plain step runs (int8 with ``model.quantize``); the fused step."""
        self.fused_step = FusedStep.build(model, self.store.layout, self.settings)
        return quantize_for_inference(model) if self.settings.model.quantize else model

    # -- weights -----------------------------------------------------------------

    def offer_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Queue new weights; they take effect at the start of the next batch, never inside one.
        An offer not newer than the pending or served weights is ignored: two threads offer
        (the trainer, the model topic), and whichever lands last, the newest is served."""
        with self._offer_lock:
            if version > (self._offered[1] if self._offered else self.model_version):
                self._offered = (state_dict, version)

    def adopt_offered(self) -> None:
        """Swap offered weights in now; only between batches (as :meth:`process` does), e.g.
        so that a trainer starting up starts from the weights the group serves."""
        self._adopt_offered()

    def _adopt_offered(self) -> None:
        with self._offer_lock:  # the version moves with the take: later offers compare to it
            offered, self._offered = self._offered, None
            if offered is None:
                return
            state_dict, self.model_version = offered
        self.model.load_state_dict(state_dict)
        self.model.eval()
        self._inference_model = self._prepare(self.model)

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
        scaled = np.full(n, np.nan, dtype=np.float32)
        flags = np.zeros(n, dtype=np.float32)
        step = self.settings.engine.max_batch
        for start in range(0, n, step):
            rows = slice(start, min(n, start + step))
            self._process_chunk(
                batch.take(rows) if n > step else batch,
                None if partition is None else partition[rows],
                None if offset is None else offset[rows],
                (prediction[rows], error[rows], squared[rows], score[rows], scaled[rows]),
                flags[rows],
            )
        output = BatchOutput(
            batch.keys, batch.ts, prediction, error, squared, score, self.model_version
        )
        output.scaled_error = scaled
        if self.drift.enabled:
            self._detect_drift(output, scaled, flags > 0)
        return output

    def _detect_drift(self, output: BatchOutput, scaled: np.ndarray, per_key: np.ndarray) -> None:
        """Per-key flags from the step, plus ADWIN over blocks of std-unit errors; a global
        drift marks the event that closed the block."""
        hits = self.drift.global_errors(scaled)
        output.drift = per_key.copy()
        output.drift[hits] = True
        output.detections = {"adwin": len(hits), "page_hinkley": int(per_key.sum())}

    def _process_chunk(
        self,
        batch: EventBatch,
        partition: np.ndarray | None,
        offset: np.ndarray | None,
        outputs: tuple[np.ndarray, ...],
        flags: np.ndarray,
    ) -> None:
        """Run one chunk, writing prediction, error, squared error, score and std-unit error
        into ``outputs`` and per-key drift flags into ``flags``."""
        slots = self.store.assign(batch.keys, batch.ts, partition)
        if self.learner is not None:
            self.learner.begin(len(batch), self.store.capacity)
        values = torch.from_numpy(batch.values)
        target = None if batch.target is None else torch.from_numpy(batch.target)
        ts = torch.from_numpy(batch.ts)
        columns = [torch.from_numpy(a) for a in (*outputs, flags)]
        for group in step_groups(slots):
            rows = torch.from_numpy(group)

            def pick(t: torch.Tensor, rows: torch.Tensor = rows) -> torch.Tensor:
                return t.index_select(0, rows)

            s = pick(torch.from_numpy(slots))
            if self.fused_step is not None and target is None:  # explicit targets: the plain step
                self.fused_step.group(self.store, s, pick(values), rows, columns, self.learner)
            else:
                results = self._step_group(
                    s, pick(values), None if target is None else pick(target), rows
                )
                for column, result in zip(columns, results, strict=True):
                    column.index_copy_(0, rows, result)
            self.store.last_ts[s] = pick(ts)
            if offset is not None:
                self.store.offset[s] = pick(torch.from_numpy(offset))
        if self.learner is not None:
            self.learner.end()

    def _step_group(
        self,
        s: torch.Tensor,
        x: torch.Tensor,
        target: torch.Tensor | None,
        positions: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """One event for each of B distinct keys (slots ``s``, at ``positions`` of the
        chunk): score, normalise, step.

        The keys' rows are gathered once, updated through field views, and written back
        with one ``index_copy_``. Returns prediction, error, squared error, anomaly score,
        std-unit error and per-key drift flags (float 0/1).
        """
        cfg = self.settings
        clip = cfg.engine.input_clip
        rows = self.store.table.index_select(0, s)
        field = partial(self.store.layout.field, rows)
        mean, var, count, has_pending = map(field, ("mean", "var", "count", "has_pending"))

        # 1. Score the pending forecasts: the mix (the output) and each forecaster's (their
        # weights), in input units and in the key's std units before this event.
        # The pending forecast is recomputed, not stored: its forecasters and weights have
        # not changed since it was made (a labelled event leaves none pending).
        forecasters = self.store.layout.forecasters(rows)  # [B, K, F] view into the rows
        hedge = self.store.layout.losses(rows)  # [B, K, F] view into the rows
        pending = has_pending > 0
        diff = x - combine.mix(hedge, forecasters)
        abs_err = diff.abs()
        err = torch.where(pending, abs_err.mean(1), torch.nan)
        squared = torch.where(pending, (diff * diff).mean(1), torch.nan)
        std_before = _std(var, mean)
        std_err = (abs_err / std_before).clamp(max=clip).mean(1)
        last, ewma = field("last"), field("ewma")
        seen = count > 0
        combine.learn(hedge, forecasters, x, std_before, pending)  # their forecasts of x
        delta = x - mean  # from the key's mean before this event: novelty, then the scaler
        value_z = torch.where(seen, (delta.abs() / std_before).amax(1), 0.0)
        repeat = seen & (x == last).all(1)  # exactly the key's last values: a stuck feed?
        score = self._score(field, std_err, value_z, repeat, pending)
        # The change since the key's last event, in the units its last prediction was made
        # in: the correction that prediction should have made (its training target), and
        # the network's input when model.inputs is "change".
        moved = x - last
        change = torch.where(seen.unsqueeze(1), moved / std_before, 0.0)
        if cfg.engine.max_step is not None:  # its typical step: 0 weight on a first event
            rate = (seen / count.clamp(min=1, max=_STEP_WINDOW)).unsqueeze(1)
            step = field("step")
            step.add_(rate * (moved.abs() - step))
        last.copy_(x)
        if self.store.layout.season:
            _seasonal(field, x, count, self.store.layout.season)
        if bool(seen.all()):
            ewma.add_(combine.EWMA_ALPHA * (x - ewma))
        else:
            ewma.copy_(torch.where(seen.unsqueeze(1), ewma + combine.EWMA_ALPHA * (x - ewma), x))

        # 2. Online scaler: exact mean/variance for `scaler_window` events, then exponential.
        count += 1
        alpha = (1.0 / count.clamp(max=cfg.state.scaler_window)).unsqueeze(1)
        mean += alpha * delta
        var.copy_((1.0 - alpha) * (var + alpha * delta * delta))
        std = _std(var, mean)
        raw_input = (x - mean) / std if self._level_inputs else change
        model_input = raw_input.clamp(-clip, clip)

        # 3. One batched recurrent step (handed to learning with the state before it). The
        # network's output minus its input is the correction, in the key's std units.
        stored = field("recurrent")  # in its storage dtype; the step runs in float32
        state = stored.float()
        if self.learner is not None:
            own = None if target is None else (target - x) / std
            self.learner.record(StepRecord(s, raw_input, change, count, state, positions, own))
        out, new_state = self._inference_model.step(model_input, state)
        move = (out - model_input) * std
        if cfg.engine.max_step is not None:  # a trust region for inputs the net never saw
            limit = cfg.engine.max_step * field("step")
            move = torch.maximum(torch.minimum(move, limit), -limit)
        stored.copy_(new_state)  # rounded once, to nearest even, where stored as float16
        field("net_pending").copy_(x + move)  # the other forecasters already hold theirs
        pred = combine.mix(hedge, forecasters)

        # 4. With an explicit target the prediction is scored at once, not left pending.
        scored = pending
        if target is None:
            has_pending.fill_(1.0)
        else:
            labelled = ~torch.isnan(target).any(1)
            has_pending.copy_((~labelled).float())
            truth = torch.where(labelled.unsqueeze(1), target, x)
            combine.learn(hedge, forecasters, truth, std, labelled)
            target_diff = pred - target
            target_err = target_diff.abs()
            err = torch.where(labelled, target_err.mean(1), err)
            squared = torch.where(labelled, (target_diff * target_diff).mean(1), squared)
            target_std_err = (target_err / std).clamp(max=clip).mean(1)
            target_score = self._score(field, target_std_err, value_z, repeat, labelled)
            score = torch.where(labelled, target_score, score)
            std_err = torch.where(labelled, target_std_err, std_err)
            scored = pending | labelled

        # 5. Per-key drift on the std-unit error stream.
        if self.drift.enabled:
            block = self.store.layout.block(rows, "ph_mean", "ph_drift")
            flags = self.drift.per_key(block, std_err, scored).float()
        else:
            flags = torch.zeros_like(std_err)
        self.store.table.index_copy_(0, s, rows)
        self.store.dirty[s] = True
        self.store.reset_non_finite(s, rows)  # an overflow or a fault: a fresh row, counted
        unscored = torch.isnan(err)
        return (
            pred,
            err,
            squared,
            torch.where(unscored, torch.nan, score),
            torch.where(unscored, torch.nan, std_err),
            flags,
        )

    def _score(
        self,
        field: Callable[[str], torch.Tensor],
        std_err: torch.Tensor,
        value_z: torch.Tensor,
        repeat: torch.Tensor,
        scored: torch.Tensor,
    ) -> torch.Tensor:
        """Anomaly score for rows in ``scored``; other rows' statistics are left alone."""
        cfg = self.settings.state
        partial_rows = not bool(scored.all())  # the usual case: every key had a forecast
        before = [field(n).clone() for n in anomaly.COLUMNS] if partial_rows else []
        after = anomaly.AnomalyStats(*(field(n) for n in anomaly.COLUMNS))
        score = anomaly.update(
            after,
            std_err,
            value_z,
            cfg.anomaly_short_alpha,
            cfg.anomaly_long_alpha,
            cfg.anomaly_min_events,
            self.settings.engine.input_clip,  # std_err is clipped there
            repeat,
        )
        if partial_rows:
            for name, old in zip(anomaly.COLUMNS, before, strict=True):
                keep = scored.unsqueeze(1) if old.dim() == 2 else scored
                field(name).copy_(torch.where(keep, field(name), old))
        return torch.where(scored, score, 0.0)


def _seasonal(field: Callable[[str], torch.Tensor], x: torch.Tensor, seen: torch.Tensor, k: int):
    """Ring ``x`` in at the ring's own next slot (a float32 count stops at 2**24); forecast
    the next event by the value a period before it, persistence until a whole period."""
    ring, keys = field("season").view(len(x), k, x.shape[1]), torch.arange(len(x))
    at = field("season_at")[:, 0]  # a corrupt restored value still lands in the ring
    ring[keys, at.long() % k] = x
    at.copy_((at.long() % k + 1) % k)  # the slot written a period before the next event
    full = (seen + 1 >= k).unsqueeze(1)  # seen: the key's events before this one
    field("seasonal").copy_(torch.where(full, ring[keys, at.long()], x))
