"""Fine-tuning while the stream runs: truncated BPTT on replay windows, a validation gate,
atomic weight swaps and checkpoints.

A *run* (:class:`FineTuner`) does two things. First the **validation gate**: the
candidate weights trained by the previous run are scored against the serving weights
on the rows that arrived since that run, which neither has seen (prequential
validation, so no recent data has to be held back from training). A better candidate
is adopted: offered to the engine (swapped in between two batches), ``model_version``
increments and a checkpoint is written; a worse one is discarded and counted, and after
``training.lr_patience`` rejections in a row the learning rate backs off by
``lr_factor`` (down to ``min_learning_rate``). Then it **trains** the candidate on
windows sampled from the replay buffer, newest rows included: Adam (its moments
persist from run to run, so a short run takes informed steps rather than Adam's
sign-like first steps) on truncated-BPTT chunks of ``training.tbptt_steps`` with
gradient-norm clipping (the state is detached at every chunk boundary), stopping early
when the smoothed training loss stops improving.

The network's output minus its input is a correction to the key's current values, in
the key's standard deviations (see ``streamlstm.engine``); it sees inputs clipped to
``engine.input_clip`` and learns the target correction (the key's change to its next
event, or its explicit target) clipped to the same bound, exactly as the engine applies
it, so a rare jump neither saturates the network nor dominates the loss.

Where runs happen:

* :class:`InlineTrainer` (``replay``): in line, after every ``training.interval_events``
  events (and at once on drift), so the same file, config and seed give the same
  outputs.
* :class:`BackgroundTrainer` (the daemon): beside the event loop, in a child process
  (default; it reads the replay buffer from shared memory, so training never holds
  the event loop's GIL) or a thread; ``notify`` is all the loop calls.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from streamlstm.config import Settings
from streamlstm.engine import BatchOutput, Engine
from streamlstm.learning.buffer import ReplayBuffer, ReplayReader, Windows
from streamlstm.learning.checkpoint import architecture, save_checkpoint
from streamlstm.model import RecurrentModel

log = logging.getLogger(__name__)

RESULTS = ("adopted", "rejected", "failed")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device is cuda but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def training_threads(settings: Settings) -> int:
    """Intra-op threads for training: what the cores leave beside inference."""
    explicit = settings.training.torch_threads
    if explicit is not None:
        return explicit
    return max(1, (os.cpu_count() or 1) - settings.engine.torch_threads)


# -- the loss and the TBPTT step ---------------------------------------------------------


def correction_loss(
    out: torch.Tensor, x_in: torch.Tensor, y: torch.Tensor, clip: float
) -> torch.Tensor:
    """Mean squared error of the model's correction ``out - x_in`` against the target
    correction ``y`` clipped to ``clip`` (NaN targets do not count)."""
    target = y.clamp(-clip, clip)
    known = ~torch.isnan(target)
    diff = torch.where(known, out - x_in - torch.nan_to_num(target), 0.0)
    return (diff * diff).sum() / known.sum().clamp(min=1)


def chunk_loss(
    model: RecurrentModel, x: torch.Tensor, y: torch.Tensor, state: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one chunk ``x, y: [T, B, F]`` from ``state``; returns (loss, final state)."""
    x_in = x.clamp(-clip, clip)
    out, new_state = model(x_in, state)
    return correction_loss(out, x_in, y, clip), new_state


def burn_in(
    model: RecurrentModel, x: torch.Tensor, state: torch.Tensor, steps: int, clip: float
) -> torch.Tensor:
    """Advance ``state`` over the first ``steps`` inputs without gradient."""
    if steps == 0:
        return state
    with torch.no_grad():
        _, state = model(x[:steps].clamp(-clip, clip), state)
    return state


