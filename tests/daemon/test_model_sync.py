"""The trainer role follows input partition 0; model records are checked before serving.

No broker: the rebalance listener is the real one (``streamlstm.io.source._Listener``),
driven by hand as kafka-python would (eager protocol: revoke all, assign the new set, or
lose); the model topic's follower and publisher are fakes that hold bytes.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import FakeSource, unit_daemon_settings
from kafka import TopicPartition

import streamlstm.daemon.loop as loop
import streamlstm.daemon.modelsync as modelsync
from streamlstm.config import Settings
from streamlstm.daemon import Daemon
from streamlstm.daemon.modelsync import ModelSync
from streamlstm.engine import Engine
from streamlstm.io.source import _Listener
from streamlstm.learning.checkpoint import architecture, decode_checkpoint, encode_checkpoint
from streamlstm.learning.gate import RunOutcome, weights_to_bytes
from streamlstm.metrics import Metrics
from streamlstm.model import RecurrentModel

TOPIC = "in"
_CLOCK = itertools.count(1000.0, 1.0)  # each turn a second later: past FOLLOW_SECONDS


class _Follower:
    """The model topic as a list of record values; ``poll`` hands out the new ones."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.caught = True

    def poll(self, timeout_ms: int = 0) -> list[bytes]:
        out, self.pending = self.pending, []
        return out

    def caught_up(self) -> bool:
        return self.caught

    def read_to_end(self, timeout_s: float, stop: Any = None) -> list[bytes]:
        return self.poll()

    def close(self) -> None:
        pass


class _Publisher:
    def __init__(self, settings: Settings, topic: str) -> None:
        self.sent: list[tuple[bytes, int]] = []

    def publish(self, value: bytes, version: int, done: Any) -> None:
        self.sent.append((value, version))
        done(None)

    def close(self) -> None:
        pass


def _settings(**overrides: str) -> Settings:
    return unit_daemon_settings(TOPIC, **overrides)


def _record(settings: Settings, version: int, seed: int = 1, **model: Any) -> bytes:
    """A model record of a model built from ``settings`` (or other ``model`` settings)."""
    net = RecurrentModel.from_settings(settings.model.model_copy(update={"seed": seed, **model}))
    return encode_checkpoint(net.state_dict(), architecture(net, settings), version)


def _role(daemon: Daemon) -> float | None:
    return daemon.metrics.registry.get_sample_value("streamlstm_trainer_role")


def _records(metrics: Metrics, result: str) -> float | None:
    return metrics.registry.get_sample_value("streamlstm_model_records_total", {"result": result})


@pytest.fixture
def follower(monkeypatch: pytest.MonkeyPatch) -> _Follower:
    fake = _Follower()
    monkeypatch.setattr(modelsync, "ModelFollower", lambda settings, topic: fake)
    monkeypatch.setattr(modelsync, "ModelPublisher", _Publisher)
    monkeypatch.setattr(modelsync, "ensure_model_topic", lambda kafka, topic: None)
    return fake


def test_the_role_follows_input_partition_0(
    monkeypatch: pytest.MonkeyPatch, follower: _Follower
) -> None:
    monkeypatch.setattr(loop, "make_source", FakeSource)
    sink = SimpleNamespace(flush=lambda timeout_s: True, poll_acks=lambda: None)
    monkeypatch.setattr(loop, "Sink", lambda settings: sink)
    monkeypatch.setattr(loop, "ensure_topics", lambda kafka, **kw: None)
    daemon = Daemon(_settings(**{"training.enabled": "true", "training.executor": "thread"}))
    assert daemon._connect() and daemon.models.started
    listener = _Listener(daemon.source)  # type: ignore[arg-type]
    p0, p1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)

    def rebalance(*steps: tuple[str, set[TopicPartition]]) -> None:
        for method, partitions in steps:
            asyncio.run(getattr(listener, f"on_partitions_{method}")(partitions))
        daemon.models.turn(next(_CLOCK))  # the loop's next turn acts on the flag

    try:
        rebalance(("assigned", {p1}))
        assert daemon.trainer is None and _role(daemon) == 0
        rebalance(("revoked", {p1}), ("assigned", {p0, p1}))  # partition 0 arrives
        trainer = daemon.trainer
        assert trainer is not None and trainer.healthy and _role(daemon) == 1
        assert daemon.engine.learner is trainer.buffer  # only the trainer fills a replay buffer
        rebalance(("revoked", {p0, p1}), ("assigned", {p0}))  # given straight back: kept
        assert daemon.trainer is trainer
        rebalance(("revoked", {p0}), ("assigned", {p1}))  # partition 0 moved on
        assert daemon.trainer is None and _role(daemon) == 0 and not trainer.healthy
        assert daemon.engine.learner is None
        rebalance(("revoked", {p1}), ("assigned", {p0, p1}))
        assert daemon.trainer is not None and _role(daemon) == 1
        rebalance(("lost", {p0, p1}))  # membership expired: another member trains now
        assert daemon.trainer is None and _role(daemon) == 0
    finally:
        daemon.models.close()


def test_a_new_trainer_waits_until_it_read_what_the_last_one_published(
    follower: _Follower,
) -> None:
    settings = _settings(**{"training.enabled": "true", "training.executor": "thread"})
    sync = ModelSync(Engine.from_settings(settings), settings, Metrics())
    try:
        sync.start()
        follower.caught = False
        sync.owned({0})
        sync.turn(next(_CLOCK))
        assert sync.trainer is None  # not yet read to the high watermark
        follower.pending.append(_record(settings, 4))
        follower.caught = True
        sync.turn(next(_CLOCK))
        assert sync.trainer is not None
        assert sync.engine.model_version == 4  # it trains from (and serves) the newest
    finally:
        sync.close()


