"""Development commands: ``demo``, ``broker``, ``produce`` and ``bench``.

They drive :mod:`streamlstm.devtools`, imported inside each command function, so the
rest of the command line (and every runtime module) never loads the development tools.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streamlstm.cli.common import (
    Formatter,
    command,
    file_args,
    log_args,
    settings_args,
    settings_from_args,
    user_input,
)
from streamlstm.config import parse_override

# -- demo ------------------------------------------------------------------------


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = command(
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
    log_args(p)
    settings_args(p)
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> int:
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


def add_broker(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "broker",
        "Run the embedded Kafka-compatible broker (Tansu, memory storage) in the foreground.",
        "  streamlstm broker --port 9092\n"
        "  streamlstm run --bootstrap 127.0.0.1:9092 --set model.input_size=4",
    )
    p.add_argument("--port", type=int, help="listen on this port (default: a free one)")
    p.set_defaults(handler=run_broker)


def run_broker(args: argparse.Namespace) -> int:
    from streamlstm.devtools.broker import run_foreground
    from streamlstm.logs import setup_logging

    setup_logging("INFO")
    run_foreground(args.port)
    return 0


# -- produce ---------------------------------------------------------------------


def add_produce(sub: argparse._SubParsersAction) -> None:
    p = command(
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
    file_args(p)
    settings_args(p)
    p.set_defaults(handler=run_produce)


def run_produce(args: argparse.Namespace) -> int:
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
        with user_input(args.input):
            chunks = file_events(
                args.input,
                width=settings.model.input_size,
                ts_column=args.ts_column,
                key_column=args.key_column,
                key=args.key,
            )
    else:
        width = args.width or settings.model.input_size or 4
        stream = SyntheticStream(args.keys, width, args.seed)
        chunks = synthetic_events(stream, args.count)
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
            total=args.count,
        )
    except KeyboardInterrupt:
        stop.set()
        summary = producer.summary
    finally:
        producer.producer.close(timeout=10)
    print(summary.line(), file=sys.stderr)
    return 0


# -- bench -----------------------------------------------------------------------


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "bench",
        "Measure throughput against a baseline run in the same process.",
        "  streamlstm bench engine            batched engine vs the textbook loop\n"
        "  streamlstm bench engine --json     one JSON object, for scripts\n"
        "  streamlstm bench training          inference speed while fine-tuning, vs off\n"
        "  streamlstm bench e2e --batch 50    the daemon vs a bare Kafka consumer, end to end\n"
        "  streamlstm bench state             restore keys/s; events/s changelog on vs off;\n"
        "                                     restart to first prediction (--restart-keys)\n"
        "  streamlstm bench anomaly DIR       NAB-layout corpus: NAB scores, forecast vs naive",
    )
    which = p.add_subparsers(dest="bench", required=True, metavar="WHAT")
    engine = which.add_parser(
        "engine",
        help="batched engine vs one nn.LSTM call per event",
        description="Reference setting: input 8, hidden 64, 2 layers, 100,000 keys, 1 thread.",
        formatter_class=Formatter,
    )
    engine.add_argument("--keys", type=int, default=100_000, help="distinct stream keys")
    engine.add_argument("--batch", type=int, default=4096, help="events per micro-batch")
    engine.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    engine.add_argument("--rounds", type=int, default=5, help="timed rounds (median is kept)")
    engine.add_argument(
        "--churn",
        action="store_true",
        help="instead: a table full at state.max_keys (= --keys), with vs without a new key "
        "in every batch",
    )
    engine.add_argument("--json", action="store_true", help="print one JSON object")
    engine.set_defaults(handler=run_bench_engine)
    training = which.add_parser(
        "training",
        help="inference events/s while fine-tuning runs nonstop, vs training off",
        description="Alternating off/on slices in one process; reference model, 1 inference "
        "thread; both executors (child process, thread) unless --executor is given.",
        formatter_class=Formatter,
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
    training.set_defaults(handler=run_bench_training)
    e2e = which.add_parser(
        "e2e",
        help="the daemon end to end vs a bare kafka-python consumer, same run",
        description="Produces N events to the embedded broker (or --bootstrap), then reads\n"
        "them with a bare consumer + decoder, with a bare consume->produce pipe, and with\n"
        "the daemon; prints events/s of each and the ratios, then event latency at a\n"
        "fixed offered rate. --batch N also measures N-event JSON-array messages;\n"
        "--output-per-message adds the daemon writing one array per input message there.",
        formatter_class=Formatter,
    )
    e2e.add_argument("--events", type=int, default=100_000, help="events per throughput run")
    e2e.add_argument("--keys", type=int, default=1000, help="distinct stream keys")
    e2e.add_argument("--width", type=int, default=8, help="values per event")
    e2e.add_argument("--batch", type=int, default=1, help="also measure N events per message")
    e2e.add_argument(
        "--rate",
        type=float,
        default=0,
        help="offered events/s for latency (0: half of each client's maximum sustained rate)",
    )
    e2e.add_argument(
        "--clients",
        default="kafka-python,confluent",
        help="comma-separated Kafka clients to run the daemon on",
    )
    e2e.add_argument("--latency-seconds", type=float, default=10, help="0 skips latency")
    e2e.add_argument("--bootstrap", help="use this Kafka instead of an embedded broker")
    e2e.add_argument(
        "--output-per-message",
        action="store_true",
        help="with --batch N: also the daemon writing one array per input message",
    )
    e2e.add_argument("--rounds", type=int, default=1, help="daemon runs per mode (median)")
    e2e.add_argument("--json", action="store_true", help="print one JSON object")
    e2e.set_defaults(handler=run_bench_e2e)
    state = which.add_parser(
        "state",
        help="restore rate from the state changelog; events/s with it on vs off",
        description="Writes K keys' rows twice to a changelog partition and restores them as\n"
        "a member taking the partition over does (keys/s); then runs the daemon over the\n"
        "same N events with state.changelog off and on (events/s, same run).",
        formatter_class=Formatter,
    )
    state.add_argument(
        "--restore-keys", type=int, nargs="+", default=[100_000], help="keys per restore run"
    )
    state.add_argument("--events", type=int, default=50_000, help="events per throughput run")
    state.add_argument(
        "--restart-keys",
        type=int,
        nargs="*",
        default=[],
        help="keys per restart-to-first-prediction run, with and without state.dir",
    )
    state.add_argument("--keys", type=int, default=1000, help="distinct keys of those events")
    state.add_argument("--bootstrap", help="use this Kafka instead of an embedded broker")
    state.add_argument("--json", action="store_true", help="print one JSON object")
    state.set_defaults(handler=run_bench_state)
    anomaly = which.add_parser(
        "anomaly",
        help="anomaly scores on a labelled corpus (NAB layout), scored by NAB's rules",
        description="Replays every data/<category>/*.csv of DIR through the engine as replay\n"
        "does (one key per file, learning on), scores anomaly_score with NAB's rules\n"
        "(labels/combined_windows.json; standard, low-FP and low-FN profiles) and compares\n"
        "each file's forecast MSE with persistence. Settings are the defaults unless --set.",
        formatter_class=Formatter,
    )
    anomaly.add_argument("corpus", type=Path, metavar="DIR", help="corpus in NAB's layout")
    anomaly.add_argument(
        "--one-stream", action="store_true", help="all files as keys of one stream"
    )
    anomaly.add_argument("--workers", type=int, default=1, help="files replayed in parallel")
    anomaly.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    anomaly.add_argument("--json", action="store_true", help="print one JSON object")
    settings_args(anomaly)
    anomaly.set_defaults(handler=run_bench_anomaly)


def run_bench_e2e(args: argparse.Namespace) -> int:
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
        output_per_message=args.output_per_message,
        rounds=args.rounds,
        clients=tuple(c.strip() for c in args.clients.split(",") if c.strip()),
    )
    print(json.dumps(result.as_dict()) if args.json else "\n".join(result.lines()))
    return 0


def run_bench_state(args: argparse.Namespace) -> int:
    from streamlstm.devtools.bench_state import bench_state
    from streamlstm.logs import setup_logging

    setup_logging("WARNING")
    result = bench_state(
        tuple(args.restore_keys),
        args.events,
        args.keys,
        args.bootstrap,
        tuple(args.restart_keys),
    )
    print(json.dumps(result.as_dict()) if args.json else "\n".join(result.lines()))
    return 0


def run_bench_anomaly(args: argparse.Namespace) -> int:
    from streamlstm.devtools.bench_anomaly import bench_anomaly

    report = bench_anomaly(
        args.corpus,
        settings_from_args(args, **{"model.input_size": 1}),
        one_stream=args.one_stream,
        progress=not args.no_progress,
        workers=args.workers,
    )
    print(json.dumps(report.as_dict()) if args.json else report.format())
    return 0


def run_bench_training(args: argparse.Namespace) -> int:
    from streamlstm.devtools.bench_training import bench_training

    for executor in args.executor or ["process", "thread"]:
        result = bench_training(executor, args.keys, args.batch, args.seconds, args.slices)
        print(json.dumps(result.as_dict()) if args.json else result.line(), flush=True)
    return 0


def run_bench_engine(args: argparse.Namespace) -> int:
    from streamlstm.devtools.bench_engine import bench_churn, bench_engine

    run = bench_churn if args.churn else bench_engine
    result = run(args.keys, args.batch, args.threads, args.rounds)
    print(json.dumps(result.as_dict()) if args.json else "\n".join(result.lines()))
    return 0
