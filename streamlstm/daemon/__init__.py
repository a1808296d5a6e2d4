"""The daemon: the poll -> engine -> sink loop, delivery (acks, resend, backpressure,
commits) and telemetry (gauges, status log, health)."""

from streamlstm.daemon.loop import Daemon
from streamlstm.daemon.signals import install_signal_handlers

__all__ = ["Daemon", "install_signal_handlers"]
