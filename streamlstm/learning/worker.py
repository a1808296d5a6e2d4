"""The fine-tuning worker: what runs in the child process (or thread), and how it starts.

Kept apart from :class:`~streamlstm.learning.background.BackgroundTrainer` because this
side is all a spawned child imports and runs: it rebuilds the model from settings, reads
the replay buffer from shared memory, and does one run per command it receives. The
trainer (in the daemon) decides when runs happen and supervises the worker.

A child exits within about a second when its parent dies, even by ``kill -9``: a
watchdog thread polls its parent pid (:data:`WATCHDOG_SECONDS`).
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import torch

from streamlstm.config import Settings
from streamlstm.learning.gate import FineTuner, RunOutcome, weights_from_bytes
from streamlstm.learning.windows import ReplayReader
from streamlstm.model import RecurrentModel

if TYPE_CHECKING:
    import multiprocessing.queues
    import multiprocessing.synchronize

    Commands = queue.Queue[str | None] | multiprocessing.queues.Queue[str | None]
    Results = queue.Queue[RunOutcome] | multiprocessing.queues.Queue[RunOutcome]
    Event = threading.Event | multiprocessing.synchronize.Event

#: How often the child checks that its parent is still there.
WATCHDOG_SECONDS = 1.0


@dataclass
class WorkerSpec:
    """Everything a worker needs; picklable for a spawned child process."""

    settings: Settings
    weights: bytes
    version: int
    reader: ReplayReader
    threads: int
    cancel: Event | None = None
    write_checkpoints: bool = True
    parent_pid: int | None = None  # a child process exits once this is not its parent


def new_worker(
    spec: WorkerSpec, executor: str
) -> tuple[threading.Thread | BaseProcess, Event, Commands, Results]:
    """A worker for ``spec``, not started yet, with its own cancel event and queues.

    ``executor`` is ``"process"`` (a spawned child: training never holds the event
    loop's GIL) or ``"thread"``. Fresh queues and event each time, so whatever an
    abandoned worker still sends goes nowhere.
    """
    cancel: Event
    commands: Commands
    results: Results
    worker: threading.Thread | BaseProcess
    if executor == "process":
        ctx = torch.multiprocessing.get_context("spawn")
        spec.cancel = cancel = ctx.Event()
        spec.parent_pid = os.getpid()
        commands, results = ctx.Queue(), ctx.Queue()
        worker = ctx.Process(
            target=worker_main,
            args=(spec, commands, results),
            name="streamlstm-finetune",
            daemon=True,
        )
    else:
        spec.cancel = cancel = threading.Event()
        commands, results = queue.Queue(), queue.Queue()
        worker = threading.Thread(
            target=worker_main,
            args=(spec, commands, results),
            name="finetune",
            daemon=True,
        )
    return worker, cancel, commands, results


def _watch_parent(parent_pid: int, interval: float) -> None:
    """In the child: exit as soon as the parent is gone. A parent killed with SIGKILL
    never sends ``None``; the orphan would block in ``commands.get()`` forever, holding
    its model and the mapped replay buffer. Orphans are re-parented, so the parent pid
    changes."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(interval)


def worker_main(spec: WorkerSpec, commands: Commands, results: Results) -> None:
    """Worker loop (thread or child process): one run per command until ``None``."""
    if threading.current_thread() is threading.main_thread():
        # A child process: Ctrl-C reaches the whole process group, but the parent decides
        # when fine-tuning stops (it sends None), so an interrupt must not kill a run.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if spec.parent_pid is not None:
            threading.Thread(
                target=_watch_parent,
                args=(spec.parent_pid, WATCHDOG_SECONDS),
                name="parent-watchdog",
                daemon=True,
            ).start()
    torch.set_num_threads(spec.threads)
    model = RecurrentModel.from_settings(spec.settings.model)
    model.load_state_dict(weights_from_bytes(spec.weights))
    tuner = FineTuner(model, spec.settings, spec.version, spec.write_checkpoints, spec.cancel)
    while True:
        command = commands.get()
        if command is None:
            return
        results.put(tuner.run(spec.reader))
