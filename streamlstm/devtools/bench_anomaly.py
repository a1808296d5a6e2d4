"""`streamlstm bench anomaly DIR`: the engine's anomaly scores on a labelled corpus in NAB's
layout, scored with NAB's rules (:mod:`streamlstm.devtools.nab`).

Each file is replayed exactly as ``streamlstm replay FILE`` would: the same CSV reader, a
fresh engine from the settings (resuming from ``training.checkpoint_dir`` when set) and,
with ``training.enabled``, in-line fine-tuning. Every row's ``anomaly_score`` (None/NaN
counts as 0) is the detector output; one threshold per NAB profile is chosen over the
whole corpus. Per file it also reports the next-step forecast MSE against persistence's.

Each file runs through its own engine (``workers`` > 1: in that many processes, with the
same results): several files as keys of one engine in lock-step batches would share the
fine-tuning runs and the global drift detector, so they would not give the results of
separate replays. ``one_stream=True`` measures exactly that instead: all
files as keys of one stream (key = the file's path in the corpus), merged by time with
each file's clock moved to start at the earliest file's first timestamp, so no key looks
idle for years and is evicted.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from streamlstm.config import Settings
from streamlstm.devtools import nab
from streamlstm.engine import BatchOutput, Engine
from streamlstm.events import EventBatch
from streamlstm.offline.backtest import replay
from streamlstm.offline.eventfiles import FileEvents, read_events


@dataclass
class FileResult:
    """One file's forecast quality and replay time."""

    name: str
    category: str
    rows: int
    mse: float  # prediction at row t vs value at t + 1, rows 0..n-2
    persistence_mse: float  # value at t vs value at t + 1
    seconds: float
    raw: dict[str, float] = field(default_factory=dict)  # profile -> raw NAB score

    @property
    def ratio(self) -> float:
        """MSE over persistence MSE: < 1 beats persistence."""
        if not self.persistence_mse > 0:
            return math.nan
        return self.mse / self.persistence_mse


