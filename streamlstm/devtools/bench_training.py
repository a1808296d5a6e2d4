"""``streamlstm bench training``: inference speed while fine-tuning runs, against training off.

One engine (the reference model: input 8, hidden 64, 2 layers, 1 inference thread)
serves synthetic events from many keys. Time slices alternate between *off* (no replay
recording, no trainer runs) and *on* (replay recording and a trainer that starts the
next fine-tuning run as soon as one ends, i.e. training all the time), in the same
process, so a shared, noisy machine affects both alike; the medians are compared.
Both executors are measured: a child process reading the replay buffer from shared
memory, and a thread in the engine's process.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from streamlstm.devtools.bench_engine import reference_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch
from streamlstm.learning.background import BackgroundTrainer, training_threads


@dataclass
class TrainingBench:
    executor: str
    off_events_per_s: float
    on_events_per_s: float
    ratio: float
    runs: int
    run_seconds: float
    keys: int
    batch: int
    training_threads: int
    slices: list[tuple[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.executor:<8} off {self.off_events_per_s:>10,.0f} ev/s   "
            f"training {self.on_events_per_s:>10,.0f} ev/s   ratio {self.ratio:.2f}   "
            f"({self.runs} runs, {self.run_seconds:.2f} s each, "
            f"{self.training_threads} training thread(s))"
        )


def bench_training(
    executor: str = "process",
    keys: int = 2000,
    batch: int = 1024,
    slice_seconds: float = 3.0,
    slices: int = 5,
    seed: int = 0,
) -> TrainingBench:
    """Alternate off/on slices of ``slice_seconds``; ratio of the median rates."""
    settings = reference_settings(keys, batch, threads=1)
    t = settings.training
    t.executor = executor  # type: ignore[assignment]
    t.first_run_events = t.interval_events = 1  # the next run as soon as the last ends
    t.interval_seconds = 1e-3
    t.replay_bytes = 16 * 2**20
    settings.drift.finetune_on_drift = False
    engine = Engine.from_settings(settings)
    trainer = BackgroundTrainer(engine, settings)
    buffer = trainer.buffer
    rng = np.random.default_rng(seed)
    names = [f"sensor-{i:05d}" for i in range(keys)]
    clock = [0.0]

    def events() -> EventBatch:
        clock[0] += 1.0
        picks = rng.integers(0, keys, batch)
        values = np.sin(clock[0] / 10 + picks[:, None] / 7 + np.arange(8)) + rng.normal(
            0, 0.1, (batch, 8)
        )
        return EventBatch.from_arrays([names[i] for i in picks], np.full(batch, clock[0]), values)

    pool = [events() for _ in range(64)]
    # Warm up: enough events that every key has complete windows in the buffer.
    for _ in range(keys * (t.window + 2) // batch + 1):
        engine.process(events())
    trainer.start()

    def run_slice(training: bool) -> float:
        engine.attach_learner(buffer if training else None)
        if not training:
            while trainer.busy:  # let the run in flight finish: "off" means off
                time.sleep(0.01)
        done, i = 0, 0
        started = time.perf_counter()
        while time.perf_counter() - started < slice_seconds:
            out = engine.process(pool[i % len(pool)])
            if training:
                trainer.notify(out)
            done += len(out)
            i += 1
        return done / (time.perf_counter() - started)

    try:
        run_slice(True)  # the worker's first run pays for its start-up
        before = sum(trainer.counts.values())
        seconds_before = trainer.total_run_seconds
        record: list[tuple[str, float]] = []
        for _ in range(slices):
            record.append(("off", run_slice(False)))
            record.append(("on", run_slice(True)))
        runs = sum(trainer.counts.values()) - before
        run_seconds = (trainer.total_run_seconds - seconds_before) / max(1, runs)
    finally:
        trainer.stop()
    off = statistics.median(r for k, r in record if k == "off")
    on = statistics.median(r for k, r in record if k == "on")
    return TrainingBench(
        executor=trainer.executor,
        off_events_per_s=off,
        on_events_per_s=on,
        ratio=on / off,
        runs=runs,
        run_seconds=run_seconds,
        keys=keys,
        batch=batch,
        training_threads=training_threads(settings),
        slices=record,
    )
