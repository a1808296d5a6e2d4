"""The confluent producer's futures: every callback runs exactly once, also when the
serving thread completes the future while the loop is adding a callback."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from streamlstm.io import confluent_producer as cp

pytest.importorskip("confluent_kafka")


class _Err:
    """librdkafka's ``KafkaError`` in the little a delivery report reads."""

    def retriable(self) -> bool:
        return False

    def code(self) -> int:
        return -1

    def str(self) -> str:
        return "message too large"


class _Gate:
    """The module's lock, telling when another thread than the loop's tries to take it."""

    def __init__(self, progress: threading.Event) -> None:
        self.lock = threading.Lock()
        self.loop = threading.get_ident()
        self.progress = progress

    def __enter__(self) -> None:
        if threading.get_ident() != self.loop:
            self.progress.set()
        self.lock.acquire()

    def __exit__(self, *_: Any) -> None:
        self.lock.release()


class _Racy(cp.Delivery):
    """A future the serving thread completes right after the loop's first look at
    ``is_done``: the loop goes on with what it saw once the delivery has either finished
    or is held off, so the interleaving is forced, not hoped for."""

    def __init__(self, err: Any, progress: threading.Event) -> None:
        self._loop, self._err, self._progress = threading.get_ident(), err, progress
        self._server: threading.Thread | None = None
        super().__init__()

    @property  # type: ignore[override]
    def is_done(self) -> bool:
        seen = self._seen
        if self._server is None and threading.get_ident() == self._loop:
            self._server = threading.Thread(target=self._deliver)
            self._server.start()
            assert self._progress.wait(10), "the delivery neither finished nor waited"
        return seen

    @is_done.setter
    def is_done(self, value: bool) -> None:
        self._seen = value

    def _deliver(self) -> None:
        self(self._err, None)
        self._progress.set()


@pytest.mark.parametrize("err", [None, _Err()], ids=["acknowledged", "failed"])
def test_a_delivery_during_add_callback_runs_the_callback_once(
    monkeypatch: pytest.MonkeyPatch, err: Any
) -> None:
    progress = threading.Event()
    monkeypatch.setattr(cp, "_LOCK", _Gate(progress), raising=False)
    future = _Racy(err, progress)
    calls: list[Any] = []
    if err is None:
        future.add_callback(calls.append)
    else:
        future.add_errback(calls.append)
    assert future._server is not None
    future._server.join(10)
    assert len(calls) == 1
    assert calls[0] is None if err is None else isinstance(calls[0], cp.DeliveryError)
    assert future.is_done and (future.exception is None) == (err is None)


def test_callbacks_before_and_after_completion_run_once_each() -> None:
    future = cp.Delivery()
    calls: list[Any] = []
    future.add_callback(lambda v: calls.append(("ok-before", v)))
    future.add_errback(lambda e: calls.append(("err-before", e)))
    future(None, None)
    future.add_callback(lambda v: calls.append(("ok-after", v)))
    future.add_errback(lambda e: calls.append(("err-after", e)))
    future(None, None)  # librdkafka reports once; a second report adds no calls
    assert calls == [("ok-before", None), ("ok-after", None)]
    failed = cp.Delivery()
    failed.add_errback(lambda e: calls.append(("err", e.retriable)))
    failed(_Err(), None)
    assert calls[-1] == ("err", False) and failed.exception is not None
