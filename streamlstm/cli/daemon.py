"""``streamlstm run``: the daemon against a real Kafka cluster."""

from __future__ import annotations

import argparse

from streamlstm.cli.common import command, log_args, settings_args, settings_from_args
from streamlstm.config import Settings


def add_run(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "run",
        "The daemon: consume events, predict per key, produce predictions, serve metrics.",
        "  streamlstm run --config my.toml\n"
        "  streamlstm run --bootstrap kafka:9092 --set model.input_size=3\n"
        "  STREAMLSTM_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 streamlstm run --log-json\n\n"
        "Offsets are committed only after the predictions (and dead letters) of the\n"
        "records before them were acknowledged: at-least-once. SIGTERM/SIGINT: finish the\n"
        "batch, flush, commit, exit 0. Metrics on metrics.port: /metrics /healthz /readyz.",
    )
    p.add_argument("--bootstrap", help="shortcut for --set kafka.bootstrap_servers=...")
    log_args(p)
    settings_args(p)
    p.set_defaults(handler=run_daemon)


def daemon_settings(args: argparse.Namespace) -> Settings:
    """Settings with the ``run`` shortcuts (--bootstrap, --log-json, --log-level) applied."""
    return settings_from_args(
        args,
        **{
            "kafka.bootstrap_servers": args.bootstrap,
            "log.json_format": "true" if args.log_json else None,
            "log.level": args.log_level,
        },
    )


def run_daemon(args: argparse.Namespace) -> int:
    from streamlstm.daemon import Daemon, install_signal_handlers
    from streamlstm.logs import setup_logging

    settings = daemon_settings(args)
    setup_logging(settings.log.level, settings.log.json_format)
    daemon = Daemon(settings)
    install_signal_handlers(daemon)
    return daemon.run()
