"""Replay a file through the engine in stream order: the offline twin of the daemon.

The same decoding, engine and output records as ``streamlstm run``, so a backtest
says what the daemon would have said. Each event yields one JSON line
(``key, ts, prediction, error, anomaly_score, model_version``); the summary gives
MAE and MSE of next-step predictions in input units.

With an :class:`~streamlstm.learning.inline.InlineTrainer` the replay keeps learning: batches
are cut so fine-tuning runs at exactly the events where the daemon's schedule falls due
(in event time where it counts time; at once after a batch with drift), in line, so the
same file, config and seed give the same outputs on every run, whatever
``engine.max_batch`` is.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

import numpy as np
import orjson
from tqdm import tqdm

from streamlstm.engine import BatchOutput, Engine
from streamlstm.offline.eventfiles import FileEvents

if TYPE_CHECKING:
    from streamlstm.learning.inline import InlineTrainer


@dataclass
class ReplaySummary:
    """What a replay saw and how well it predicted."""

    events: int = 0
    keys: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    scored: int = 0
    mae: float = float("nan")
    mse: float = float("nan")
    seconds: float = 0.0
    model_version: int = 0
    finetune: Counter[str] = field(default_factory=Counter)  # run results, in-line training

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("nan")

    def lines(self) -> list[str]:
        rejected = ", ".join(f"{r}={n}" for r, n in sorted(self.rejected.items())) or "none"
        return [
            f"events: {self.events:,}   keys: {self.keys:,}   rejected: {rejected}",
            f"next-step error over {self.scored:,} scored events (input units): "
            f"MAE {self.mae:.4f}   MSE {self.mse:.4f}",
            f"throughput: {self.events_per_s:,.0f} events/s   model_version: {self.model_version}",
            *(
                [f"fine-tuning runs: {', '.join(f'{k}={v}' for k, v in sorted(runs.items()))}"]
                if (runs := self.finetune)
                else []
            ),
        ]


def replay(
    engine: Engine,
    data: FileEvents,
    out: IO[bytes] | None = None,
    on_batch: Callable[[BatchOutput], None] | None = None,
    progress: bool | None = None,
    trainer: InlineTrainer | None = None,
) -> ReplaySummary:
    """Run ``data`` through ``engine`` in file order, writing JSON lines to ``out``.

    ``on_batch`` sees every output batch; ``trainer`` fine-tunes in line (see above).
    ``progress`` None shows a bar only on a terminal.
    """
    batch = data.batch
    total = len(batch)
    step = engine.settings.engine.max_batch
    abs_sum = sq_sum = 0.0
    scored = 0
    started = time.perf_counter()
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=total, unit="ev", disable=not show, desc="replay") as bar:
        start = 0
        while start < total:
            size = step
            if trainer is not None:
                size = min(step, trainer.events_until_run(batch.ts[start : start + step]))
            output = engine.process(batch.take(slice(start, start + size)))
            start += size
            if trainer is not None:
                trainer.on_batch(output)
            if on_batch is not None:
                on_batch(output)
            known = ~np.isnan(output.error)
            scored += int(known.sum())
            abs_sum += float(output.error[known].sum(dtype=np.float64))
            sq_sum += float(output.squared_error[known].sum(dtype=np.float64))
            if out is not None:
                out.write(b"".join(orjson.dumps(r) + b"\n" for r in output.records()))
            bar.update(len(output))
    return ReplaySummary(
        events=total,
        keys=len(set(batch.keys)),
        rejected=Counter(data.rejected),
        scored=scored,
        mae=abs_sum / scored if scored else float("nan"),
        mse=sq_sum / scored if scored else float("nan"),
        seconds=time.perf_counter() - started,
        model_version=engine.model_version,
        finetune=trainer.counts() if trainer is not None else Counter(),
    )