def tbptt_update(
    model: RecurrentModel,
    optimizer: torch.optim.Optimizer,
    windows: Windows,
    burn_in_steps: int,
    tbptt_steps: int,
    clip: float,
    clip_norm: float,
) -> list[float]:
    """Train on a batch of windows: burn-in, then one optimiser step per TBPTT chunk.

    The state is detached at every chunk boundary, so no gradient flows into an
    earlier chunk (``tests/test_trainer_tbptt.py``). Returns the chunks' losses.
    """
    state = burn_in(model, windows.x, windows.state, burn_in_steps, clip).detach()
    losses = []
    length = windows.x.shape[0]
    for start in range(burn_in_steps, length, tbptt_steps):
        chunk = slice(start, min(length, start + tbptt_steps))
        loss, state = chunk_loss(model, windows.x[chunk], windows.y[chunk], state, clip)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        state = state.detach()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate(
    model: RecurrentModel, windows: Windows, burn_in_steps: int, clip: float, batch: int = 512
) -> float:
    """Mean squared correction error over the windows' trained steps (after burn-in)."""
    total = count = 0.0
    for start in range(0, len(windows), batch):
        part = windows.take(slice(start, start + batch))
        state = burn_in(model, part.x, part.state, burn_in_steps, clip)
        x_in = part.x[burn_in_steps:].clamp(-clip, clip)
        out, _ = model(x_in, state)
        known = float((~torch.isnan(part.y[burn_in_steps:])).sum())
        total += float(correction_loss(out, x_in, part.y[burn_in_steps:], clip)) * known
        count += known
    return total / count if count else math.nan


class EarlyStop:
    """Stops when an exponential average of the losses has not improved for ``patience``."""

    def __init__(self, patience: int, smoothing: float = 0.9, min_delta: float = 1e-3) -> None:
        self.patience = patience
        self.smoothing = smoothing
        self.min_delta = min_delta
        self.average: float | None = None
        self.best = math.inf
        self.since = 0

    def update(self, loss: float) -> bool:
        """Feed one loss; True when training should stop."""
        a = self.smoothing
        self.average = loss if self.average is None else a * self.average + (1 - a) * loss
        if self.average < self.best * (1 - self.min_delta):
            self.best, self.since = self.average, 0
        else:
            self.since += 1
        return self.since >= self.patience


# -- one fine-tuning run -----------------------------------------------------------------


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
    weights: bytes | None = field(default=None, repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.weights is not None
        return torch.load(io.BytesIO(self.weights), weights_only=True)


def _to_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
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
        cancel: Any = None,
    ) -> None:
        self.settings = settings
        self.cancel = cancel  # an Event: set() makes a run stop at the next batch
        self.device = resolve_device(settings.training.device)
        self.serving = copy.deepcopy(model).to(self.device).eval()
        # The trainee is the candidate: trained in one run, judged at the start of the next
        # on rows that arrived in between; a rejected one restarts from the serving weights.
        self.trainee = copy.deepcopy(self.serving)
        self.candidate_ready = False
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
            outcome.weights = _to_bytes(self.serving.state_dict())
            if self.write_checkpoints:
                self.checkpoint(outcome)
            return
        outcome.result = "rejected"
        self.trainee.load_state_dict(self.serving.state_dict())  # discard it
        self.rejected_in_a_row += 1
        if self.rejected_in_a_row > t.lr_patience:
            self.learning_rate = max(t.min_learning_rate, self.learning_rate * t.lr_factor)
            self.rejected_in_a_row = 0

    def checkpoint(self, outcome: RunOutcome) -> None:
        t = self.settings.training
        assert t.checkpoint_dir is not None
        save_checkpoint(
            t.checkpoint_dir,
            self.serving.state_dict(),
            architecture(self.serving, self.settings),
            self.version,
            config=self.settings.model_dump(mode="json"),
            metrics={"train_loss": outcome.train_loss, "validation_loss": outcome.validation_loss},
            keep=t.keep_checkpoints,
        )


def _record_metrics(metrics: Any, outcome: RunOutcome) -> None:
    if metrics is None or outcome.result == "skipped":
        return
    if outcome.result in RESULTS:  # a first run ("trained") has no candidate to judge yet
        metrics.finetune_runs.labels(result=outcome.result).inc()
    metrics.finetune_seconds.observe(outcome.seconds)
    if math.isfinite(outcome.train_loss):
        metrics.finetune_loss.set(outcome.train_loss)
    best = outcome.validation_loss if outcome.result == "adopted" else outcome.serving_loss
    if math.isfinite(best):
        metrics.validation_loss.set(best)


# -- in line (replay) --------------------------------------------------------------------


