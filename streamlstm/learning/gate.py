"""One fine-tuning run: its prequential validation gate, then training the candidate.

A *run* (:class:`FineTuner`) does two things. First the **validation gate**: the
candidate weights trained by the previous run are scored against the serving weights
on the rows that arrived since that run, which neither has seen (prequential
validation, so no recent data has to be held back from training). A better candidate
is adopted: offered to the engine (swapped in between two batches), ``model_version``
increments and a checkpoint is written; a worse one is discarded and counted, and at the
``training.lr_patience``-th rejection in a row the learning rate is multiplied by
``lr_factor`` once (never below ``min_learning_rate``) and the count starts again
(``lr_patience = 0`` counts as 1: every rejection backs off). Then it **trains** the candidate on
windows sampled from the replay buffer, newest rows included: Adam (its moments
persist from run to run, so a short run takes informed steps rather than Adam's
sign-like first steps) on truncated-BPTT chunks of ``training.tbptt_steps`` with
gradient-norm clipping (the state is detached at every chunk boundary), stopping early
when the smoothed training loss stops improving.

Where runs happen: :mod:`streamlstm.learning.inline` (``replay``, deterministic) and
:mod:`streamlstm.learning.background` (the daemon, beside the event loop).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from streamlstm.config import Settings
from streamlstm.learning.checkpoint import architecture, save_checkpoint
from streamlstm.learning.tbptt import EarlyStop, evaluate, resolve_device, tbptt_update
from streamlstm.learning.windows import ReplayReader, Windows
from streamlstm.model import RecurrentModel

if TYPE_CHECKING:
    from streamlstm.metrics import Metrics

log = logging.getLogger(__name__)

RESULTS = ("adopted", "rejected", "failed")


class Cancel(Protocol):
    """An event (thread or process) that, once set, stops a run at its next batch."""

    def is_set(self) -> bool: ...


@dataclass
class RunOutcome:
    """What one run did; ``weights`` (torch.save bytes) when adopted."""

    result: str  # adopted | rejected (the gate) | trained (first run) | skipped | failed
    version: int
    seconds: float = 0.0
    steps: int = 0
    train_loss: float = math.nan
    validation_loss: float = math.nan  # the candidate's
    serving_loss: float = math.nan  # the serving weights', same windows
    learning_rate: float = math.nan
    windows: int = 0
    error: str | None = None
    checkpoint_error: str | None = None  # adopted, but its checkpoint could not be written
    weights: bytes | None = field(default=None, repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.weights is not None
        return weights_from_bytes(self.weights)


def weights_from_bytes(weights: bytes) -> dict[str, torch.Tensor]:
    """Weights sent between processes (``torch.load`` runs no code from them)."""
    return torch.load(io.BytesIO(weights), weights_only=True)


def weights_to_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    """Weights as bytes, on the CPU: picklable, and independent of the trainer's device."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
    return buffer.getvalue()


