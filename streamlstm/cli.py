"""The ``streamlstm`` command line: one sub-command per job, each with examples in --help.

Settings come from ``--config FILE`` (TOML), ``STREAMLSTM_<SECTION>__<FIELD>`` environment
variables and ``--set section.field=value``, highest last. A bad value stops the command
with exit code 2 and one line naming the field.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from streamlstm import __version__
from streamlstm.config import ConfigError, Settings, load_settings, parse_override

EXIT_USAGE = 2

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


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the examples' layout and show defaults."""


def _settings_args(parser: argparse.ArgumentParser) -> None:
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


def _command(
    sub: argparse._SubParsersAction, name: str, summary: str, examples: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=f"{summary}\n\nexamples:\n{examples}",
        formatter_class=_Formatter,
    )


# -- replay ----------------------------------------------------------------------


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "replay",
        "Backtest a JSONL or CSV file through the engine, in file order.",
        "  streamlstm replay sensors.jsonl --output predictions.jsonl\n"
        "  streamlstm replay ETTh2.csv --ts-column date --output out.jsonl\n"
        "  streamlstm replay trades.csv --key-column ticker --set model.cell=gru\n\n"
        "Each event yields one JSON line: key, ts, prediction (the key's next values),\n"
        "error and anomaly_score of the previous prediction (null on a key's first\n"
        "event) and model_version. A summary with MAE/MSE goes to stderr.",
    )
    p.add_argument("input", type=Path, help="events: .jsonl (one message per line) or .csv")
    p.add_argument("--output", "-o", type=Path, help="JSONL output file (default: stdout)")
    p.add_argument("--ts-column", help="CSV: timestamp column (default: the first column)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--key-column", help="CSV: column holding the stream key")
    keys.add_argument("--key", help="CSV: one constant key (default: the file's stem)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _settings_args(p)
    p.set_defaults(handler=_run_replay)


def _run_replay(args: argparse.Namespace) -> int:
    from streamlstm.backtest import replay
    from streamlstm.engine import Engine
    from streamlstm.files import read_events

    settings = settings_from_args(args)
    data = read_events(
        args.input,
        width=settings.model.input_size,
        ts_column=args.ts_column,
        key_column=args.key_column,
        key=args.key,
        max_message_bytes=settings.engine.max_message_bytes,
    )
    if settings.model.input_size is None:
        settings.model.input_size = data.batch.values.shape[1]
    engine = Engine.from_settings(settings)
    out = args.output.open("wb") if args.output else sys.stdout.buffer
    try:
        summary = replay(engine, data, out, progress=False if args.no_progress else None)
    finally:
        if args.output:
            out.close()
    for line in summary.lines():
        print(line, file=sys.stderr)
    return 0


# -- bench -----------------------------------------------------------------------


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "bench",
        "Measure throughput against a baseline run in the same process.",
        "  streamlstm bench engine            batched engine vs the textbook loop\n"
        "  streamlstm bench engine --json     one JSON object, for scripts",
    )
    which = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    engine = which.add_parser(
        "engine",
        help="batched engine vs one nn.LSTM call per event",
        description="Reference setting: input 8, hidden 64, 2 layers, 100,000 keys, 1 thread.",
        formatter_class=_Formatter,
    )
    engine.add_argument("--keys", type=int, default=100_000, help="distinct stream keys")
    engine.add_argument("--batch", type=int, default=4096, help="events per micro-batch")
    engine.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    engine.add_argument("--rounds", type=int, default=5, help="timed rounds (median is kept)")
    engine.add_argument("--json", action="store_true", help="print one JSON object")
    engine.set_defaults(handler=_run_bench_engine)


def _run_bench_engine(args: argparse.Namespace) -> int:
    import json

    from streamlstm.bench import bench_engine

    result = bench_engine(args.keys, args.batch, args.threads, args.rounds)
    print(json.dumps(result.as_dict()) if args.json else "\n".join(result.lines()))
    return 0


# -- config ----------------------------------------------------------------------


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "config",
        "Show every setting with its current value and environment variable.",
        "  streamlstm config\n  streamlstm config --config my.toml --set engine.max_batch=512",
    )
    _settings_args(p)
    p.set_defaults(handler=_run_config)


def _run_config(args: argparse.Namespace) -> int:
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
    _add_replay,
    _add_bench,
    _add_config,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamlstm", description=MAIN_HELP, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"streamlstm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"streamlstm: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as exc:
        print(f"streamlstm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
