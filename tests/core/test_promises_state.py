"""Eviction promises of the keyed state, driven through the engine's public step.

One partition, event times far in the past of the wall clock, so the TTL is judged in
event time whether the store reads it per batch or as a watermark over partitions.
"""

from __future__ import annotations

import numpy as np

from streamlstm.config import load_settings
from streamlstm.engine import BatchOutput, Engine
from streamlstm.events import EventBatch

T0 = 1_000_000.0  # 1970: long before the wall clock
TTL = 100.0


def _engine() -> Engine:
    return Engine.from_settings(
        load_settings(
            overrides={
                "model.input_size": "1",
                "model.hidden_size": "4",
                "model.num_layers": "1",
                "training.enabled": "false",
                "drift.enabled": "false",
                "state.ttl_seconds": str(TTL),
            }
        )
    )


def _send(engine: Engine, events: list[tuple[str, float]]) -> BatchOutput:
    keys = [k for k, _ in events]
    ts = np.array([T0 + t for _, t in events])
    values = np.arange(1.0, len(events) + 1.0).reshape(-1, 1)
    return engine.process(
        EventBatch.from_arrays(keys, ts, values), partition=np.zeros(len(events), np.int32)
    )


def test_ttl_is_judged_at_the_batch_earliest_event_so_a_continued_key_survives() -> None:
    """A batch spanning more than the TTL keeps a key it continues (no state reset)."""
    engine = _engine()
    _send(engine, [("a", 0.0)])
    # a is idle 50 s at its own event, but 200 s at the batch's last event.
    out = _send(engine, [("a", 50.0), ("b", 200.0)])
    assert not np.isnan(out.error[0]), "a's pending prediction was lost: its row was evicted"
    assert engine.store.evictions["ttl"] == 0
    assert float(engine.store.read("a", "count")) == 2.0


def test_an_expired_key_is_gone_within_one_percent_of_the_ttl() -> None:
    """Keys are swept whenever event time advanced by 1% of the TTL, not once per TTL:
    a key idle just over the TTL is gone one sweep later, not up to a TTL later."""
    engine = _engine()
    _send(engine, [("idle", 0.0)])
    step = 0.25  # a busy key keeps event time moving in small steps
    gone_at = None
    for t in np.arange(step, 1.5 * TTL, step):
        _send(engine, [("busy", float(t))])
        if t <= TTL:
            assert "idle" in engine.store, f"evicted at {t}, before its TTL"
        elif "idle" not in engine.store:
            gone_at = float(t)
            break
    assert gone_at is not None, "an expired key outlived the TTL by half a TTL"
    assert gone_at <= TTL + 0.01 * TTL + step
    assert engine.store.evictions["ttl"] == 1 and "busy" in engine.store
