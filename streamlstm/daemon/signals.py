"""SIGTERM/SIGINT: stop the daemon in order (flush, commit, leave the group)."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Protocol

log = logging.getLogger("streamlstm.daemon.loop")


class Stoppable(Protocol):
    @property
    def stopping(self) -> bool: ...

    def request_stop(self) -> None: ...


def install_signal_handlers(daemon: Stoppable) -> None:
    """SIGTERM and SIGINT ask the daemon to stop; a second SIGINT interrupts at once."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if daemon.stopping and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("received %s: stopping after the batch at hand", signal.Signals(signum).name)
        daemon.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
