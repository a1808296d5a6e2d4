"""librdkafka's producer behind the few calls the producer process and the model publisher
make of kafka-python's ``KafkaProducer``: ``send`` returning a future, ``partitions_for``,
``flush`` and ``close``.

librdkafka reports deliveries only from inside ``poll()``/``flush()``; a thread of ours
polls, so a future completes without anybody asking (as kafka-python's I/O thread does).
A full local queue (``BufferError``) waits for room as kafka-python's ``max_block_ms``
does, then fails the record.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

#: Errors a repeat can cure (the daemon repeats those for as long as it takes).
_RETRIABLE_NAMES = ("_MSG_TIMED_OUT", "_TIMED_OUT", "_TRANSPORT", "_ALL_BROKERS_DOWN")


@functools.cache
def _retriable_codes() -> frozenset[int]:
    """librdkafka's error codes in :data:`_RETRIABLE_NAMES` (looked up once)."""
    from confluent_kafka import KafkaError

    return frozenset(getattr(KafkaError, n) for n in _RETRIABLE_NAMES)


METADATA_SECONDS = 10.0  # how long a topic's partition list is trusted
MAX_BLOCK_SECONDS = 60.0  # kafka-python's max_block_ms default


class DeliveryError(Exception):
    """A record librdkafka gave up on; ``retriable`` as kafka-python's errors say it."""

    def __init__(self, text: str, retriable: bool) -> None:
        super().__init__(text)
        self.retriable = retriable


#: Guards each :class:`Delivery`'s "done?" check against its callback list: the serving
#: thread completes futures while the loop adds callbacks, and without it a callback
#: added between the check and the append would never run. One lock for all futures:
#: it is held for a few bytecodes, never while a callback runs.
_LOCK = threading.Lock()


class Delivery:
    """The future of one record: ``is_done``, ``exception``, callbacks (kafka-python's
    ``FutureRecordMetadata`` in the little the callers use). Each callback runs exactly
    once, on whichever thread completes the future or adds it after completion."""

    __slots__ = ("_callbacks", "exception", "is_done")

    def __init__(self) -> None:
        self.is_done = False
        self.exception: BaseException | None = None
        self._callbacks: list[tuple[bool, Callable[[Any], None]]] | None = None

    def __call__(self, err: Any, _msg: Any) -> None:  # librdkafka's on_delivery
        exc = None
        if err is not None:
            retriable = err.retriable() or err.code() in _retriable_codes()
            exc = DeliveryError(err.str(), retriable)
        with _LOCK:
            self.exception = exc  # before is_done: a reader seeing done sees the outcome
            self.is_done = True
            callbacks, self._callbacks = self._callbacks, None
        for errback, fn in callbacks or ():
            if errback == (exc is not None):
                fn(exc if errback else None)

    def add_callback(self, fn: Callable[[Any], None]) -> None:
        self._add(False, fn)

    def add_errback(self, fn: Callable[[Any], None]) -> None:
        self._add(True, fn)

    def _add(self, errback: bool, fn: Callable[[Any], None]) -> None:
        with _LOCK:
            if not self.is_done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append((errback, fn))
                return
        if errback == (self.exception is not None):
            fn(self.exception if errback else None)


class Refused(Delivery):
    """The future of a record ``produce`` refused at once."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__()
        self.exception = exc
        self.is_done = True


class ConfluentProducer:
    """A ``confluent_kafka.Producer`` with kafka-python's calling conventions."""

    def __init__(self, conf: dict[str, Any], serve: bool = True) -> None:
        from confluent_kafka import Producer

        self.producer = Producer(conf)
        self._partitions: dict[str, tuple[float, set[int] | None]] = {}
        self._closed = threading.Event()
        self._server: threading.Thread | None = None
        if serve:
            self._server = threading.Thread(target=self._serve, name="deliveries", daemon=True)
            self._server.start()

    def _serve(self) -> None:
        poll = self.producer.poll
        while not self._closed.is_set():
            poll(0.05)

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: Any = None,
        partition: int | None = None,
    ) -> Delivery:
        future = Delivery()
        produce = self.producer.produce
        deadline = 0.0
        while True:
            try:
                if partition is None:
                    produce(topic, value, key, on_delivery=future, headers=headers)
                else:
                    produce(topic, value, key, partition, on_delivery=future, headers=headers)
                return future
            except BufferError:  # the local queue is full: wait for deliveries to free it
                now = time.monotonic()
                deadline = deadline or now + MAX_BLOCK_SECONDS
                if now > deadline:
                    return Refused(DeliveryError("local queue full", retriable=True))
                time.sleep(0.005)
            except Exception as exc:  # too large, unknown partition, ...
                return Refused(DeliveryError(str(exc), retriable=False))

    def partitions_for(self, topic: str) -> set[int] | None:
        """The topic's partitions, from metadata at most :data:`METADATA_SECONDS` old."""
        now = time.monotonic()
        cached = self._partitions.get(topic)
        if cached is not None and now - cached[0] < METADATA_SECONDS:
            return cached[1]
        meta = self.producer.list_topics(topic, timeout=MAX_BLOCK_SECONDS).topics.get(topic)
        parts = None if meta is None or meta.error is not None else set(meta.partitions) or None
        self._partitions[topic] = (now, parts)
        return parts

    def flush(self, timeout: float | None = None) -> None:
        left = self.producer.flush(-1 if timeout is None else timeout)
        if left:
            raise TimeoutError(f"{left} records not delivered in {timeout}s")

    def close(self, timeout: float | None = None) -> None:
        try:
            self.producer.flush(5.0 if timeout is None else timeout)
        finally:
            self._closed.set()
            if self._server is not None:
                self._server.join(1.0)
