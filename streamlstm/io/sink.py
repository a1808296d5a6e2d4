"""The output side: prediction records and dead letters, produced without waiting.

The producer runs in a child process (:mod:`streamlstm.io.producer`), on the client
``kafka.client`` names: its per-record cost then runs beside the daemon's loop instead
of inside it. ``send`` hands one poll's records to the child in one frame and returns at
once; the child reports when every record of a frame is acknowledged (or which failed),
and :meth:`Sink.poll_acks` applies those reports to the daemon's
:class:`~streamlstm.io.offsets.Ticket`\\ s, which commit offsets only once everything
is acknowledged.

With ``acks=all`` the producer is idempotent, so retries keep each partition's order:
the predictions of one key (one output partition) appear in the order of its events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

import orjson

from streamlstm.config import Settings
from streamlstm.io.client import client_name
from streamlstm.io.offsets import Send, Ticket
from streamlstm.io.producer import Group, dumps

log = logging.getLogger(__name__)

_ACKS: dict[str, int | str] = {"all": "all", "1": 1, "0": 0}
_START_SECONDS = 30.0  # interpreter start + producer bootstrap, beyond bootstrap_timeout_ms
_SOCKET_BUFFER = 4 << 20  # bytes; the kernel caps it (net.core.wmem_max)
_CHILD = "from streamlstm.io.producer import main; main()"


class SinkError(RuntimeError):
    """The producer process failed or went away."""


class Predictions(Protocol):
    """What the sink needs of the engine's ``BatchOutput`` (io stays free of torch)."""

    keys: list[str]

    def records(self) -> Iterator[dict[str, Any]]: ...


def encode_predictions(output: Predictions) -> list[bytes]:
    """One JSON document per event (``key, ts, prediction, error, anomaly_score, ...``)."""
    dumps = orjson.dumps
    return [dumps(r) for r in output.records()]


MAX_ARRAY_BYTES = 1_000_000  # below the broker's default message.max.bytes (1 MiB + 12)


def per_message(
    source: Sequence[int],
    keys: Sequence[bytes | None],
    values: Sequence[bytes],
    records: Sequence[Any],
    max_bytes: int = MAX_ARRAY_BYTES,
) -> tuple[list[bytes | None], list[bytes]]:
    """Each input message's prediction records as one JSON array, in input order.

    ``kafka.output_per_message``: a producer that batches events into arrays pays per
    message, so the output side should too. ``source[i]`` is the message of event ``i``
    (a message's events are consecutive, as the decoder makes them); ``keys`` and
    ``values`` are the events' keys and encoded records; ``records`` the polled Kafka
    records. An array's key is its input message's Kafka key, or its first event's key
    when the message had none. Always an array, even for one event. An array that would
    pass ``max_bytes`` is split into consecutive arrays (the broker would refuse it).

    >>> class R: key = None
    >>> per_message([0, 0, 2], [b"a", b"b", b"c"], [b"1", b"2", b"3"], [R(), R(), R()])
    ([b'a', b'c'], [b'[1,2]', b'[3]'])
    """
    out_keys: list[bytes | None] = []
    out_values: list[bytes] = []
    join = b",".join
    n = len(values)
    start = 0
    while start < n:
        m = source[start]
        end, size = start + 1, len(values[start]) + 2
        while end < n and source[end] == m and size + len(values[end]) + 1 <= max_bytes:
            size += len(values[end]) + 1
            end += 1
        key = records[m].key
        out_keys.append(keys[start] if key is None else key)
        out_values.append(b"[" + join(values[start:end]) + b"]")
        start = end
    return out_keys, out_values


def send_groups(sends: list[Send]) -> list[Group]:
    """Ready-made records (dead letters, repeats) as groups of one topic each, in order."""
    groups: list[Group] = []
    for topic, key, value, headers in sends:
        if not groups or groups[-1][0] != topic:
            groups.append((topic, [], [], []))
        g = groups[-1]
        g[1].append(key)
        g[2].append(value)
        g[3].append(headers)
    return groups


def max_request_bytes(settings: Settings) -> int:
    """Largest produce request: a dead letter is a copy of an input record plus headers."""
    return max(1_048_576, settings.engine.max_message_bytes) + 64 * 1024


def producer_config(settings: Settings, bootstrap_timeout_ms: int = 5000) -> tuple:
    """The producer process's ``config`` frame for the client ``kafka.client`` names."""
    k = settings.kafka
    connect_s = bootstrap_timeout_ms / 1000
    if client_name(k) == "confluent":
        from streamlstm.io.confluent_config import producer_config as confluent_config

        conf = confluent_config(k, max_request_bytes(settings))
        conf.pop("logger")  # the child logs through its parent
        return ("config", conf, "confluent", connect_s)
    return ("config", producer_kwargs(settings, bootstrap_timeout_ms), "kafka-python", connect_s)


def producer_kwargs(settings: Settings, bootstrap_timeout_ms: int = 5000) -> dict[str, Any]:
    """kafka-python's producer settings."""
    k = settings.kafka
    acks = _ACKS[k.producer_acks]
    return {
        **k.client_kwargs(),
        "acks": acks,
        "enable_idempotence": acks == "all",
        "linger_ms": k.producer_linger_ms,
        "compression_type": None if k.compression_type == "none" else k.compression_type,
        "batch_size": 256 * 1024,
        "max_request_size": max_request_bytes(settings),
        "bootstrap_timeout_ms": bootstrap_timeout_ms,
        "metrics_enabled": False,
    }


