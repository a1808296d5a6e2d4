"""Offline commands: ``replay`` (backtest a file) and ``pretrain`` (warm start a model).

Both read a JSONL or CSV file through :func:`streamlstm.cli.common.read_input`, so a
bad file is one line and exit 2 in either.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from streamlstm.cli.common import (
    command,
    file_args,
    read_input,
    settings_args,
    settings_from_args,
    user_input,
)
from streamlstm.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    from streamlstm.offline.eventfiles import FileEvents
    from streamlstm.offline.plot import KeyTrace
    from streamlstm.steps import BatchOutput

# -- replay ----------------------------------------------------------------------


def add_replay(sub: argparse._SubParsersAction) -> None:
    p = command(
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
        "event) and model_version. A summary with MAE/MSE goes to stderr.\n"
        "--plot draws one key (--plot-key, default: the first) over time: values,\n"
        "prediction, anomaly score and alarms; --windows shades labelled anomalies.",
    )
    p.add_argument("input", type=Path, help="events: .jsonl (one message per line) or .csv")
    p.add_argument("--output", "-o", type=Path, help="JSONL output file (default: stdout)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw one key's backtest")
    p.add_argument("--plot-key", metavar="KEY", help="the key to draw (default: the first)")
    p.add_argument(
        "--windows",
        type=Path,
        metavar="JSON",
        help="labelled anomaly windows to shade: {name: [[start, end], ...]} (NAB layout)",
    )
    file_args(p)
    _learning_args(p)
    settings_args(p)
    p.set_defaults(handler=run_replay)


def _learning_args(p: argparse.ArgumentParser) -> None:
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


def run_replay(args: argparse.Namespace) -> int:
    from streamlstm.engine import Engine
    from streamlstm.offline.backtest import replay

    settings = settings_from_args(
        args,
        **{
            "training.checkpoint_dir": args.checkpoint_dir,
            "training.enabled": "false" if args.no_training else None,
        },
    )
    data = read_input(args, settings)
    engine = Engine.from_settings(settings)  # resumes from training.checkpoint_dir
    trainer = None
    if settings.training.enabled:
        from streamlstm.learning.inline import InlineTrainer

        trainer = InlineTrainer(engine, settings, write_checkpoints=args.save_checkpoints)
    trace = None
    if args.plot:
        from streamlstm.offline.plot import KeyTrace

        trace = KeyTrace(args.plot_key or (data.batch.keys[0] if len(data.batch) else ""))
    if args.output:
        with user_input(args.output):
            out = args.output.open("wb")
    else:
        out = sys.stdout.buffer
    try:
        summary = replay(
            engine,
            data,
            out,
            on_batch=None if trace is None else _trace_batch(trace),
            progress=False if args.no_progress else None,
            trainer=trainer,
        )
    finally:
        if args.output:
            out.close()
    for line in summary.lines():
        print(line, file=sys.stderr)
    if trace is not None:
        _plot(args, trace, data, settings.engine.anomaly_threshold)
    return 0


def _trace_batch(trace: KeyTrace) -> Callable[[BatchOutput], None]:
    return lambda out: trace.add(out.keys, out.ts, out.prediction, out.anomaly_score)


def _plot(args: argparse.Namespace, trace: KeyTrace, data: FileEvents, threshold: float) -> None:
    import numpy as np

    from streamlstm.offline.plot import plot_key, read_windows

    mine = np.fromiter((k == trace.key for k in data.batch.keys), bool, len(data.batch))
    if not mine.any():
        raise ConfigError(f"--plot-key: no events of key {trace.key!r} in {args.input}")
    windows = None
    if args.windows:
        with user_input(args.windows):
            windows = read_windows(args.windows, args.input)
    alarms = plot_key(trace, data.batch.values[mine], args.plot, threshold, windows)
    print(f"plot: {args.plot} (key {trace.key!r}, {alarms} alarms)", file=sys.stderr)


# -- pretrain --------------------------------------------------------------------


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = command(
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
    p.add_argument(
        "--patience",
        type=int,
        help="epochs without improvement to stop (default: twice training.lr_patience, so a "
        "backed-off learning rate gets as many epochs as the first)",
    )
    p.add_argument(
        "--until-row", type=int, metavar="N", help="use only the file's first N valid events"
    )
    p.add_argument("--plot", type=Path, metavar="PNG", help="write a loss-per-epoch plot")
    file_args(p)
    settings_args(p)
    p.set_defaults(handler=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from streamlstm.learning.pretrain import plot_losses, pretrain

    settings = settings_from_args(args, **{"training.checkpoint_dir": args.checkpoint_dir})
    if settings.training.checkpoint_dir is None:
        raise ConfigError(
            "training.checkpoint_dir: pretrain needs --checkpoint-dir (or training.checkpoint_dir)"
        )
    data = read_input(args, settings)
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
