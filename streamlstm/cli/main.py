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
from typing import TYPE_CHECKING

from streamlstm import __version__
from streamlstm.config import ConfigError, Settings, load_settings, parse_override

if TYPE_CHECKING:
    from streamlstm.offline.eventfiles import FileEvents

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
    """Keep the examples' layout; show defaults, except empty ones (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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


# -- files: replay, pretrain and produce read them alike ---------------------------


def _file_args(p: argparse.ArgumentParser) -> None:
    csv = p.add_argument_group("CSV files")
    csv.add_argument("--ts-column", help="timestamp column (default: the first column)")
    keys = csv.add_mutually_exclusive_group()
    keys.add_argument("--key-column", help="column holding the stream key")
    keys.add_argument("--key", help="one constant key (default: the file's stem)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _read_input(args: argparse.Namespace, settings: Settings) -> FileEvents:
    """The events of ``args.input`` (first ``--until-row``); sets a missing input_size."""
    from streamlstm.offline.eventfiles import read_events

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


# -- replay ----------------------------------------------------------------------


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "replay",
        "Backtest a JSONL or CSV file through the engine, in file order.",
        "  streamlstm replay sensors.jsonl --output predictions.jsonl\n"
        "  streamlstm replay ETTh2.csv --ts-column date --output out.jsonl\n"
        "  streamlstm replay trades.csv --key-column ticker --set model.cell=gru\n"
        "  streamlstm replay ETTh2.csv --ts-column date --checkpoint-dir ckpt --no-training\n\n"
        "The model resumes from the newest valid checkpoint in --checkpoint-dir (or\n"
        "training.checkpoint_dir) and, unless training.enabled=false, keeps learning in\n"
        "line every training.interval_events events, so reruns give the same output.\n"
        "Each event yields one JSON line: key, ts, prediction (the key's next values),\n"
        "error and anomaly_score of the previous prediction (null on a key's first\n"
        "event) and model_version. A summary with MAE/MSE goes to stderr.",
    )
    p.add_argument("input", type=Path, help="events: .jsonl (one message per line) or .csv")
    p.add_argument("--output", "-o", type=Path, help="JSONL output file (default: stdout)")
    _file_args(p)
    _add_learning_args(p)
    _settings_args(p)
    p.set_defaults(handler=_run_replay)


def _add_learning_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("learning while replaying")
    group.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="resume from the newest valid checkpoint here (default: training.checkpoint_dir)",
    )
    group.add_argument(
        "--save-checkpoints",
        action="store_true",
        help="write fine-tuned checkpoints to the checkpoint directory (off: reruns stay equal)",
    )
    group.add_argument(
        "--until-row", type=int, metavar="N", help="use only the file's first N valid events"
    )
    group.add_argument(
        "--no-training",
        action="store_true",
        help="inference only (same as --set training.enabled=false)",
    )


def _run_replay(args: argparse.Namespace) -> int:
    from streamlstm.engine import Engine
    from streamlstm.offline.backtest import replay

    settings = settings_from_args(
        args,
        **{
            "training.checkpoint_dir": args.checkpoint_dir,
            "training.enabled": "false" if args.no_training else None,
        },
    )
    data = _read_input(args, settings)
    engine = Engine.from_settings(settings)  # resumes from training.checkpoint_dir
    trainer = None
    if settings.training.enabled:
        from streamlstm.learning.inline import InlineTrainer

        trainer = InlineTrainer(engine, settings, write_checkpoints=args.save_checkpoints)
    out = args.output.open("wb") if args.output else sys.stdout.buffer
    try:
        summary = replay(
            engine, data, out, progress=False if args.no_progress else None, trainer=trainer
        )
    finally:
        if args.output:
            out.close()
    for line in summary.lines():
        print(line, file=sys.stderr)
    return 0


# -- pretrain --------------------------------------------------------------------


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "pretrain",
        "Warm-start a model offline on a JSONL or CSV file; write a checkpoint.",
        "  streamlstm pretrain history.jsonl --checkpoint-dir ckpt\n"
        "  streamlstm pretrain ETTh2.csv --ts-column date --until-row 3600 \\\n"
        "      --validation-from 2880 --checkpoint-dir ckpt --plot loss.png\n\n"
        "Events go through the engine's per-key scaler, so the model learns on the inputs\n"
        "it will see live. Rows from --validation-from on (or the last --validation-fraction)\n"
        "are held out for early stopping. `run` and `replay` resume from the checkpoint.",
    )
    p.add_argument("input", type=Path, help="events: .jsonl (one message per line) or .csv")
    p.add_argument(
        "--checkpoint-dir", type=Path, help="where to write it (default: training.checkpoint_dir)"
    )
    p.add_argument("--epochs", type=int, default=50, help="most epochs")
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--validation-from", type=int, metavar="ROW", help="first held-out event (0-based)"
    )
    split.add_argument(
        "--validation-fraction", type=float, default=0.2, help="held-out share at the end"
    )
    p.add_argument("--patience", type=int, default=5, help="epochs without improvement to stop")
    p.add_argument(
        "--until-row", type=int, metavar="N", help="use only the file's first N valid events"
    )
    p.add_argument("--plot", type=Path, metavar="PNG", help="write a loss-per-epoch plot")
    _file_args(p)
    _settings_args(p)
    p.set_defaults(handler=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    from streamlstm.learning.pretrain import plot_losses, pretrain

    settings = settings_from_args(args, **{"training.checkpoint_dir": args.checkpoint_dir})
    if settings.training.checkpoint_dir is None:
        raise ValueError("pretrain needs --checkpoint-dir (or training.checkpoint_dir)")
    data = _read_input(args, settings)
    result = pretrain(
        data.batch,
        settings,
        settings.training.checkpoint_dir,
        epochs=args.epochs,
        validation_from=args.validation_from,
        validation_fraction=args.validation_fraction,
        patience=args.patience,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    if args.plot:
        plot_losses(result, args.plot)
    for line in result.lines():
        print(line, file=sys.stderr)
    return 0


# -- bench -----------------------------------------------------------------------


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "bench",
        "Measure throughput against a baseline run in the same process.",
        "  streamlstm bench engine            batched engine vs the textbook loop\n"
        "  streamlstm bench engine --json     one JSON object, for scripts\n"
        "  streamlstm bench training          inference speed while fine-tuning, vs off\n"
        "  streamlstm bench e2e --batch 50    the daemon vs a bare Kafka consumer, end to end",
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
    training = which.add_parser(
        "training",
        help="inference events/s while fine-tuning runs nonstop, vs training off",
        description="Alternating off/on slices in one process; reference model, 1 inference "
        "thread; both executors (child process, thread) unless --executor is given.",
        formatter_class=_Formatter,
    )
    training.add_argument(
        "--executor",
        choices=["process", "thread"],
        action="append",
        help="measure only this executor (repeatable; default: both)",
    )
    training.add_argument("--keys", type=int, default=2000, help="distinct stream keys")
    training.add_argument("--batch", type=int, default=1024, help="events per micro-batch")
    training.add_argument("--seconds", type=float, default=3.0, help="length of one slice")
    training.add_argument("--slices", type=int, default=5, help="off/on slice pairs")
    training.add_argument("--json", action="store_true", help="print one JSON object per line")
    training.set_defaults(handler=_run_bench_training)
    e2e = which.add_parser(
        "e2e",
        help="the daemon end to end vs a bare kafka-python consumer, same run",
        description="Produces N events to the embedded broker (or --bootstrap), then reads\n"
        "them with a bare consumer + decoder, with a bare consume->produce pipe, and with\n"
        "the daemon; prints events/s of each and the ratios, then event latency at a\n"
        "fixed offered rate. --batch N also measures N-event JSON-array messages.",
        formatter_class=_Formatter,
    )
    e2e.add_argument("--events", type=int, default=100_000, help="events per throughput run")
    e2e.add_argument("--keys", type=int, default=1000, help="distinct stream keys")
    e2e.add_argument("--width", type=int, default=8, help="values per event")
    e2e.add_argument("--batch", type=int, default=1, help="also measure N events per message")
    e2e.add_argument("--rate", type=float, default=2000, help="offered events/s for latency")
    e2e.add_argument("--latency-seconds", type=float, default=10, help="0 skips latency")
    e2e.add_argument("--bootstrap", help="use this Kafka instead of an embedded broker")
    e2e.add_argument("--json", action="store_true", help="print one JSON object")
    e2e.set_defaults(handler=_run_bench_e2e)


def _run_bench_e2e(args: argparse.Namespace) -> int:
    import json

    from streamlstm.devtools.bench_e2e import bench_e2e
    from streamlstm.logs import setup_logging

    setup_logging("WARNING")
    result = bench_e2e(
        events=args.events,
        keys=args.keys,
        width=args.width,
        batch=args.batch,
        rate=args.rate,
        latency_seconds=args.latency_seconds,
        bootstrap=args.bootstrap,
    )
    print(json.dumps(result.as_dict()) if args.json else "\n".join(result.lines()))
    return 0


def _run_bench_training(args: argparse.Namespace) -> int:
    import json

    from streamlstm.devtools.bench_training import bench_training

    for executor in args.executor or ["process", "thread"]:
        result = bench_training(executor, args.keys, args.batch, args.seconds, args.slices)
        print(json.dumps(result.as_dict()) if args.json else result.line(), flush=True)
    return 0


def _run_bench_engine(args: argparse.Namespace) -> int:
    import json

    from streamlstm.devtools.bench_engine import bench_engine

    result = bench_engine(args.keys, args.batch, args.threads, args.rounds)
    print(json.dumps(result.as_dict()) if args.json else "\n".join(result.lines()))
    return 0


# -- config ----------------------------------------------------------------------


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = _command(
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
    _settings_args(p)
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


# -- run -------------------------------------------------------------------------


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = _command(
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
    _log_args(p)
    _settings_args(p)
    p.set_defaults(handler=_run_daemon)


def _daemon_settings(args: argparse.Namespace) -> Settings:
    return settings_from_args(
        args,
        **{
            "kafka.bootstrap_servers": args.bootstrap,
            "log.json_format": "true" if args.log_json else None,
            "log.level": args.log_level,
        },
    )


def _run_daemon(args: argparse.Namespace) -> int:
    from streamlstm.daemon import Daemon, install_signal_handlers
    from streamlstm.logs import setup_logging

    settings = _daemon_settings(args)
    setup_logging(settings.log.level, settings.log.json_format)
    daemon = Daemon(settings)
    install_signal_handlers(daemon)
    return daemon.run()


# -- demo ------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "demo",
        "Embedded broker + synthetic producer + daemon + /metrics, with live figures.",
        "  streamlstm demo\n  streamlstm demo --duration 30 --keys 1000 --rate 5000\n"
        "  streamlstm demo --batch 20        20 events per JSON-array message",
    )
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--keys", type=int, default=200, help="distinct stream keys")
    p.add_argument("--rate", type=float, default=2000, help="events/s offered")
    p.add_argument("--batch", type=int, default=1, help="events per message")
    p.add_argument("--width", type=int, default=4, help="values per event")
    p.add_argument("--every", type=float, default=5, help="seconds between live lines")
    p.add_argument("--bad-every", type=int, default=1000, help="one malformed message per N")
    p.add_argument("--metrics-port", type=int, help="default 9400 if free, else any")
    _log_args(p)
    _settings_args(p)
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from streamlstm.devtools.demo import DemoOptions, run_demo

    opts = DemoOptions(
        duration=args.duration,
        keys=args.keys,
        rate=args.rate,
        batch=args.batch,
        width=args.width,
        every=args.every,
        bad_every=args.bad_every,
        metrics_port=args.metrics_port,
        log_level=args.log_level or "WARNING",
        log_json=args.log_json,
    )
    overrides = dict(parse_override(item) for item in args.set)
    return run_demo(opts, overrides)


# -- broker ----------------------------------------------------------------------


def _add_broker(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "broker",
        "Run the embedded Kafka-compatible broker (Tansu, memory storage) in the foreground.",
        "  streamlstm broker --port 9092\n"
        "  streamlstm run --bootstrap 127.0.0.1:9092 --set model.input_size=4",
    )
    p.add_argument("--port", type=int, help="listen on this port (default: a free one)")
    p.set_defaults(handler=_run_broker)


def _run_broker(args: argparse.Namespace) -> int:
    from streamlstm.devtools.broker import run_foreground
    from streamlstm.logs import setup_logging

    setup_logging("INFO")
    run_foreground(args.port)
    return 0


# -- produce ---------------------------------------------------------------------


def _add_produce(sub: argparse._SubParsersAction) -> None:
    p = _command(
        sub,
        "produce",
        "Write events to a topic at a given rate: a synthetic stream or a JSONL/CSV file.",
        "  streamlstm produce --bootstrap 127.0.0.1:9092 --keys 100 --rate 1000 --duration 60\n"
        "  streamlstm produce --count 100000 --batch 50      50 events per JSON-array message\n"
        "  streamlstm produce sensors.jsonl --rate 0         a file, as fast as possible\n\n"
        "Synthetic keys are seasonal signals with noise, spikes and level shifts (--seed);\n"
        "their ts is the send time. Topic: kafka.input_topic unless --topic.",
    )
    p.add_argument("input", nargs="?", type=Path, help="JSONL or CSV file (default: synthetic)")
    p.add_argument("--bootstrap", help="shortcut for --set kafka.bootstrap_servers=...")
    p.add_argument("--topic", help="topic to write (default: kafka.input_topic)")
    p.add_argument("--keys", type=int, default=100, help="synthetic: distinct keys")
    p.add_argument("--width", type=int, help="synthetic: values per event (model.input_size or 4)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: random seed")
    p.add_argument("--rate", type=float, default=1000, help="events/s (0: as fast as possible)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--count", type=int, help="stop after N events")
    stop.add_argument("--duration", type=float, help="stop after S seconds")
    p.add_argument("--batch", type=int, default=1, help="events per JSON-array message")
    p.add_argument("--bad-every", type=int, default=0, help="one malformed message per N")
    _file_args(p)
    _settings_args(p)
    p.set_defaults(handler=_run_produce)


def _run_produce(args: argparse.Namespace) -> int:
    import threading

    from streamlstm.devtools.loadgen import (
        Producer,
        chunks_for_rate,
        file_events,
        make_producer,
        synthetic_events,
    )
    from streamlstm.devtools.synthetic import SyntheticStream
    from streamlstm.logs import setup_logging

    settings = settings_from_args(args, **{"kafka.bootstrap_servers": args.bootstrap})
    setup_logging(settings.log.level, settings.log.json_format)
    topic = args.topic or settings.kafka.input_topic
    if args.input is not None:
        chunks = file_events(
            args.input,
            width=settings.model.input_size,
            ts_column=args.ts_column,
            key_column=args.key_column,
            key=args.key,
        )
        total = args.count
    else:
        width = args.width or settings.model.input_size or 4
        stream = SyntheticStream(args.keys, width, args.seed)
        chunks = synthetic_events(stream, args.count)
        total = args.count
    stop = threading.Event()
    producer = Producer(
        make_producer(settings.kafka),
        topic,
        rate=args.rate,
        batch=args.batch,
        bad_every=args.bad_every,
        stop=stop,
        stamp_now=args.input is None,
    )
    try:
        summary = producer.run(
            chunks_for_rate(chunks, args.rate),
            duration=args.duration,
            progress=False if args.no_progress else None,
            total=total,
        )
    except KeyboardInterrupt:
        stop.set()
        summary = producer.summary
    finally:
        producer.producer.close(timeout=10)
    print(summary.line(), file=sys.stderr)
    return 0


# -- entry point -----------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_replay,
    _add_bench,
    _add_config,
    _add_pretrain,
    _add_run,
    _add_demo,
    _add_broker,
    _add_produce,
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
