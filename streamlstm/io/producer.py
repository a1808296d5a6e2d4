"""The producer's own process: the Kafka client's producer beside the daemon, not in it.

kafka-python spends some 20 µs of Python per produced record (librdkafka a few); in the
daemon's process that time would be taken from polling, decoding and the engine (one
GIL). So the producer, kafka-python's ``KafkaProducer`` or librdkafka's
(:class:`~streamlstm.io.confluent_producer.ConfluentProducer`), lives in a child process
(a fresh interpreter: no torch, no engine) and the daemon hands it whole poll batches
over a socket pair (:class:`~streamlstm.io.sink.Sink` is the daemon's side).

Frames are pickled tuples, one ``send_bytes`` each:

parent -> child
    ``("config", kwargs, client, connect_s)`` first frame: build the producer of
                                               ``client`` ("kafka-python" or "confluent")
    ``("send", seq, groups)``                  groups: ``[(topic, keys, values, headers)]``,
                                               ``headers`` None or one list per record; an
                                               optional 5th item: explicit partitions
    ``("flush", token, timeout_s)``
    ``("close", timeout_s)``
child -> parent
    ``("ready",)`` or ``("error", text)``     after ``config``
    ``("acks", [(seq, failures), ...])``       every record of ``seq`` completed; failures
                                               ``[(group, index, error, retriable)]``
    ``("flushed", token, ok)``                 after the acks of everything flushed
    ``("log", levelno, text)``
    ``("closed",)``

The child ends when the parent closes its end of the socket (the parent exited or
died), when its parent process changes, or after ``close``. It ignores SIGINT and
SIGTERM: the daemon decides when to flush and stop.

Partitioning: a group with explicit partitions (the state changelog) goes there; else
a keyed record goes to the partition Kafka's default partitioner picks
(murmur2 of the key bytes, as the Java clients), computed once per key and cached
(:class:`PartitionCache`), so ``send`` skips the partitioner.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from kafka.partitioner.default import murmur2

ACK_INTERVAL_S = 0.001  # how often completed sends are looked for while some are pending
PARENT_CHECK_S = 1.0

# (topic, keys, values, headers), and optionally explicit partitions as a 5th item.
Group = tuple[Any, ...]


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


class PartitionCache:
    """Partition of each key, as kafka-python's ``DefaultPartitioner`` (murmur2) picks it.

    Computed once per (topic, key); a topic's cache is dropped when its partition list
    changes. Records without a key get None (the producer's partitioner chooses).
    """

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self.max_keys = max_keys
        self._topics: dict[str, tuple[tuple[int, ...], dict[bytes, int]]] = {}

    def partitions(
        self, topic: str, keys: Sequence[bytes | None], available: Iterable[int]
    ) -> list[int | None]:
        parts = tuple(sorted(available))
        if not parts:  # unknown yet: the producer's partitioner decides
            return [None] * len(keys)
        cached = self._topics.get(topic)
        if cached is None or cached[0] != parts:
            cached = self._topics[topic] = (parts, {})
        cache = cached[1]
        if len(cache) > self.max_keys:
            cache.clear()
        get = cache.get
        out: list[int | None] = []
        append = out.append
        n = len(parts)
        for key in keys:
            p = get(key) if key is not None else None
            if p is None and key is not None:
                p = cache[key] = parts[(murmur2(key) & 0x7FFFFFFF) % n]
            append(p)
        return out


class _Child:
    """The producer, the pending sends, and the thread that reports acknowledgements."""

    def __init__(self, conn: Connection, producer: Any) -> None:
        self.conn = conn
        self.producer = producer
        self.cache = PartitionCache()
        self.pending: deque[tuple[int, _Located]] = deque()  # (seq, futures) in send order
        self._checked = 0  # futures of pending[0] known to be done
        self._write = threading.Lock()
        self._ack_lock = threading.Lock()
        self._wake = threading.Event()
        self._done = threading.Event()

    def write(self, obj: Any) -> None:
        data = dumps(obj)
        with self._write:
            self.conn.send_bytes(data)

    def log(self, level: int, text: str) -> None:
        with contextlib.suppress(OSError):
            self.write(("log", level, text))

    # -- sending ---------------------------------------------------------------------

    def send(self, seq: int, groups: list[Group]) -> None:
        futures: list[Any] = []
        producer = self.producer
        send = producer.send
        for group in groups:
            topic, keys, values, headers = group[:4]
            try:
                available = producer.partitions_for(topic)  # waits for metadata if new
            except Exception as exc:  # no metadata in max_block_ms: each record fails
                futures.extend(_Failed(exc) for _ in keys)
                continue
            explicit = group[4] if len(group) > 4 else None
            parts = explicit or self.cache.partitions(topic, keys, available or ())
            if headers is None:
                for k, v, p in zip(keys, values, parts, strict=True):
                    futures.append(_send_one(send, topic, k, v, None, p))
            else:
                for k, v, h, p in zip(keys, values, headers, parts, strict=True):
                    futures.append(_send_one(send, topic, k, v, h, p))
        # Record the (group, index) of every future for failure reports.
        self.pending.append((seq, _Located(groups, futures)))
        self._wake.set()

    # -- acknowledgements ------------------------------------------------------------

    def report(self) -> int:
        """Ack every finished entry at the front; returns how many entries are pending."""
        with self._ack_lock:
            acks = []
            pending = self.pending
            while pending:
                seq, located = pending[0]
                futures = located.futures
                i = self._checked
                n = len(futures)
                while i < n and futures[i].is_done:
                    i += 1
                self._checked = i
                if i < n:
                    break
                pending.popleft()
                self._checked = 0
                acks.append((seq, located.failures()))
            if acks:
                self.write(("acks", acks))
            return len(pending)

    def ack_loop(self) -> None:
        while not self._done.is_set():
            try:
                left = self.report()
            except OSError:  # the parent is gone
                return
            if left:
                time.sleep(ACK_INTERVAL_S)
            else:
                self._wake.wait(0.1)
                self._wake.clear()

    # -- control ---------------------------------------------------------------------

    def flush(self, token: int, timeout_s: float) -> None:
        ok = True
        try:
            self.producer.flush(timeout=timeout_s)
        except Exception as exc:  # KafkaTimeoutError: the broker did not answer in time
            ok = False
            self.log(logging.WARNING, f"producer flush did not finish in {timeout_s:.1f}s: {exc}")
        self.report()
        self.write(("flushed", token, ok))

    def close(self, timeout_s: float) -> None:
        try:
            self.producer.close(timeout=timeout_s)
        except Exception as exc:
            self.log(logging.WARNING, f"producer close: {exc}")
        self._done.set()
        self.report()


class _Located:
    """The futures of one ``send`` frame, and where each record came from."""

    __slots__ = ("futures", "groups")

    def __init__(self, groups: list[Group], futures: list[Any]) -> None:
        self.groups = groups
        self.futures = futures

    def failures(self) -> list[tuple[int, int, str, bool]] | None:
        futures = self.futures
        if not any(f.exception is not None for f in futures):
            return None
        out = []
        flat = 0
        for g, group in enumerate(self.groups):
            for i in range(len(group[1])):
                exc = futures[flat].exception
                if exc is not None:
                    retriable = bool(getattr(exc, "retriable", False))
                    out.append((g, i, _short(exc), retriable))
                flat += 1
        return out


class _Failed:
    """Stands in for the future of a record ``send`` refused at once."""

    __slots__ = ("exception",)
    is_done = True

    def __init__(self, exc: BaseException) -> None:
        self.exception = exc


def _send_one(send: Any, topic: str, k: Any, v: Any, h: Any, p: int | None) -> Any:
    try:
        return send(topic, value=v, key=k, headers=h, partition=p)
    except Exception as exc:  # e.g. too large, or metadata timeout
        return _Failed(exc)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    name = type(exc).__name__
    text = text if text.startswith(name) else f"{name}: {text}"
    return text if len(text) < 200 else text[:197] + "..."


def _watch_parent(parent: int) -> None:
    """Exit when the parent process is gone (re-parented), whatever holds the socket."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(3)


def build_producer(client: str, kwargs: dict[str, Any], connect_s: float) -> Any:
    """The producer of ``client``; raises when no broker answers within ``connect_s``."""
    if client == "confluent":
        from streamlstm.io.confluent_producer import ConfluentProducer

        producer = ConfluentProducer(kwargs)
        try:
            producer.producer.list_topics(timeout=connect_s)  # as kafka-python's bootstrap
        except BaseException:
            producer.close(0)
            raise
        return producer
    from kafka import KafkaProducer

    return KafkaProducer(**kwargs)


def main(fd: int | None = None, parent: int | None = None) -> None:
    """Child entry point: ``python -c 'from streamlstm.io.producer import main; main()'``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    sys.setswitchinterval(0.001)  # the ack thread answers promptly beside a busy sender
    fd = int(sys.argv[1]) if fd is None else fd
    parent = int(sys.argv[2]) if parent is None else parent
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    conn = Connection(fd)
    try:
        kind, kwargs, client, connect_s = pickle.loads(conn.recv_bytes())
        assert kind == "config"
        producer = build_producer(client, kwargs, connect_s)
    except EOFError:
        os._exit(0)
    except Exception as exc:
        try:
            conn.send_bytes(dumps(("error", _short(exc))))
        finally:
            os._exit(1)
    # Start-up objects (imports, the client) out of the full collections' way: a full
    # collection over them (~50 ms) would hold every acknowledgement back that long
    # (see streamlstm.daemon.heap).
    gc.collect()
    gc.freeze()
    child = _Child(conn, producer)
    child.write(("ready",))
    threading.Thread(target=child.ack_loop, name="acks", daemon=True).start()
    code = 0
    try:
        while True:
            frame = pickle.loads(conn.recv_bytes())
            kind = frame[0]
            if kind == "send":
                child.send(frame[1], frame[2])
            elif kind == "flush":
                child.flush(frame[1], frame[2])
            elif kind == "close":
                child.close(frame[1])
                child.write(("closed",))
                break
    except (EOFError, OSError):  # the parent is gone: nobody waits for acknowledgements
        with contextlib.suppress(Exception):
            producer.close(timeout=1.0)
    except Exception as exc:
        code = 1
        with contextlib.suppress(OSError):
            child.write(("error", _short(exc)))
    os._exit(code)