class FineTuner:
    """Runs fine-tuning on replay windows and keeps the serving weights and LR schedule."""

    def __init__(
        self,
        model: RecurrentModel,
        settings: Settings,
        version: int = 0,
        write_checkpoints: bool = True,
        cancel: Cancel | None = None,
    ) -> None:
        self.settings = settings
        self.cancel = cancel  # an Event: set() makes a run stop at the next batch
        self.device = resolve_device(settings.training.device)
        self.serving = copy.deepcopy(model).to(self.device).eval()
        # The trainee is the candidate: trained in one run, judged at the start of the next
        # on rows that arrived in between; a rejected one restarts from the serving weights.
        self.trainee = copy.deepcopy(self.serving)
        self.candidate_ready = False
        self.candidate_train_loss = math.nan  # the candidate's, recorded in its checkpoint
        self.cut = -1  # rows up to here were available when the candidate was trained
        t = settings.training
        self.optimizer = torch.optim.Adam(
            self.trainee.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay
        )
        self.version = version
        self.learning_rate = settings.training.learning_rate
        self.rejected_in_a_row = 0
        self.runs = 0
        self.write_checkpoints = write_checkpoints and settings.training.checkpoint_dir is not None

    def run(self, reader: ReplayReader) -> RunOutcome:
        """One run: sample, train, gate, maybe adopt and checkpoint. Never raises."""
        started = time.perf_counter()
        self.runs += 1
        try:
            outcome = self._run(reader)
        except Exception as exc:  # a failed run must not take the daemon down
            log.exception("fine-tuning run failed")
            outcome = RunOutcome("failed", self.version, error=f"{type(exc).__name__}: {exc}")
        outcome.seconds = time.perf_counter() - started
        outcome.learning_rate = self.learning_rate
        return outcome

    def _run(self, reader: ReplayReader) -> RunOutcome:
        t = self.settings.training
        clip = self.settings.engine.input_clip
        generator = torch.Generator().manual_seed(t.seed * 1_000_003 + self.runs)
        chunks = math.ceil((t.window - t.burn_in) / t.tbptt_steps)
        batches = math.ceil(t.steps_per_run / chunks)
        sampled = reader.sample(
            t.batch_windows * batches, t.validation_windows, generator, self.cut
        )
        if sampled is None:
            return RunOutcome("skipped", self.version)
        train, val = (w.to(self.device) for w in sampled[:2])
        if self.candidate_ready and len(val) == 0:
            return RunOutcome("skipped", self.version)  # nothing new to judge or learn from
        outcome = RunOutcome("trained", self.version, windows=len(train) + len(val))
        if self.candidate_ready:
            self._gate(outcome, val)

        # Train the candidate on everything, newest rows included; the next run judges it.
        candidate, optimizer = self.trainee, self.optimizer
        candidate.train()
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate
        # Chunks at different depths of a window have different losses: judge whole batches.
        stopper = EarlyStop(math.ceil(t.early_stop_patience / chunks))
        losses: list[float] = []
        for b in range(batches):
            if self.cancel is not None and self.cancel.is_set():
                break
            batch = train.take(slice(b * t.batch_windows, (b + 1) * t.batch_windows))
            chunk_losses = tbptt_update(
                candidate, optimizer, batch, t.burn_in, t.tbptt_steps, clip, t.clip_norm
            )
            losses += chunk_losses
            if not all(math.isfinite(v) for v in chunk_losses):
                self.trainee.load_state_dict(self.serving.state_dict())
                raise FloatingPointError("training loss is not finite")
            if stopper.update(sum(chunk_losses) / len(chunk_losses)):
                break
            if len(losses) >= t.steps_per_run:
                break
        candidate.eval()
        self.candidate_ready = True
        self.cut = sampled[2]
        outcome.steps = len(losses)
        if losses:
            tail = losses[-chunks:]
            outcome.train_loss = sum(tail) / len(tail)
        self.candidate_train_loss = outcome.train_loss
        return outcome

    def _gate(self, outcome: RunOutcome, val: Windows) -> None:
        """Score last run's candidate against the serving weights on rows neither has
        seen; adopt it if better, else discard it (and back off the LR on a plateau)."""
        t = self.settings.training
        clip = self.settings.engine.input_clip
        outcome.validation_loss = evaluate(self.trainee, val, t.burn_in, clip)
        outcome.serving_loss = evaluate(self.serving, val, t.burn_in, clip)
        if math.isfinite(outcome.validation_loss) and (
            outcome.validation_loss < outcome.serving_loss
        ):
            self.serving.load_state_dict(self.trainee.state_dict())
            self.version += 1
            self.rejected_in_a_row = 0
            outcome.result, outcome.version = "adopted", self.version
            outcome.weights = weights_to_bytes(self.serving.state_dict())
            if self.write_checkpoints:
                self.checkpoint(outcome)
            return
        outcome.result = "rejected"
        self.trainee.load_state_dict(self.serving.state_dict())  # discard it
        self.rejected_in_a_row += 1
        if self.rejected_in_a_row >= t.lr_patience:  # the lr_patience-th rejection in a row
            self.learning_rate = max(t.min_learning_rate, self.learning_rate * t.lr_factor)
            self.rejected_in_a_row = 0

    def checkpoint(self, outcome: RunOutcome) -> None:
        """Checkpoint adopted weights. A failed write (disk full, permissions) does not
        undo the adoption: the trainer already serves the weights and the outcome offers
        them to the engine, so both stay on the same version; the failure is logged and
        recorded in ``outcome.checkpoint_error`` (``streamlstm_checkpoint_failures_total``),
        and the next adopted weights are checkpointed as usual."""
        t = self.settings.training
        assert t.checkpoint_dir is not None
        try:
            save_checkpoint(
                t.checkpoint_dir,
                self.serving.state_dict(),
                architecture(self.serving, self.settings),
                self.version,
                config=self.settings.model_dump(mode="json"),
                metrics={
                    "train_loss": self.candidate_train_loss,
                    "validation_loss": outcome.validation_loss,
                },
                keep=t.keep_checkpoints,
            )
        except Exception as exc:
            outcome.checkpoint_error = f"{type(exc).__name__}: {exc}"
            log.error(
                "adopted weights v%d are served but could not be checkpointed in %s: %s",
                self.version,
                t.checkpoint_dir,
                outcome.checkpoint_error,
            )


def record_run_metrics(metrics: Metrics | None, outcome: RunOutcome) -> None:
    """The trainer-owned metrics of one run (skipped runs are not counted)."""
    if metrics is None or outcome.result == "skipped":
        return
    if outcome.checkpoint_error is not None:
        metrics.checkpoint_failures.inc()
    if outcome.result in RESULTS:  # a first run ("trained") has no candidate to judge yet
        metrics.finetune_runs.labels(result=outcome.result).inc()
    metrics.finetune_seconds.observe(outcome.seconds)
    if math.isfinite(outcome.train_loss):
        metrics.finetune_loss.set(outcome.train_loss)
    best = outcome.validation_loss if outcome.result == "adopted" else outcome.serving_loss
    if math.isfinite(best):
        metrics.validation_loss.set(best)