def test_without_training_no_member_trains_but_every_member_adopts(
    follower: _Follower,
) -> None:
    settings = _settings()  # training.enabled = false
    metrics = Metrics()
    sync = ModelSync(Engine.from_settings(settings), settings, metrics)
    follower.pending.append(_record(settings, 2))
    sync.start()
    assert sync.engine.model_version == 2  # served from the first batch on
    sync.owned({0})
    follower.pending.append(_record(settings, 3, seed=5))
    sync.turn(next(_CLOCK))
    assert sync.trainer is None and metrics.trainer_role._value.get() == 0
    sync.engine.adopt_offered()
    assert sync.engine.model_version == 3 and _records(metrics, "adopted") == 2


def test_the_model_topic_is_not_read_on_every_turn(
    follower: _Follower, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read is a client poll on the loop's thread (kafka-python's: milliseconds), so a
    busy loop, turning every millisecond, reads it only every FOLLOW_SECONDS."""
    settings = _settings()
    sync = ModelSync(Engine.from_settings(settings), settings, Metrics())
    sync.start()
    reads: list[int] = []
    monkeypatch.setattr(follower, "poll", lambda timeout_ms=0: reads.append(timeout_ms) or [])
    start = 5000.0
    for i in range(2001):  # two seconds of turns
        sync.turn(start + i / 1000)
    assert reads and set(reads) == {0}  # never waits
    assert len(reads) <= 2 / modelsync.FOLLOW_SECONDS + 1


def test_corrupt_foreign_and_stale_records_are_counted_never_served(
    follower: _Follower,
) -> None:
    settings = _settings()
    metrics = Metrics()
    engine = Engine.from_settings(settings)
    sync = ModelSync(engine, settings, metrics)
    good = _record(settings, 3, seed=7)
    payload = torch.load(io.BytesIO(_record(settings, 9, seed=8)), weights_only=True)
    payload["state_dict"]["head.bias"][0] += 1.0  # a changed weight under the old digest
    flipped = io.BytesIO()
    torch.save(payload, flipped)
    foreign = _record(settings, 8, hidden_size=16)
    follower.pending += [good, foreign, flipped.getvalue()]  # the newest two fail their checks
    sync.start()
    assert engine.model_version == 3
    expected = decode_checkpoint(good).state_dict
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, expected[name])
    assert _records(metrics, "rejected") == 2 and _records(metrics, "adopted") == 1
    follower.pending.append(_record(settings, 3, seed=9))  # not newer than served
    sync.turn(next(_CLOCK))
    engine.adopt_offered()
    assert _records(metrics, "stale") == 1 and engine.model_version == 3


def test_adopted_weights_are_published_as_a_checked_record(follower: _Follower) -> None:
    settings = _settings()
    metrics = Metrics()
    sync = ModelSync(Engine.from_settings(settings), settings, metrics)
    sync.start()
    sync.publisher = publisher = _Publisher(settings, sync.topic)
    net = RecurrentModel.from_settings(settings.model.model_copy(update={"seed": 3}))
    outcome = RunOutcome("adopted", 6, weights=weights_to_bytes(net.state_dict()))
    sync._publish(outcome)
    [(value, version)] = publisher.sent
    ckpt = decode_checkpoint(value, sync.expect)
    assert version == ckpt.version == 6 and sync.version == 6
    assert _records(metrics, "published") == 1
    follower.pending.append(value)  # its own record comes back: already served
    sync.turn(next(_CLOCK))
    assert _records(metrics, "stale") == 1 and _records(metrics, "adopted") == 0


def test_an_unreachable_model_topic_delays_the_trainer_but_does_not_stop_it(
    monkeypatch: pytest.MonkeyPatch, follower: _Follower
) -> None:
    def refused(settings: Settings, topic: str) -> _Follower:
        raise ConnectionError("no broker")

    monkeypatch.setattr(modelsync, "ModelFollower", refused)
    settings = _settings(**{"training.enabled": "true", "training.executor": "thread"})
    metrics = Metrics()
    sync = ModelSync(Engine.from_settings(settings), settings, metrics)
    try:
        assert not sync.start()
        sync.owned({0})
        now = time.monotonic()  # the role's clock
        sync.turn(now)
        assert sync.trainer is None  # waits to read what an earlier trainer published...
        sync.turn(now + modelsync.CATCH_UP_SECONDS + 1)
        assert sync.trainer is not None  # ...but not for ever: fine-tuning must go on
        errors = metrics.registry.get_sample_value(
            "streamlstm_broker_errors_total", {"operation": "model_topic"}
        )
        assert errors is not None and errors >= 1
    finally:
        sync.close()


def test_the_model_topic_is_named_after_the_input_and_must_be_its_own() -> None:
    from streamlstm.config import ConfigError, load_settings

    settings = _settings()
    assert settings.model_topic == f"{settings.kafka.group_id}.{TOPIC}.model"
    assert settings.changelog_topic == f"{settings.kafka.group_id}.{TOPIC}.state"
    other_job = _settings(**{"kafka.group_id": "staging"})  # the same input, another job
    assert other_job.model_topic != settings.model_topic
    assert other_job.changelog_topic != settings.changelog_topic
    assert _settings(**{"training.model_topic": "weights"}).model_topic == "weights"
    with pytest.raises((ConfigError, ValueError), match=r"training\.model_topic"):
        load_settings(overrides={"kafka.output_topic": "w", "training.model_topic": "w"})
