"""Fine-tuning beside the daemon's event loop, in a child process (or a thread).

The child process (default) reads the replay buffer from shared memory, so training
never holds the event loop's GIL; ``notify`` is all the loop calls. Adopted weights
come back as bytes and are offered to the engine, which swaps them in between batches.

This module is the daemon's side: when runs happen, what their results do, and
supervision; what the worker runs, and how it is started, is
:mod:`streamlstm.learning.worker`. Supervision: the child exits within about a second
when its parent dies (even by ``kill -9``: a watchdog thread in the child polls its parent
pid), a run that overruns ``training.run_timeout_seconds`` is cancelled and then killed,
and a worker that dies or is killed is restarted with exponential backoff
(``streamlstm_trainer_restarts_total``; ``BackgroundTrainer.healthy`` and
``streamlstm_trainer_up`` are false meanwhile).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from streamlstm.config import Settings
from streamlstm.engine import BatchOutput, Engine
from streamlstm.learning.buffer import ReplayBuffer
from streamlstm.learning.device import require_training_device
from streamlstm.learning.gate import RESULTS, RunOutcome, record_run_metrics, weights_to_bytes
from streamlstm.learning.schedule import Schedule
from streamlstm.learning.worker import WorkerSpec, new_worker

if TYPE_CHECKING:
    from streamlstm.learning.worker import Commands, Event, Results
    from streamlstm.metrics import Metrics

log = logging.getLogger(__name__)

#: First restart delay after a worker died, doubled on each death in a row up to the cap.
RESTART_BACKOFF_SECONDS = 1.0
RESTART_BACKOFF_CAP_SECONDS = 60.0
#: How long a run that overran ``training.run_timeout_seconds`` has to honour its
#: cancellation before its worker is killed.
KILL_GRACE_SECONDS = 5.0


def training_threads(settings: Settings) -> int:
    """Intra-op threads for training: what the cores leave beside inference."""
    explicit = settings.training.torch_threads
    if explicit is not None:
        return explicit
    return max(1, (os.cpu_count() or 1) - settings.engine.torch_threads)


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
    offered to the engine, which swaps them in between two batches. A supervisor thread
    receives the results, cancels and kills runs that overrun
    ``training.run_timeout_seconds`` and restarts a dead worker with backoff.
    """

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics | None = None) -> None:
        require_training_device(settings)
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
        self.restarts = 0  # workers restarted after dying or overrunning their deadline
        self._since = 0  # events since the last run
        self._seen = 0  # events in all
        self.schedule = Schedule.from_settings(settings)
        self._last_run = time.monotonic()
        self._drift_pending = False
        self._busy = False
        self._run_started = 0.0
        self._cancelled_at: float | None = None  # a run overran; cancelled at this time
        self._restart_at: float | None = None  # the worker is dead; restart it then
        self._backoff = RESTART_BACKOFF_SECONDS
        self._quick_deaths = 0  # process workers in a row that died before any result
        self._results_seen = 0  # results from the current worker
        # The serving weights as the trainer last knew them: a restarted worker starts
        # from these (reading the engine's model while the loop swaps it could tear).
        self._weights = b""
        self._version = 0
        self._lock = threading.Lock()  # worker, queues and trigger: loop vs supervisor
        self._worker: threading.Thread | BaseProcess | None = None
        self._cancel: Event
        self._commands: Commands
        self._results: Results
        self._receiver: threading.Thread | None = None
        self._stopping = threading.Event()
        #: Called (on the supervisor thread) with each adopted outcome, after the engine
        #: was offered it: the daemon publishes it to the model topic.
        self.on_adopted: Callable[[RunOutcome], None] | None = None
        if metrics is not None:
            # Series exist at 0 from the start, so the first failure shows in increase().
            for result in RESULTS:
                metrics.finetune_runs.labels(result=result)
            metrics.trainer_up.set(0)
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
        self._weights = weights_to_bytes(self.engine.model.state_dict())
        self._version = self.engine.model_version
        with self._lock:
            self._start_worker()
        self._set_up(True)
        self._receiver = threading.Thread(
            target=self._receive, name="finetune-results", daemon=True
        )
        self._receiver.start()
        return self

    def _start_worker(self) -> None:
        """A fresh worker with fresh queues and cancel event (under ``_lock``): whatever
        an abandoned worker still sends goes nowhere."""
        assert self.buffer is not None
        spec = WorkerSpec(
            settings=self.settings,
            weights=self._weights,
            version=self._version,
            reader=self.buffer.reader(),
            threads=training_threads(self.settings),
        )
        self._results_seen = 0
        self._cancelled_at = None
        for old in (getattr(self, "_commands", None), getattr(self, "_results", None)):
            if old is not None and hasattr(old, "cancel_join_thread"):
                old.cancel_join_thread()  # a dead reader: never wait to flush into it
                old.close()
        self._worker, self._cancel, self._commands, self._results = new_worker(spec, self.executor)
        self._worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish its run and exit; kill a child that does not."""
        if self._worker is None:
            return
        self._stopping.set()
        with self._lock:
            worker = self._worker
            self._cancel.set()
            self._commands.put(None)
        worker.join(timeout)
        if isinstance(worker, BaseProcess) and worker.is_alive():
            log.warning("fine-tuning process did not stop within %.1fs; terminating", timeout)
            worker.terminate()
            worker.join(1.0)
        if self._receiver is not None:
            self._receiver.join(timeout)
        self._worker = None
        self._restart_at = None
        self._set_up(False)

    @property
    def busy(self) -> bool:
        """A fine-tuning run is in flight."""
        return self._busy

    @property
    def healthy(self) -> bool:
        """Fine-tuning can run: disabled, or its worker is alive (not dead, hung past its
        deadline or backing off before a restart)."""
        if not self.enabled:
            return True
        worker = self._worker
        return worker is not None and self._restart_at is None and worker.is_alive()

    def worker_pid(self) -> int | None:
        """The child process's pid (None for a thread worker or none running)."""
        worker = self._worker
        return worker.pid if isinstance(worker, BaseProcess) else None

    def _set_up(self, up: bool) -> None:
        if self.metrics is not None:
            self.metrics.trainer_up.set(1 if up else 0)

    # -- the event loop's side -----------------------------------------------------------

    def notify(self, output: BatchOutput) -> None:
        """After each processed batch: count events, set the replay metric, maybe trigger.

        Drift and model-version metrics are the daemon's telemetry's (one owner each)."""
        if self.metrics is not None and self.buffer is not None:
            self.metrics.replay_bytes.set(self.buffer.nbytes())
        if not self.enabled or self._worker is None:
            return
        self._since += len(output)
        self._seen += len(output)
        if self.settings.drift.finetune_on_drift and any(output.detections.values()):
            self._drift_pending = True
        if self._busy or self._restart_at is not None:
            return
        elapsed = time.monotonic() - self._last_run
        if self.schedule.due(self._seen, self._since, elapsed) or self._drift_pending:
            self._trigger()

    def _trigger(self) -> None:
        # Never wait for the supervisor (it may be starting a worker): try next batch.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._worker is None or self._restart_at is not None or self._busy:
                return
            self._busy = True
            self._since = 0
            self._drift_pending = False
            self._last_run = self._run_started = time.monotonic()
            self._commands.put("run")
        finally:
            self._lock.release()

    # -- results and supervision (receiver thread) ----------------------------------------

    def _receive(self) -> None:
        while True:
            outcome: RunOutcome | None = None
            try:
                outcome = self._results.get(timeout=0.2)
            except queue.Empty:
                pass
            except (EOFError, OSError):
                if self._stopping.is_set():
                    return
                time.sleep(0.2)  # a queue broken by a dead child: the check below restarts
            if outcome is not None:
                self._handle(outcome)
            if self._stopping.is_set():
                worker = self._worker
                if not self._busy or worker is None or not worker.is_alive():
                    return
                continue
            try:
                self._supervise()
            except Exception:  # the supervisor must outlive any one failure
                log.exception("fine-tuning supervisor failed; retrying")

    def _supervise(self) -> None:
        """Restart a dead worker when its backoff is over; end a run past its deadline."""
        now = time.monotonic()
        if self._restart_at is not None:
            if now >= self._restart_at:
                self._restart()
            return
        worker = self._worker
        if worker is None:
            return
        if not worker.is_alive():
            code = worker.exitcode if isinstance(worker, BaseProcess) else None
            self._worker_lost(f"died (exit code {code})" if code is not None else "died")
            return
        limit = self.settings.training.run_timeout_seconds
        if not self._busy or now - self._run_started <= limit:
            return
        if self._cancelled_at is None:
            log.error(
                "fine-tuning run still going after %.0fs (training.run_timeout_seconds); "
                "cancelling it",
                now - self._run_started,
            )
            self._cancelled_at = now
            self._cancel.set()
        elif now - self._cancelled_at > KILL_GRACE_SECONDS:
            if isinstance(worker, BaseProcess):
                worker.kill()
                worker.join(1.0)
            # A thread cannot be killed: it is abandoned (its queues are replaced).
            self._worker_lost(f"timed out after {now - self._run_started:.0f}s")

    def _worker_lost(self, reason: str) -> None:
        """The worker died or was given up: fail its run, back off, restart later."""
        with self._lock:
            code = worker.exitcode if isinstance(worker := self._worker, BaseProcess) else None
            if code == 1 and self._results_seen == 0:  # failed to start (not killed)
                self._quick_deaths += 1
            if self._busy:
                lost = RunOutcome("failed", self._version, error=f"worker {reason}")
                self._handle(lost, from_worker=False)
            self._busy = False
            if self._quick_deaths >= 2:  # e.g. a script without a __main__ guard cannot spawn
                log.error("fine-tuning process keeps dying at start; fine-tuning in a thread")
                self.executor = "thread"
                self._quick_deaths = 0
            delay = self._backoff
            self._backoff = min(RESTART_BACKOFF_CAP_SECONDS, 2 * delay)
            self._restart_at = time.monotonic() + delay
        self._set_up(False)
        log.error("fine-tuning worker %s; restarting it in %.0fs", reason, delay)

    def _restart(self) -> None:
        with self._lock:
            if self._stopping.is_set():  # stop() owns the worker now
                return
            self._start_worker()
            self._restart_at = None
            self.restarts += 1
        if self.metrics is not None:
            self.metrics.trainer_restarts.inc()
        self._set_up(True)
        log.warning("fine-tuning worker restarted (%s, restart %d)", self.executor, self.restarts)

    def _handle(self, outcome: RunOutcome, from_worker: bool = True) -> None:
        if from_worker:  # the worker works: the next death starts the backoff afresh
            self._results_seen += 1
            self._quick_deaths = 0
            self._backoff = RESTART_BACKOFF_SECONDS
        if self._cancelled_at is not None:
            self._cancelled_at = None  # the cancelled run ended: the next one may run fully
            self._cancel.clear()
        if outcome.result == "adopted":
            # The trainer adopted these weights (checkpointed or not): the engine serves
            # them too, so trainer and engine never disagree on the version.
            self._weights = outcome.weights or self._weights
            self._version = outcome.version
            self.engine.offer_weights(outcome.state_dict(), outcome.version)
            if self.on_adopted is not None:
                try:
                    self.on_adopted(outcome)
                except Exception:  # served here anyway; the next adoption is published
                    log.exception("publishing adopted weights v%d failed", outcome.version)
        if outcome.result != "skipped":
            self.counts[outcome.result] += 1
            self.total_run_seconds += outcome.seconds
        if outcome.result == "failed":
            log.error("fine-tuning run failed: %s", outcome.error)
        record_run_metrics(self.metrics, outcome)
        self.last_outcome = outcome
        self._busy = False