class InlineTrainer:
    """Fine-tunes in line at fixed event counts (and on drift): deterministic replays.

    ``replay`` calls :meth:`on_batch` after each batch and cuts batches at
    :meth:`events_until_run`, so runs happen at the same events whatever the batch size.
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        metrics: Any = None,
        write_checkpoints: bool = False,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.buffer = ReplayBuffer.from_settings(
            settings, engine.model.state_shape, engine.model.input_size
        )
        engine.attach_learner(self.buffer)
        self.tuner = FineTuner(engine.model, settings, engine.model_version, write_checkpoints)
        self.outcomes: list[RunOutcome] = []
        self._since = 0
        self.events = 0

    def events_until_run(self) -> int:
        return max(1, self.settings.training.interval_events - self._since)

    def on_batch(self, output: BatchOutput) -> None:
        self._since += len(output)
        self.events += len(output)
        drifted = self.settings.drift.finetune_on_drift and any(output.detections.values())
        if self._since >= self.settings.training.interval_events or drifted:
            self._since = 0
            outcome = self.tuner.run(self.buffer.reader())
            _record_metrics(self.metrics, outcome)
            self.outcomes.append(outcome)
            if outcome.result == "adopted":
                self.engine.offer_weights(outcome.state_dict(), outcome.version)

    def counts(self) -> Counter[str]:
        return Counter(o.result for o in self.outcomes)


# -- beside the event loop (daemon) --------------------------------------------------------


@dataclass
class _WorkerSpec:
    """Everything a worker needs; picklable for a spawned child process."""

    settings: Settings
    weights: bytes
    version: int
    reader: ReplayReader
    threads: int
    cancel: Any = None
    write_checkpoints: bool = True


def _worker_main(spec: _WorkerSpec, commands: Any, results: Any) -> None:
    """Worker loop (thread or child process): one run per command until ``None``."""
    if threading.current_thread() is threading.main_thread():
        # A child process: Ctrl-C reaches the whole process group, but the parent decides
        # when fine-tuning stops (it sends None), so an interrupt must not kill a run.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    model = RecurrentModel.from_settings(spec.settings.model)
    model.load_state_dict(torch.load(io.BytesIO(spec.weights), weights_only=True))
    tuner = FineTuner(model, spec.settings, spec.version, spec.write_checkpoints, spec.cancel)
    while True:
        command = commands.get()
        if command is None:
            return
        results.put(tuner.run(spec.reader))


def _shared_memory_fits(nbytes: int, folder: str = "/dev/shm") -> bool:
    """Whether ``nbytes`` (plus a margin) fit the shared-memory filesystem: writing past
    its end kills the process with SIGBUS rather than raising."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return True  # no /dev/shm to ask (not Linux): let torch decide
    return stat.f_bavail * stat.f_frsize >= 1.1 * nbytes + 2**20