def _stop_child(
    proc: subprocess.Popen[bytes], timeout: float, conn: Connection | None = None
) -> None:
    """Close our end (the child sees EOF and ends), wait up to ``timeout``, then kill."""
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()
    if proc.poll() is None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


class Sink:
    """The daemon's handle on the producer process (one per daemon connection).

    Thread use: the daemon's loop calls everything; the rebalance listener (kafka's I/O
    thread, while the loop waits in ``poll``) calls :meth:`flush`. A lock keeps them
    apart.
    """

    def __init__(self, settings: Settings, bootstrap_timeout_ms: int = 5000) -> None:
        k = settings.kafka
        self.output_topic = k.output_topic
        self.dead_letter_topic = k.dead_letter_topic
        self._lock = threading.RLock()
        self._seq = 0
        self._inflight: dict[int, tuple[Ticket, list[Group]]] = {}
        self._flushed: dict[int, bool] = {}
        self._closed = False
        self.dead = False
        ours, theirs = socket.socketpair()
        with contextlib.suppress(OSError):  # a poll's frame fits: the loop does not wait
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C reaches the daemon, which stops it in order
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self._finalizer = weakref.finalize(self, _stop_child, self.proc, 0.5, self.conn)
        try:
            self._write(producer_config(settings, bootstrap_timeout_ms))
            deadline = time.monotonic() + bootstrap_timeout_ms / 1000 + _START_SECONDS
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.conn.poll(left):
                    raise SinkError("the producer process did not start in time")
                frame = self._read()
                if frame[0] == "ready":
                    break
                if frame[0] == "error":
                    raise SinkError(frame[1])
                self._handle(frame)
        except BaseException:
            self._kill()
            raise

    # -- plumbing --------------------------------------------------------------------

    def _write(self, obj: Any, timeout: float | None = None) -> None:
        """One frame to the child; with ``timeout``, give up if it cannot be written."""
        data = obj if isinstance(obj, bytes) else dumps(obj)
        if self.dead:
            raise SinkError("the producer process is gone")
        if timeout is not None:
            _, writable, _ = select.select([], [self.conn.fileno()], [], timeout)
            if not writable:
                raise SinkError("the producer process does not read")
        try:
            self.conn.send_bytes(data)
        except OSError as exc:
            self.dead = True
            raise SinkError(f"the producer process is gone ({exc})") from exc

    def _read(self) -> tuple:
        try:
            return pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError) as exc:
            self.dead = True
            code = self.proc.poll()
            raise SinkError(f"the producer process is gone (exit code {code})") from exc

    def _handle(self, frame: tuple) -> None:
        kind = frame[0]
        if kind == "acks":
            inflight = self._inflight
            for seq, failures in frame[1]:
                entry = inflight.pop(seq, None)
                if entry is None:
                    continue
                ticket, groups = entry
                ticket.outstanding -= 1
                ticket.pending -= sum(len(g[1]) for g in groups)
                if failures:
                    for g, i, error, retriable in failures:
                        topic, keys, values, headers = groups[g][:4]
                        ticket.failed.append(
                            (topic, keys[i], values[i], headers[i] if headers else None)
                        )
                        ticket.errors.append(error)
                        ticket.retriable = ticket.retriable and retriable
        elif kind == "flushed":
            self._flushed[frame[1]] = frame[2]
        elif kind == "log":
            log.log(frame[1], "producer: %s", frame[2])
        elif kind == "error":
            self.dead = True
            raise SinkError(f"the producer process failed: {frame[1]}")
        elif kind == "closed":
            self._closed = True

    # -- the daemon's side -----------------------------------------------------------

    def send(self, ticket: Ticket, groups: list[Group]) -> None:
        """Produce ``groups`` for ``ticket`` without waiting (``poll_acks`` accounts them)."""
        groups = [g for g in groups if g[1]]
        if not groups:
            return
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._inflight[seq] = (ticket, groups)
            ticket.outstanding += 1
            ticket.pending += sum(len(g[1]) for g in groups)
            self._write(("send", seq, groups))

    def send_records(self, ticket: Ticket, sends: list[Send]) -> None:
        """Produce ready-made records (dead letters, or a repeat of failed sends)."""
        self.send(ticket, send_groups(sends))

    def poll_acks(self) -> None:
        """Apply every report the child has sent so far (no waiting)."""
        with self._lock:
            while not self.dead and self.conn.poll(0):
                self._handle(self._read())

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every record sent so far; False if some are pending.

        The acknowledgements are applied to their tickets before this returns.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self.dead:
                return False
            self._seq += 1
            token = self._seq
            try:
                self._write(("flush", token, timeout_s), timeout=timeout_s)
                while token not in self._flushed:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.conn.poll(left):
                        log.warning("producer flush did not finish in %.1fs", timeout_s)
                        return False
                    self._handle(self._read())
            except SinkError as exc:
                log.warning("producer flush: %s", exc)
                return False
            return self._flushed.pop(token)

    def close(self, timeout_s: float = 2.0) -> None:
        """Close the producer (its records get up to ``timeout_s``) and end the child."""
        deadline = time.monotonic() + timeout_s + 0.5
        with self._lock:
            try:
                if not self.dead:
                    self._write(("close", timeout_s), timeout=timeout_s)
                    while not self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0 or not self.conn.poll(left):
                            break
                        self._handle(self._read())
            except SinkError as exc:
                log.warning("producer close: %s", exc)
            finally:
                left = max(0.1, deadline - time.monotonic())
                self._kill(left)

    def _kill(self, wait_s: float = 0.0) -> None:
        self.dead = True
        self._finalizer.detach()
        _stop_child(self.proc, wait_s, self.conn)
