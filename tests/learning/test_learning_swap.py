"""Weight swaps happen between batches, never inside one, also when offered from a thread."""

from __future__ import annotations

import threading

import numpy as np
import torch

from streamlstm.config import load_settings
from streamlstm.engine import Engine, StepRecord
from streamlstm.events import EventBatch


def _settings():
    return load_settings(overrides={"model.input_size": "2", "model.hidden_size": "8"})


def _weights(engine: Engine, scale: float) -> dict[str, torch.Tensor]:
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    weights["head.bias"] = torch.full_like(weights["head.bias"], scale)
    return weights


def _batches(n: int, seed: int = 0) -> list[EventBatch]:
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        keys = [f"k{i}" for i in rng.integers(0, 4, 12)]  # repeats: several steps per batch
        ts = np.arange(12) + 100.0 * b
        out.append(EventBatch.from_arrays(keys, ts, rng.normal(size=(12, 2))))
    return out


class OfferMidway:
    """A step consumer that offers new weights once the batch's first step has run."""

    def __init__(self, engine: Engine, weights: dict[str, torch.Tensor]) -> None:
        self.engine, self.weights, self.steps = engine, weights, 0

    def begin(self, events: int, capacity: int) -> None:
        pass

    def record(self, step: StepRecord) -> None:
        self.steps += 1
        if self.steps == 2:
            self.engine.offer_weights(self.weights, 7)

    def end(self) -> None:
        pass


def test_offer_inside_a_batch_takes_effect_at_the_next_batch() -> None:
    batches = _batches(2)
    engine, reference = Engine.from_settings(_settings()), Engine.from_settings(_settings())
    new = _weights(engine, 0.5)
    learner = OfferMidway(engine, new)
    engine.attach_learner(learner)
    first = engine.process(batches[0])
    assert learner.steps > 2  # the batch really had several steps after the offer
    expected = reference.process(batches[0])
    assert first.model_version == 0
    np.testing.assert_array_equal(first.prediction, expected.prediction)

    engine.attach_learner(None)
    second = engine.process(batches[1])
    reference.offer_weights(new, 7)
    expected = reference.process(batches[1])
    assert second.model_version == 7
    np.testing.assert_array_equal(second.prediction, expected.prediction)


def test_offers_from_another_thread_swap_only_between_batches() -> None:
    batches = _batches(60, seed=1)
    engine = Engine.from_settings(_settings())
    base = _weights(engine, 0.0)
    offered: dict[int, dict[str, torch.Tensor]] = {}
    stop = threading.Event()

    def offer_forever() -> None:
        v = 0
        while not stop.wait(0.0002):
            v += 1
            offered[v] = {**base, "head.bias": torch.full_like(base["head.bias"], 0.01 * v)}
            engine.offer_weights(offered[v], v)

    thread = threading.Thread(target=offer_forever)
    thread.start()
    runs = [engine.process(b) for b in batches]
    stop.set()
    thread.join()
    assert len({o.model_version for o in runs}) > 2  # swaps did happen during the run
    # Replay, swapping each batch's reported weights in synchronously before it: if any
    # batch had mixed weights inside, its predictions would differ from this.
    reference = Engine.from_settings(_settings())
    for b, out in zip(batches, runs, strict=True):
        if out.model_version:
            reference.offer_weights(offered[out.model_version], out.model_version)
        np.testing.assert_array_equal(out.prediction, reference.process(b).prediction)


class _SpyLock:
    """The engine's offer lock, setting ``waiting`` when the thread named ``trainer``
    starts waiting for it."""

    def __init__(self, waiting: threading.Event) -> None:
        self._lock, self.waiting = threading.Lock(), waiting

    def __enter__(self) -> None:
        if threading.current_thread().name == "trainer":
            self.waiting.set()
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _offer_during_adoption(position: int, first: int = 1, second: int = 2) -> tuple[int, int]:
    """Adopt offered weights v``first`` while a second offer (v``second``, from another
    thread) lands just before bytecode instruction ``position`` of
    ``Engine._adopt_offered``: that thread
    runs until it is done or waits for the engine's lock; then adopt again (the next
    batch). Returns the version served and the instructions the first adoption ran."""
    import sys
    import types

    overrides = {"model.input_size": "1", "model.hidden_size": "8"}
    engine = Engine.from_settings(load_settings(overrides=overrides))
    weights = {k: v.clone() for k, v in engine.model.state_dict().items()}
    engine.offer_weights(weights, first)
    offered = threading.Event()  # the trainer's thread offered, or waits for the lock
    engine._offer_lock = _SpyLock(offered)  # type: ignore[assignment]

    def offer() -> None:
        engine.offer_weights(weights, second)
        offered.set()

    trainer = threading.Thread(target=offer, name="trainer")
    ran = 0

    def opcode(frame: types.FrameType, event: str, arg: object) -> object:
        nonlocal ran
        if event == "opcode":
            if ran == position:
                trainer.start()  # the trainer's thread, right here
                assert offered.wait(30.0)
            ran += 1
        return opcode

    def calls(frame: types.FrameType, event: str, arg: object) -> object:
        if frame.f_code is Engine._adopt_offered.__code__:
            frame.f_trace_opcodes = True
            return opcode
        return None

    sys.settrace(calls)
    try:
        engine.adopt_offered()
    finally:
        sys.settrace(None)
    trainer.join(30.0)
    engine.adopt_offered()
    return engine.model_version, ran


def test_weights_offered_at_any_moment_of_an_adoption_are_never_lost() -> None:
    """The trainer's thread offers weights while the loop adopts the last offer. Wherever
    the offer lands in ``_adopt_offered`` (each of its bytecode instructions in turn),
    the newest weights are served after the next batch."""
    position, ran = 0, 1
    while position < ran:
        version, ran = _offer_during_adoption(position)
        assert version == 2, f"an offer at instruction {position} was lost"
        position += 1
    assert position > 3


def test_an_older_offer_landing_at_any_moment_of_an_adoption_never_replaces_it() -> None:
    """The model topic's v2 arrives while the loop adopts the trainer's v3: wherever it
    lands (the version must move with the take, not after the load), v3 stays served."""
    position, ran = 0, 1
    while position < ran:
        version, ran = _offer_during_adoption(position, first=3, second=2)
        assert version == 3, f"an older offer at instruction {position} was served"
        position += 1
    assert position > 3
