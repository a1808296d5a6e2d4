"""The ``streamlstm`` command line: one sub-command per job, each with examples in --help.

Settings come from ``--config FILE`` (TOML), ``STREAMLSTM_<SECTION>__<FIELD>`` environment
variables and ``--set section.field=value``, highest last. A bad value stops the command
with exit code 2 and one line naming the field.

Exit codes: 0 done; 2 the command cannot run as given (a bad flag or setting, an input
file or checkpoint that does not fit), one line on stderr; 1 it started and failed for a
reason outside it (e.g. the embedded broker), one line; 130 interrupted. Any other
exception is a bug and keeps its traceback.

The commands live by family: :mod:`~streamlstm.cli.offline` (replay, pretrain),
:mod:`~streamlstm.cli.daemon` (run), :mod:`~streamlstm.cli.dev` (demo, broker, produce,
bench); ``config`` is here, beside the settings it shows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from streamlstm import __version__
from streamlstm.cli import daemon, dev, offline
from streamlstm.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    CommandError,
    Formatter,
    command,
    settings_args,
    settings_from_args,
)
from streamlstm.config import ConfigError, Settings

MAIN_HELP = """\
streamlstm: per-key LSTM predictions and anomaly scores over Kafka event streams,
fine-tuned while the stream runs, with drift and latency metrics for Prometheus.

Events are JSON objects (or arrays of them) on a topic:
  {"key": "pump-17", "ts": 1764250000.25, "values": [0.41, 12.0, 3.3]}

Start here:
  streamlstm demo                      embedded broker + producer + daemon, live figures
  streamlstm replay data.csv           backtest a file through the same engine
  streamlstm run --config my.toml      the daemon, against your Kafka cluster
  streamlstm config                    every setting, its default and env variable
"""


# -- config ----------------------------------------------------------------------


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "config",
        "Show every setting with its current value and environment variable.",
        "  streamlstm config\n  streamlstm config --config my.toml --set engine.max_batch=512\n"
        "  streamlstm config --markdown > docs/configuration.md",
    )
    p.add_argument(
        "--markdown",
        action="store_true",
        help="print the reference of every setting (defaults, types, env vars) as Markdown",
    )
    settings_args(p)
    p.set_defaults(handler=_run_config)


def _run_config(args: argparse.Namespace) -> int:
    if args.markdown:
        from streamlstm.devtools.docgen import render_configuration

        sys.stdout.write(render_configuration())
        return 0
    settings = settings_from_args(args)
    for section_name in Settings.model_fields:
        section = getattr(settings, section_name)
        print(f"[{section_name}]")
        for name, info in type(section).model_fields.items():
            value = getattr(section, name)
            env = f"STREAMLSTM_{section_name}__{name}".upper()
            print(f"{name} = {value!r:<24} # {env}: {info.description}")
        print()
    return 0


# -- entry point -----------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    offline.add_replay,
    dev.add_bench,
    _add_config,
    offline.add_pretrain,
    daemon.add_run,
    dev.add_demo,
    dev.add_broker,
    dev.add_produce,
]

#: Errors of modules a command loads lazily, already worded for the user: (module,
#: class, exit code). Looked up in ``sys.modules`` so that ``streamlstm --help`` does not
#: import torch: an exception of a module that was never imported cannot have been raised.
WORDED_ERRORS: tuple[tuple[str, str, int], ...] = (
    # the checkpoint does not fit the settings (architecture), or is corrupt or missing
    ("streamlstm.learning.checkpoint", "CheckpointError", EXIT_USAGE),
    # the embedded broker could not be found or started (port taken, no Tansu binary)
    ("streamlstm.devtools.tansu", "BrokerError", EXIT_FAILURE),
)


def user_error(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, message)`` for an error meant for the user; None for a bug."""
    if isinstance(exc, ConfigError):
        return EXIT_USAGE, f"config error: {exc}"
    if isinstance(exc, CommandError):
        return exc.exit_code, str(exc)
    for module, name, code in WORDED_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return code, str(exc)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamlstm", description=MAIN_HELP, formatter_class=Formatter
    )
    parser.add_argument("--version", action="version", version=f"streamlstm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; see the module docstring for the exit codes."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        known = user_error(exc)
        if known is None:
            raise  # a bug: keep the traceback
        code, message = known
        print(f"streamlstm: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