class BackgroundTrainer:
    """Fine-tuning beside the daemon's event loop; inference never waits for it.

    The loop calls :meth:`notify` after each batch (cheap: a counter, the replay metric,
    a non-blocking trigger). A worker (child process or thread, ``training.executor``)
    runs one fine-tuning run at a time on the shared replay buffer; adopted weights are
    offered to the engine, which swaps them in between two batches.
    """

    def __init__(self, engine: Engine, settings: Settings, metrics: Any = None) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        t = settings.training
        self.enabled = t.enabled
        self.executor = t.executor
        self.buffer: ReplayBuffer | None = None
        self.counts: Counter[str] = Counter()
        self.total_run_seconds = 0.0
        self.last_outcome: RunOutcome | None = None
        self._events = 0
        self._last_run = time.monotonic()
        self._drift_pending = False
        self._busy = False
        self._deaths = 0
        self._worker: threading.Thread | Any = None
        self._receiver: threading.Thread | None = None
        self._stopping = threading.Event()
        if metrics is not None:
            # Series exist at 0 from the start, so the first failure shows in increase().
            for result in RESULTS:
                metrics.finetune_runs.labels(result=result)
        if not self.enabled:
            return
        width, shape = engine.model.input_size, engine.model.state_shape
        if self.executor == "process" and not _shared_memory_fits(t.replay_bytes):
            log.warning(
                "/dev/shm has less than training.replay_bytes (%d) free (a container's "
                "default is 64 MiB: raise its shm size); fine-tuning in a thread instead",
                t.replay_bytes,
            )
            self.executor = "thread"
        try:
            self.buffer = ReplayBuffer.from_settings(
                settings, shape, width, shared=self.executor == "process"
            )
        except RuntimeError as exc:
            log.warning("shared memory unavailable (%s); fine-tuning in a thread instead", exc)
            self.executor = "thread"
            self.buffer = ReplayBuffer.from_settings(settings, shape, width)
        engine.attach_learner(self.buffer)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> BackgroundTrainer:
        if not self.enabled or self._worker is not None:
            return self
        self._stopping.clear()
        self._start_worker()
        self._receiver = threading.Thread(
            target=self._receive, name="finetune-results", daemon=True
        )
        self._receiver.start()
        return self

    def _start_worker(self) -> None:
        assert self.buffer is not None
        model = self.engine.model
        spec = _WorkerSpec(
            settings=self.settings,
            weights=_to_bytes(model.state_dict()),
            version=self.engine.model_version,
            reader=self.buffer.reader(),
            threads=training_threads(self.settings),
        )
        if self.executor == "process":
            ctx = torch.multiprocessing.get_context("spawn")
            spec.cancel = self._cancel = ctx.Event()
            self._commands, self._results = ctx.Queue(), ctx.Queue()
            self._worker = ctx.Process(
                target=_worker_main,
                args=(spec, self._commands, self._results),
                name="streamlstm-finetune",
                daemon=True,
            )
        else:
            spec.cancel = self._cancel = threading.Event()
            self._commands, self._results = queue.Queue(), queue.Queue()
            self._worker = threading.Thread(
                target=_worker_main,
                args=(spec, self._commands, self._results),
                name="finetune",
                daemon=True,
            )
        self._worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish its run and exit; kill a child that does not."""
        if self._worker is None:
            return
        self._stopping.set()
        self._cancel.set()
        self._commands.put(None)
        self._worker.join(timeout)
        if self.executor == "process" and self._worker.is_alive():
            log.warning("fine-tuning process did not stop within %.1fs; terminating", timeout)
            self._worker.terminate()
            self._worker.join(1.0)
        if self._receiver is not None:
            self._receiver.join(timeout)
        self._worker = None

    @property
    def busy(self) -> bool:
        """A fine-tuning run is in flight."""
        return self._busy

    # -- the event loop's side -----------------------------------------------------------

    def notify(self, output: BatchOutput) -> None:
        """After each processed batch: count events, set the replay metric, maybe trigger.

        Drift and model-version metrics are the daemon's telemetry's (one owner each)."""
        if self.metrics is not None and self.buffer is not None:
            self.metrics.replay_bytes.set(self.buffer.nbytes())
        if not self.enabled or self._worker is None:
            return
        self._events += len(output)
        t = self.settings
        if t.drift.finetune_on_drift and any(output.detections.values()):
            self._drift_pending = True
        if self._busy:
            return
        due = (
            self._events >= t.training.interval_events
            or time.monotonic() - self._last_run >= t.training.interval_seconds
            or self._drift_pending
        )
        if due:
            self._trigger()

    def _trigger(self) -> None:
        if self.executor == "process" and not self._worker.is_alive():
            self._deaths += 1
            if self._deaths >= 2:  # e.g. a script without a __main__ guard cannot spawn
                log.error("fine-tuning process keeps dying; fine-tuning in a thread instead")
                self.executor = "thread"
            else:
                log.error("fine-tuning process died (exit %s); restarting", self._worker.exitcode)
            self._start_worker()
        self._busy = True
        self._events = 0
        self._drift_pending = False
        self._last_run = time.monotonic()
        self._commands.put("run")

    # -- results (receiver thread) ---------------------------------------------------------

    def _receive(self) -> None:
        while not self._stopping.is_set() or self._busy:
            try:
                outcome = self._results.get(timeout=0.2)
            except queue.Empty:
                if self.executor == "process" and self._busy and not self._worker.is_alive():
                    self._handle(RunOutcome("failed", self.engine.model_version, error="died"))
                if self._stopping.is_set():
                    return
                continue
            except (EOFError, OSError):
                return
            self._handle(outcome)

    def _handle(self, outcome: RunOutcome) -> None:
        if outcome.result == "adopted":
            self.engine.offer_weights(outcome.state_dict(), outcome.version)
        if outcome.result != "skipped":
            self.counts[outcome.result] += 1
            self.total_run_seconds += outcome.seconds
        if outcome.result == "failed":
            log.error("fine-tuning run failed: %s", outcome.error)
        _record_metrics(self.metrics, outcome)
        self.last_outcome = outcome
        self._busy = False
