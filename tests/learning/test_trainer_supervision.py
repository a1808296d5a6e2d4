"""The trainer's supervision: an orphaned child exits, a dead or hung worker is restarted
with backoff and counted, and ``training.device = "cuda"`` without a GPU is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

import streamlstm.learning.background as background
import streamlstm.learning.worker as worker_module
from streamlstm.cli import main
from streamlstm.config import ConfigError, Settings, load_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch
from streamlstm.learning.background import BackgroundTrainer
from streamlstm.learning.gate import RunOutcome
from streamlstm.learning.inline import InlineTrainer
from streamlstm.metrics import Metrics

OVERRIDES = {
    "model.input_size": "2",
    "model.hidden_size": "8",
    "model.num_layers": "1",
    "training.interval_events": "1",
    "training.steps_per_run": "2",
    "training.batch_windows": "4",
    "training.window": "8",
    "training.burn_in": "2",
    "training.replay_bytes": str(2**20),
    "training.torch_threads": "1",
}


def _settings(**extra: str) -> Settings:
    return load_settings(overrides={**OVERRIDES, **extra})


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a container's init may not reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")


def _wait(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _batch(engine: Engine, n: int = 4) -> object:
    return engine.process(
        EventBatch.from_arrays(["a"] * n, np.arange(n, dtype=float) + time.time(), np.ones((n, 2)))
    )


PARENT = textwrap.dedent(
    """
    import sys, time
    from streamlstm.config import load_settings
    from streamlstm.engine import Engine
    from streamlstm.learning.background import BackgroundTrainer

    if __name__ == "__main__":
        overrides = dict(a.split("=", 1) for a in sys.argv[1:])
        settings = load_settings(overrides=overrides)
        trainer = BackgroundTrainer(Engine.from_settings(settings), settings).start()
        print(trainer.worker_pid(), flush=True)
        time.sleep(600)
    """
)


def test_the_child_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    args = [f"{k}={v}" for k, v in {**OVERRIDES, "training.executor": "process"}.items()]
    parent = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        time.sleep(2.0)  # let the child get going (import torch, build the model)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait(lambda: not _alive(child), 20.0), "orphaned trainer child still running"
    finally:
        parent.kill()
        parent.wait(10)
        if "child" in locals() and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_killed_child_is_restarted_with_backoff_and_counted() -> None:
    settings = _settings(**{"training.executor": "process", "training.interval_seconds": "3600"})
    settings.training.interval_events = 10**9  # no runs until this test asks for one
    engine = Engine.from_settings(settings)
    metrics = Metrics()
    trainer = BackgroundTrainer(engine, settings, metrics).start()
    sample = metrics.registry.get_sample_value
    try:
        assert trainer.healthy and sample("streamlstm_trainer_up") == 1
        assert sample("streamlstm_trainer_restarts_total") == 0
        first = trainer.worker_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert _wait(lambda: not trainer.healthy, 10.0), "death not noticed"
        assert _wait(lambda: sample("streamlstm_trainer_up") == 0, 10.0)
        assert _wait(lambda: trainer.restarts == 1 and trainer.healthy, 30.0)
        assert sample("streamlstm_trainer_restarts_total") == 1
        assert sample("streamlstm_trainer_up") == 1
        assert trainer.worker_pid() not in (None, first)
        # The new worker runs fine-tuning.
        settings.training.interval_events = 1
        deadline = time.monotonic() + 60
        while trainer.last_outcome is None and time.monotonic() < deadline:
            trainer.notify(_batch(engine, 16))
            time.sleep(0.05)
        assert trainer.last_outcome is not None and trainer.last_outcome.result != "failed"
    finally:
        trainer.stop()
    assert sample("streamlstm_trainer_up") == 0


class _Hanging:
    """A FineTuner whose run hangs (``obey``: until cancelled; else until released)."""

    obey = False
    release = threading.Event()
    started: ClassVar[list[float]] = []

    def __init__(self, model: object, settings: Settings, version: int, *args: object) -> None:
        self.version = version
        self.cancel = args[-1]

    def run(self, reader: object) -> RunOutcome:
        type(self).started.append(time.monotonic())
        while not self.release.is_set():
            if self.obey and self.cancel.is_set():  # type: ignore[attr-defined]
                return RunOutcome("rejected", self.version)
            time.sleep(0.01)
        return RunOutcome("rejected", self.version)


@pytest.mark.parametrize("obey", [False, True])
def test_a_run_past_its_deadline_is_cancelled_then_its_worker_replaced(
    obey: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    hanging = type("Hanging", (_Hanging,), {"obey": obey, "release": threading.Event()})
    hanging.started = []
    monkeypatch.setattr(worker_module, "FineTuner", hanging)
    monkeypatch.setattr(background, "KILL_GRACE_SECONDS", 0.3)
    monkeypatch.setattr(background, "RESTART_BACKOFF_SECONDS", 0.2)
    settings = _settings(**{"training.executor": "thread", "training.run_timeout_seconds": "0.5"})
    engine = Engine.from_settings(settings)
    metrics = Metrics()
    trainer = BackgroundTrainer(engine, settings, metrics).start()
    sample = metrics.registry.get_sample_value
    try:
        assert _wait(lambda: (trainer.notify(_batch(engine)), trainer.busy)[1], 10.0)
        assert _wait(lambda: not trainer.busy, 10.0), "the hung run was never ended"
        if obey:  # cancelled in time: the same worker goes on, and its next run is whole
            assert trainer.counts == {"rejected": 1} and trainer.restarts == 0
            assert not trainer._cancel.is_set()
        else:  # ignored the cancellation: failed, abandoned, and a new worker started
            assert trainer.counts == {"failed": 1}
            assert trainer.last_outcome is not None and "timed out" in str(
                trainer.last_outcome.error
            )
            assert _wait(lambda: trainer.restarts == 1 and trainer.healthy, 10.0)
            assert sample("streamlstm_trainer_restarts_total") == 1
            assert sample("streamlstm_finetune_runs_total", {"result": "failed"}) == 1
        # Fine-tuning goes on: another run starts.
        assert _wait(lambda: (trainer.notify(_batch(engine)), len(hanging.started) >= 2)[1], 10.0)
    finally:
        hanging.release.set()
        trainer.stop()


def test_cuda_without_a_gpu_is_refused_where_the_trainer_starts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = _settings(**{"training.device": "cuda", "training.executor": "thread"})
    engine = Engine.from_settings(settings)
    for trainer in (BackgroundTrainer, InlineTrainer):
        with pytest.raises(ConfigError, match=r'^training\.device: "cuda", but torch sees no CUDA'):
            trainer(engine, settings)
    settings.training.enabled = False
    BackgroundTrainer(engine, settings)  # not fine-tuning: no device needed
    data = tmp_path / "d.csv"
    data.write_text("t,a,b\n1,1,2\n2,2,3\n3,3,4\n")
    assert main(["replay", str(data), "--set", "training.device=cuda", "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "training.device" in line