@dataclass
class AnomalyReport:
    """NAB scores of the engine's anomaly scores, and per-file forecast quality."""

    corpus: str
    one_stream: bool
    rows: int
    windows: int
    seconds: float
    score: nab.CorpusScore
    files: list[FileResult]
    settings: dict[str, Any] = field(default_factory=dict)  # the few that matter here

    @property
    def median_ratio(self) -> float:
        ratios = [f.ratio for f in self.files if not math.isnan(f.ratio)]
        return float(np.median(ratios)) if ratios else math.nan

    @property
    def worst_file(self) -> FileResult | None:
        ratios = [f for f in self.files if not math.isnan(f.ratio)]
        return max(ratios, key=lambda f: f.ratio) if ratios else None

    def as_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (NaN and never-fire thresholds become None)."""

        def num(x: float | None) -> float | None:
            return None if x is None or math.isnan(x) or math.isinf(x) else x

        worst = self.worst_file
        return {
            "corpus": self.corpus,
            "one_stream": self.one_stream,
            "files": len(self.files),
            "rows": self.rows,
            "windows": self.windows,
            "seconds": self.seconds,
            "settings": self.settings,
            **self.score.as_dict(),
            "forecast": {
                "median_mse_ratio": num(self.median_ratio),
                "worst_file": worst.name if worst else None,
                "worst_mse_ratio": num(worst.ratio) if worst else None,
                "files": {
                    f.name: {
                        "rows": f.rows,
                        "mse": num(f.mse),
                        "persistence_mse": num(f.persistence_mse),
                        "mse_ratio": num(f.ratio),
                        "seconds": f.seconds,
                        "raw": f.raw,
                    }
                    for f in self.files
                },
            },
        }

    def format(self) -> str:
        """A human table: NAB scores per profile overall and per category, then per file."""
        profiles = list(self.score.optima)
        short = [nab.SHORT_NAMES.get(p, p) for p in profiles]
        mode = "one stream" if self.one_stream else "one replay per file"
        lines = [
            f"NAB scores of anomaly_score on {self.corpus}: {len(self.files)} files, "
            f"{self.rows:,} rows, {self.windows} windows ({mode}, {self.seconds:.1f} s)",
            "",
            f"{'':28}" + "".join(f"{s:>10}" for s in short),
        ]

        def row(label: str, values: list[float | None]) -> str:
            cells = "".join(f"{'-':>10}" if v is None else f"{v:>10.2f}" for v in values)
            return f"{label:28}{cells}"

        lines.append(
            row("score (0 never, 100 perfect)", [o.normalised for o in self.score.optima.values()])
        )
        for cat in next(iter(self.score.categories.values()), {}):
            lines.append(row(f"  {cat}", [self.score.categories[p][cat] for p in profiles]))
        thresholds = [self.score.optima[p].threshold for p in profiles]
        lines.append(
            f"{'threshold':28}"
            + "".join(f"{'never':>10}" if math.isinf(t) else f"{t:>10.6g}" for t in thresholds)
        )
        lines += ["", f"{'file':56}{'rows':>7}{'MSE/persistence':>17}{'std raw':>9}"]
        for f in self.files:
            raw = f.raw.get("standard", math.nan)
            lines.append(f"{f.name:56}{f.rows:>7}{f.ratio:>17.3f}{raw:>9.3f}")
        worst = self.worst_file
        lines.append(f"median MSE/persistence: {self.median_ratio:.3f}")
        if worst is not None:
            lines.append(f"worst file: {worst.name} ({worst.ratio:.3f})")
        return "\n".join(lines)


def prepare_settings(settings: Settings) -> Settings:
    """A copy with ``model.input_size`` 1 (NAB files have one value column)."""
    settings = settings.model_copy(deep=True)
    if settings.model.input_size is None:
        settings.model.input_size = 1
    elif settings.model.input_size != 1:
        raise ValueError(
            f"NAB files have one value; model.input_size is {settings.model.input_size}"
        )
    return settings


def _read(root: Path, f: nab.NabFile, settings: Settings) -> tuple[FileEvents, np.ndarray]:
    """The file as ``replay`` reads it, and the data rows its events came from."""
    data = read_events(
        root / "data" / f.name, width=1, max_message_bytes=settings.engine.max_message_bytes
    )
    bad = {r.message - 2 for r in data.rejections}  # CSV: message = line number
    rows = np.array([i for i in range(len(f)) if i not in bad], dtype=np.int64)
    if len(rows) != len(data.batch):
        raise ValueError(f"{f.name}: cannot align {len(data.batch)} events with {len(f)} rows")
    return data, rows


def _run(settings: Settings, data: FileEvents, progress: bool) -> BatchOutput:
    """Replay ``data`` through a fresh engine (learning in line when enabled); all outputs."""
    engine = Engine.from_settings(settings)
    trainer = None
    if settings.training.enabled:
        from streamlstm.learning.inline import InlineTrainer

        trainer = InlineTrainer(engine, settings, write_checkpoints=False)
    outputs: list[BatchOutput] = []
    replay(engine, data, progress=progress, trainer=trainer, on_batch=outputs.append)
    return BatchOutput(
        [k for o in outputs for k in o.keys],
        np.concatenate([o.ts for o in outputs]),
        np.concatenate([o.prediction for o in outputs]),
        np.concatenate([o.error for o in outputs]),
        np.concatenate([o.squared_error for o in outputs]),
        np.concatenate([o.anomaly_score for o in outputs]),
        outputs[-1].model_version,
    )


def _forecast(
    f: nab.NabFile, rows: np.ndarray, prediction: np.ndarray, seconds: float
) -> FileResult:
    """Next-step MSE of the predictions (at the replayed rows) against persistence."""
    values = np.asarray(f.values, dtype=np.float64)[rows]
    pred = prediction[:, 0].astype(np.float64)
    nxt = values[1:]
    mse = float(np.mean((pred[:-1] - nxt) ** 2)) if len(nxt) else math.nan
    naive = float(np.mean((values[:-1] - nxt) ** 2)) if len(nxt) else math.nan
    return FileResult(f.name, f.category, len(f), mse, naive, seconds)


def _scores(f: nab.NabFile, rows: np.ndarray, anomaly: np.ndarray) -> np.ndarray:
    out = np.zeros(len(f))
    out[rows] = np.nan_to_num(anomaly.astype(np.float64), nan=0.0)
    return out


def _replay_file(root: Path, f: nab.NabFile, settings: Settings) -> tuple[np.ndarray, FileResult]:
    """One file, one fresh engine: its NAB-aligned anomaly scores and forecast figures."""
    t0 = time.perf_counter()
    data, rows = _read(root, f, settings)
    out = _run(settings, data, progress=False)
    seconds = time.perf_counter() - t0
    return _scores(f, rows, out.anomaly_score), _forecast(f, rows, out.prediction, seconds)


def _per_file(
    root: Path, files: list[nab.NabFile], settings: Settings, workers: int, progress: bool
) -> list[tuple[np.ndarray, FileResult]]:
    """Each file through its own engine; with ``workers`` > 1 in spawned processes (the
    runs share nothing, so the results are the same)."""
    bar = tqdm(total=len(files), desc="bench anomaly", unit="file", disable=not progress)
    with bar:
        if workers <= 1:
            done = []
            for f in files:
                done.append(_replay_file(root, f, settings))
                bar.update()
            return done
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(files)), mp_context=context) as pool:
            futures = [pool.submit(_replay_file, root, f, settings) for f in files]
            for _ in as_completed(futures):
                bar.update()
            return [future.result() for future in futures]


def _one_stream(
    root: Path, files: list[nab.NabFile], settings: Settings, progress: bool
) -> list[tuple[np.ndarray, FileResult]]:
    """All files as keys of one stream through one engine, merged by (re-based) time."""
    loaded = [_read(root, f, settings) for f in files]
    origin = min(float(d.batch.ts[0]) for d, _ in loaded if len(d.batch))
    keys = [f.name for f, (d, _) in zip(files, loaded, strict=True) for _ in range(len(d.batch))]
    ts = np.concatenate([d.batch.ts - d.batch.ts[0] + origin for d, _ in loaded])
    values = np.concatenate([d.batch.values for d, _ in loaded])
    which = np.concatenate([np.full(len(d.batch), i) for i, (d, _) in enumerate(loaded)])
    order = np.lexsort((np.arange(len(ts)), ts))  # by time; ties in file order
    merged = EventBatch.from_arrays([keys[i] for i in order], ts[order], values[order])
    out = _run(settings, FileEvents(merged), progress)
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    done = []
    for i, (f, (_, rows)) in enumerate(zip(files, loaded, strict=True)):
        mine = back[which == i]  # this file's events, in file order, in the output
        done.append(
            (
                _scores(f, rows, out.anomaly_score[mine]),
                _forecast(f, rows, out.prediction[mine], math.nan),
            )
        )
    return done


def bench_anomaly(
    corpus_dir: str | Path,
    settings: Settings,
    *,
    one_stream: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> AnomalyReport:
    """Replay every file of the NAB-layout corpus at ``corpus_dir`` through the engine and
    score its anomaly scores with NAB's rules (see the module docstring). ``workers``
    replays files in that many processes (not with ``one_stream``)."""
    root = Path(corpus_dir)
    settings = prepare_settings(settings)
    files = nab.load_corpus(root)
    started = time.perf_counter()
    if one_stream:
        done = _one_stream(root, files, settings, progress)
    else:
        done = _per_file(root, files, settings, workers, progress)
    seconds = time.perf_counter() - started
    scores = [s for s, _ in done]
    results = [r for _, r in done]
    score = nab.score_corpus(files, scores)
    for r in results:
        r.raw = {p: score.raw_by_file[p][r.name] for p in score.optima}
    return AnomalyReport(
        corpus=str(root),
        one_stream=one_stream,
        rows=sum(len(f) for f in files),
        windows=sum(len(f.windows) for f in files),
        seconds=seconds,
        score=score,
        files=results,
        settings={
            "training.enabled": settings.training.enabled,
            "training.checkpoint_dir": str(settings.training.checkpoint_dir)
            if settings.training.checkpoint_dir
            else None,
            "model.seed": settings.model.seed,
        },
    )
