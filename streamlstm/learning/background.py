"""Fine-tuning beside the daemon's event loop, in a child process (or a thread).

The child process (default) reads the replay buffer from shared memory, so training
never holds the event loop's GIL; ``notify`` is all the loop calls. Adopted weights
come back as bytes and are offered to the engine, which swaps them in between batches.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import torch

from streamlstm.config import Settings
from streamlstm.engine import BatchOutput, Engine
from streamlstm.learning.buffer import ReplayBuffer
from streamlstm.learning.gate import (
    RESULTS,
    FineTuner,
    RunOutcome,
    record_run_metrics,
    weights_from_bytes,
    weights_to_bytes,
)
from streamlstm.learning.schedule import Schedule
from streamlstm.learning.windows import ReplayReader
from streamlstm.model import RecurrentModel

if TYPE_CHECKING:
    import multiprocessing.queues
    import multiprocessing.synchronize

    from streamlstm.metrics import Metrics

    Commands = queue.Queue[str | None] | multiprocessing.queues.Queue[str | None]
    Results = queue.Queue[RunOutcome] | multiprocessing.queues.Queue[RunOutcome]
    _Event = threading.Event | multiprocessing.synchronize.Event

log = logging.getLogger(__name__)


def training_threads(settings: Settings) -> int:
    """Intra-op threads for training: what the cores leave beside inference."""
    explicit = settings.training.torch_threads
    if explicit is not None:
        return explicit
    return max(1, (os.cpu_count() or 1) - settings.engine.torch_threads)


@dataclass
class _WorkerSpec:
    """Everything a worker needs; picklable for a spawned child process."""

    settings: Settings
    weights: bytes
    version: int
    reader: ReplayReader
    threads: int
    cancel: _Event | None = None
    write_checkpoints: bool = True


def _worker_main(spec: _WorkerSpec, commands: Commands, results: Results) -> None:
    """Worker loop (thread or child process): one run per command until ``None``."""
    if threading.current_thread() is threading.main_thread():
        # A child process: Ctrl-C reaches the whole process group, but the parent decides
        # when fine-tuning stops (it sends None), so an interrupt must not kill a run.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(spec.threads)
    model = RecurrentModel.from_settings(spec.settings.model)
    model.load_state_dict(weights_from_bytes(spec.weights))
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

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics | None = None) -> None:
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
        self._events = 0  # since the last run
        self._seen = 0  # in all
        self.schedule = Schedule.from_settings(settings)
        self._last_run = time.monotonic()
        self._drift_pending = False
        self._busy = False
        self._deaths = 0
        self._worker: threading.Thread | BaseProcess | None = None
        self._cancel: _Event
        self._commands: Commands
        self._results: Results
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
            weights=weights_to_bytes(model.state_dict()),
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
        if isinstance(self._worker, BaseProcess) and self._worker.is_alive():
            log.warning("fine-tuning process did not stop within %.1fs; terminating", timeout)
            self._worker.terminate()
            self._worker.join(1.0)
        if self._receiver is not None:
            self._receiver.join(timeout)
        self._worker = None

    def _dead_child(self) -> BaseProcess | None:
        """The worker, if it is a child process that has died."""
        worker = self._worker
        if isinstance(worker, BaseProcess) and not worker.is_alive():
            return worker
        return None

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
        self._seen += len(output)
        t = self.settings
        if t.drift.finetune_on_drift and any(output.detections.values()):
            self._drift_pending = True
        if self._busy:
            return
        due = (
            self.schedule.due(self._seen, self._events)
            or (
                self._events > 0
                and time.monotonic() - self._last_run >= t.training.interval_seconds
            )
            or self._drift_pending
        )
        if due:
            self._trigger()

    def _trigger(self) -> None:
        dead = self._dead_child()
        if dead is not None:
            self._deaths += 1
            if self._deaths >= 2:  # e.g. a script without a __main__ guard cannot spawn
                log.error("fine-tuning process keeps dying; fine-tuning in a thread instead")
                self.executor = "thread"
            else:
                log.error("fine-tuning process died (exit %s); restarting", dead.exitcode)
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
                if self._busy and self._dead_child() is not None:
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
        record_run_metrics(self.metrics, outcome)
        self.last_outcome = outcome
        self._busy = False
