"""The loop runs with the start-up objects frozen (no full-collection pauses over them)."""

from __future__ import annotations

import gc

import pytest

from streamlstm.config import load_settings
from streamlstm.daemon import Daemon
from streamlstm.daemon.heap import settled


def _collected(obj: object) -> bool:
    """Whether the collector traverses ``obj`` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_settled_freezes_what_is_alive_and_gives_it_back() -> None:
    assert gc.get_freeze_count() == 0
    kept = [1, 2]  # a tracked object alive at the start
    with settled() as frozen:
        assert frozen > 0 and gc.get_freeze_count() > 0
        assert not _collected(kept)
        young = [3, 4]  # made afterwards: collected as usual
        assert _collected(young)
    assert gc.get_freeze_count() == 0 and _collected(kept)


def test_the_loop_turns_with_start_up_objects_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(
        overrides={
            "model.input_size": "2",
            "model.hidden_size": "4",
            "training.enabled": "false",
            "metrics.enabled": "false",
        }
    )
    daemon = Daemon(settings)
    frozen: list[int] = []

    def turn() -> None:
        frozen.append(gc.get_freeze_count())
        daemon.request_stop()

    monkeypatch.setattr(daemon, "_connect", lambda: True)
    monkeypatch.setattr(daemon, "_turn", turn)
    monkeypatch.setattr(daemon, "_shutdown", lambda: None)
    assert gc.get_freeze_count() == 0
    assert daemon.run() == 0
    assert len(frozen) == 1 and frozen[0] > 0  # the engine and clients were made before
    assert gc.get_freeze_count() == 0  # an embedding process gets its heap back
