"""The daemon's trainer: runs beside the loop, swaps weights between batches, counts runs."""

from __future__ import annotations

import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import wait_for

from streamlstm.config import Settings, load_settings
from streamlstm.devtools.synthetic import SyntheticStream
from streamlstm.engine import Engine
from streamlstm.events import EventBatch
from streamlstm.learning.background import BackgroundTrainer, _shared_memory_fits
from streamlstm.metrics import Metrics


def _settings(executor: str, tmp_path: Path | None = None) -> Settings:
    overrides = {
        "model.input_size": "2",
        "model.hidden_size": "16",
        "model.num_layers": "1",
        "training.executor": executor,
        "training.interval_events": "400",
        "training.steps_per_run": "8",
        "training.batch_windows": "16",
        "training.window": "24",
        "training.burn_in": "4",
        "training.replay_bytes": str(2**20),
        "training.learning_rate": "0.005",
    }
    if tmp_path is not None:
        overrides["training.checkpoint_dir"] = str(tmp_path)
        overrides["training.keep_checkpoints"] = "2"
    return load_settings(overrides=overrides)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_runs_beside_the_loop_and_swaps_between_batches(executor: str, tmp_path: Path) -> None:
    settings = _settings(executor, tmp_path)
    if executor == "process" and not _shared_memory_fits(settings.training.replay_bytes):
        # The trainer would fall back to a thread, and this case would test that path
        # twice while claiming to test the child process.
        pytest.skip("/dev/shm is too small for training.replay_bytes: no child process")
    engine = Engine.from_settings(settings)
    metrics = Metrics()
    trainer = BackgroundTrainer(engine, settings, metrics).start()
    assert trainer.executor == executor, f"asked for a {executor}, got a {trainer.executor}"
    kind = BaseProcess if executor == "process" else threading.Thread
    assert isinstance(trainer._worker, kind), type(trainer._worker)
    stream = SyntheticStream(n_keys=10, width=2, seed=1, start_ts=0.0, anomaly_rate=0.0)
    versions = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            a = stream.arrays(100)
            out = engine.process(
                EventBatch.from_arrays([stream.key_names[k] for k in a.key_index], a.ts, a.values)
            )
            trainer.notify(out)
            versions.append(out.model_version)
            if versions[-1] >= 2 and len(versions) > 30:
                break
            time.sleep(0.002)  # a stream, not a flood: the worker gets its turns
    finally:
        trainer.stop()
    assert versions[-1] >= 2, trainer.counts
    assert versions == sorted(versions)  # versions only ever move forward, batch by batch
    sample = metrics.registry.get_sample_value
    assert sample("streamlstm_finetune_runs_total", {"result": "adopted"}) >= 2
    assert sample("streamlstm_replay_bytes") > 0
    assert sample("streamlstm_finetune_seconds_count") >= 2
    # Adopted weights were checkpointed; the newest two are kept.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[-1] >= "ckpt-00000002.pt"
    resumed = Engine.from_settings(settings)
    assert resumed.model_version >= 2


def test_disabled_trainer_records_nothing_and_never_runs() -> None:
    settings = _settings("thread")
    settings.training.enabled = False
    engine = Engine.from_settings(settings)
    trainer = BackgroundTrainer(engine, settings).start()
    out = engine.process(EventBatch.from_arrays(["a"] * 3, np.arange(3.0), np.ones((3, 2))))
    trainer.notify(out)
    trainer.stop()
    assert engine.learner is None and not trainer.counts


def test_falls_back_to_a_thread_when_shared_memory_is_too_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import streamlstm.learning.background as trainer_module

    monkeypatch.setattr(trainer_module, "_shared_memory_fits", lambda nbytes: False)
    settings = _settings("process")
    trainer = BackgroundTrainer(Engine.from_settings(settings), settings)
    assert trainer.executor == "thread" and trainer.buffer is not None


def test_the_worker_trains_the_model_the_engine_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker rebuilds the engine's model from settings: same architecture, dropout
    included (it once dropped ``model.dropout``, so the child trained a different net)."""
    import streamlstm.learning.worker as worker_module

    built: list[torch.nn.Module] = []

    class Capture:
        def __init__(self, model: torch.nn.Module, *args: object) -> None:
            built.append(model)

    monkeypatch.setattr(worker_module, "FineTuner", Capture)
    settings = _settings("thread")
    settings.model.num_layers = 2
    settings.model.dropout = 0.25
    engine = Engine.from_settings(settings)
    trainer = BackgroundTrainer(engine, settings).start()
    try:
        wait_for(lambda: built, 10, interval=0.01, what="the worker to build a model")
    finally:
        trainer.stop()
    worker = built[0]
    assert worker.rnn.dropout == engine.model.rnn.dropout == 0.25
    assert worker.describe() == engine.model.describe()
    for (name, mine), (_, theirs) in zip(
        worker.state_dict().items(), engine.model.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, theirs), name
