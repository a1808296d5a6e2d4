"""ModelSync between the loop's thread and the trainer's receiver: forced interleavings.

Each test stops one thread at a chosen point (an :class:`threading.Event` in a fake), lets
the other run until it finishes or waits for ModelSync's lock (a lock that says when a
thread starts waiting for it), then lets the first go on. No sleeps, no timing.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from conftest import unit_daemon_settings
from test_model_sync import TOPIC, _Follower, _Publisher, _record

import streamlstm.daemon.modelsync as modelsync
from streamlstm.config import Settings
from streamlstm.daemon.modelsync import ModelSync
from streamlstm.engine import Engine
from streamlstm.learning.gate import RunOutcome, weights_to_bytes
from streamlstm.metrics import Metrics
from streamlstm.model import RecurrentModel

WAIT_S = 30.0  # a guard against a hang, never reached when the code is right


class _SpyLock:
    """A lock that sets ``reached[thread name]`` when that thread starts waiting for it."""

    def __init__(self, reached: dict[str, threading.Event]) -> None:
        self._lock = threading.Lock()
        self.reached = reached

    def __enter__(self) -> _SpyLock:
        self.reached[threading.current_thread().name].set()
        self._lock.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _thread(name: str, target: Callable[[], object], reached: dict) -> threading.Thread:
    """``target`` on a thread of its own; ``reached[name]`` is set when it waits for the
    lock or, when it never does, once it is done."""

    def run() -> None:
        try:
            target()
        finally:
            reached[name].set()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _sync(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelSync, dict]:
    monkeypatch.setattr(modelsync, "ModelFollower", lambda s, topic: _Follower())
    monkeypatch.setattr(modelsync, "ensure_model_topic", lambda kafka, topic: None)
    sync = ModelSync(Engine.from_settings(settings), settings, Metrics())
    reached: dict[str, threading.Event] = defaultdict(threading.Event)
    sync._lock = _SpyLock(reached)  # type: ignore[assignment]
    return sync, reached


def _outcome(settings: Settings, version: int) -> RunOutcome:
    net = RecurrentModel.from_settings(settings.model.model_copy(update={"seed": 11}))
    return RunOutcome("adopted", version, weights=weights_to_bytes(net.state_dict()))


@pytest.mark.parametrize("engine_first", [False, True])
def test_an_adoption_from_the_topic_and_a_publication_at_once_leave_the_newest(
    monkeypatch: pytest.MonkeyPatch, engine_first: bool
) -> None:
    """The loop adopts v5 from the topic (another trainer's last record) while this
    member's trainer adopts v6 and publishes it. The loop is stopped inside its offer,
    before or after the engine took it; the trainer offers v6 to the engine (as
    BackgroundTrainer does, before its callback) and publishes. Unlocked, the loop then
    wrote version 5 over 6, and its v5 offer replaced v6 in the engine: the member served
    v5 and skipped v6's echo."""
    monkeypatch.setattr(modelsync, "ModelPublisher", _Publisher)
    settings = unit_daemon_settings(TOPIC)
    sync, reached = _sync(settings, monkeypatch)
    sync.version = 4
    sync.trainer = object()  # type: ignore[assignment]  # trains: only the flag matters here
    inside, go = threading.Event(), threading.Event()
    offer = sync.engine.offer_weights

    def offer_weights(state_dict: dict, version: int) -> None:
        if engine_first:
            offer(state_dict, version)
        if threading.current_thread().name == "loop":
            inside.set()
            assert go.wait(WAIT_S)
        if not engine_first:
            offer(state_dict, version)

    monkeypatch.setattr(sync.engine, "offer_weights", offer_weights)
    loop = _thread("loop", lambda: sync._offer([_record(settings, 5)]), reached)
    assert inside.wait(WAIT_S)
    outcome = _outcome(settings, 6)

    def adopt() -> None:  # BackgroundTrainer: offer to the engine, then the callback
        sync.engine.offer_weights(outcome.state_dict(), outcome.version)
        sync._publish(outcome)

    receiver = _thread("receiver", adopt, reached)
    assert reached["receiver"].wait(WAIT_S)  # published, or waiting for the loop's lock
    go.set()
    loop.join(WAIT_S)
    receiver.join(WAIT_S)
    assert sync.version == 6
    sync.engine.adopt_offered()  # the next batch
    assert sync.engine.model_version == 6
    assert [v for _, v in sync.publisher.sent] == [6]  # type: ignore[union-attr]


def test_the_trainers_offer_does_not_replace_a_newer_one_from_the_topic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The other order: v7 adopted from the topic, then the trainer's v6 offered to the
    engine and published: v7 stays the version, and is served."""
    monkeypatch.setattr(modelsync, "ModelPublisher", _Publisher)
    settings = unit_daemon_settings(TOPIC)
    sync, _ = _sync(settings, monkeypatch)
    sync.version = 4
    sync.trainer = object()  # type: ignore[assignment]
    assert sync._offer([_record(settings, 7)])
    outcome = _outcome(settings, 6)
    sync.engine.offer_weights(outcome.state_dict(), outcome.version)
    sync._publish(outcome)
    sync.engine.adopt_offered()
    assert sync.version == 7 and sync.engine.model_version == 7
    outcome = _outcome(settings, 8)
    sync.engine.offer_weights(outcome.state_dict(), outcome.version)
    sync._publish(outcome)
    sync.engine.adopt_offered()
    assert sync.version == 8 and sync.engine.model_version == 8


class _SlowPublisher(_Publisher):
    """A publisher whose creation stops until ``go`` (a connection being made)."""

    made: ClassVar[list[_SlowPublisher]] = []
    creating: ClassVar[threading.Event] = threading.Event()
    go: ClassVar[threading.Event] = threading.Event()

    def __init__(self, settings: Settings, topic: str) -> None:
        super().__init__(settings, topic)
        self.closed = False
        _SlowPublisher.creating.set()
        assert _SlowPublisher.go.wait(WAIT_S)
        _SlowPublisher.made.append(self)

    def close(self) -> None:
        self.closed = True


def test_close_while_a_publisher_is_being_made_closes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The trainer did not stop in time; its receiver is creating the publisher when
    close() runs. Unlocked, close() found no publisher, and the one made a moment later
    was never closed."""
    monkeypatch.setattr(_SlowPublisher, "made", [])
    monkeypatch.setattr(_SlowPublisher, "creating", threading.Event())
    monkeypatch.setattr(_SlowPublisher, "go", threading.Event())
    monkeypatch.setattr(modelsync, "ModelPublisher", _SlowPublisher)
    settings = unit_daemon_settings(TOPIC)
    sync, reached = _sync(settings, monkeypatch)
    receiver = _thread("receiver", lambda: sync._publish(_outcome(settings, 3)), reached)
    assert _SlowPublisher.creating.wait(WAIT_S)
    closer = _thread("closer", sync.close, reached)
    assert reached["closer"].wait(WAIT_S)  # closed, or waiting for the receiver's lock
    _SlowPublisher.go.set()
    receiver.join(WAIT_S)
    closer.join(WAIT_S)
    [made] = _SlowPublisher.made
    assert made.closed and sync.publisher is None


def test_no_publisher_is_made_after_close(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []
    monkeypatch.setattr(
        modelsync, "ModelPublisher", lambda s, t: made.append(t) or _Publisher(s, t)
    )
    settings = unit_daemon_settings(TOPIC)
    sync, _ = _sync(settings, monkeypatch)
    sync.close()
    sync._publish(_outcome(settings, 3))  # a trainer that outlived close() adopts
    assert made == [] and sync.publisher is None and sync.version == 3
