"""What every command shares: the help formatter, the settings flags, input files, errors.

Kept apart from :mod:`streamlstm.cli.main` so the command modules can import it without
an import cycle (``main`` imports every command module to build the parser).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from streamlstm.config import Settings, load_settings, parse_override

if TYPE_CHECKING:
    from streamlstm.offline.eventfiles import FileEvents

#: The command cannot run as given: its flags, settings, input files or checkpoint are
#: wrong. Nothing was done; fix the invocation and rerun. (argparse uses 2 for usage too.)
EXIT_USAGE = 2
#: The command started and then failed for a reason outside it (e.g. the broker).
EXIT_FAILURE = 1


class CommandError(Exception):
    """A problem with what the user asked for, already worded for them.

    ``main`` prints it as one line, without a traceback, and exits with ``exit_code``.
    Raise it only for conditions a user causes and can fix; a bug must keep its traceback.
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def user_input(path: Path) -> Iterator[None]:
    """Turn the errors of reading the user's file ``path`` into a :class:`CommandError`.

    Wrap only the call that reads the file: the event-file reader raises ``ValueError``
    with a clear message (unknown format, no such column, width vs ``model.input_size``),
    and opening it raises ``OSError``; anything else there is a bug and propagates.
    """
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CommandError(f"{exc.filename or path}: cannot read it ({reason})") from exc
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the examples' layout; show defaults, except empty ones (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def settings_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and repeatable ``--set SECTION.FIELD=VALUE``."""
    group = parser.add_argument_group("settings")
    group.add_argument("--config", metavar="FILE", help="TOML (or YAML) settings file")
    group.add_argument(
        "--set",
        metavar="SECTION.FIELD=VALUE",
        action="append",
        default=[],
        help="override one setting, e.g. --set model.hidden_size=32 (repeatable)",
    )


def settings_from_args(args: argparse.Namespace, **forced: object) -> Settings:
    """Validated settings from --config/--set (plus ``forced`` dotted values)."""
    overrides: dict[str, object] = dict(parse_override(item) for item in args.set)
    overrides.update({k: v for k, v in forced.items() if v is not None})
    return load_settings(args.config, overrides)


def command(
    sub: argparse._SubParsersAction, name: str, summary: str, examples: str
) -> argparse.ArgumentParser:
    """A sub-command whose --help shows ``summary`` and then ``examples``."""
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\nexamples:\n{examples}",
        formatter_class=Formatter,
    )


def log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")


# -- files: replay, pretrain and produce read them alike ---------------------------


def file_args(p: argparse.ArgumentParser) -> None:
    """How to read a CSV file's columns, and the progress bar switch."""
    csv = p.add_argument_group("CSV files")
    csv.add_argument("--ts-column", help="timestamp column (default: the first column)")
    keys = csv.add_mutually_exclusive_group()
    keys.add_argument("--key-column", help="column holding the stream key")
    keys.add_argument("--key", help="one constant key (default: the file's stem)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def read_input(args: argparse.Namespace, settings: Settings) -> FileEvents:
    """The events of ``args.input`` (first ``--until-row``); sets a missing input_size."""
    from streamlstm.offline.eventfiles import read_events

    with user_input(args.input):
        data = read_events(
            args.input,
            width=settings.model.input_size,
            ts_column=args.ts_column,
            key_column=args.key_column,
            key=args.key,
            max_message_bytes=settings.engine.max_message_bytes,
        )
    if args.until_row is not None:
        data.batch = data.batch.take(slice(0, args.until_row))
    if settings.model.input_size is None:
        settings.model.input_size = data.batch.values.shape[1]
    return data
