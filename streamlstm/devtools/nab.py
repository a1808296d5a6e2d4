"""NAB (Numenta Anomaly Benchmark) corpus loading and scoring, in numpy.

Implements NAB v1.1's scorer (``nab/sweeper.py``): per file, the first
``min(floor(0.15 n), 750)`` rows are probation and not scored; a detection (score >= θ)
inside a window earns ``tp * σ(-(r - i + 1) / w) / σ(-1)`` for the window's earliest
detection only (``σ(x) = 2 / (1 + e^{5x}) - 1``, ``-1`` for ``x >= 3``); a window without
a detection costs ``fn``; a detection outside every window adds ``fp * σ(|i - r_prev| /
(w_prev - 1))`` after a window, ``-fp`` before any. Windows whose rows all fall in
probation are not scored (as in NAB). One θ per profile maximises the raw score summed
over the corpus, swept over the distinct scores (highest θ wins a tie); the result is
normalised as ``100 (S - S_null) / (S_perfect - S_null)``.

>>> f = NabFile("cat/a.csv", "cat", np.arange(100).astype("datetime64[m]"), [(40, 49)])
>>> scores = np.zeros(100)
>>> scores[40] = 0.9  # a detection at the window's first row
>>> round(score_file(f, scores, PROFILES["standard"], 0.5), 4)
1.0
>>> scores[60] = 0.9  # and a false positive 11 rows past its end (w = 10): -0.11
>>> round(score_file(f, scores, PROFILES["standard"], 0.5), 2)
0.89
>>> result = optimise([f], [scores], PROFILES["standard"])
>>> result.threshold, round(result.normalised, 2)
(0.9, 94.52)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROBATION_PERCENT = 0.15
PROBATION_MAX = PROBATION_PERCENT * 5000  # 750 rows, as NAB computes it


@dataclass(frozen=True)
class Profile:
    """An application profile: weights of a true positive, a missed window and a false positive."""

    name: str
    tp: float
    fn: float
    fp: float


PROFILES: dict[str, Profile] = {
    "standard": Profile("standard", 1.0, 1.0, 0.11),
    "reward_low_FP_rate": Profile("reward_low_FP_rate", 1.0, 1.0, 0.22),
    "reward_low_FN_rate": Profile("reward_low_FN_rate", 1.0, 2.0, 0.11),
}
SHORT_NAMES = {
    "standard": "standard",
    "reward_low_FP_rate": "low-FP",
    "reward_low_FN_rate": "low-FN",
}


def scaled_sigmoid(x: np.ndarray | float) -> np.ndarray:
    """NAB's ``2 / (1 + e^{5x}) - 1``, and exactly ``-1`` for ``x >= 3``."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        return np.where(x >= 3.0, -1.0, 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0)


_MAX_TP = float(scaled_sigmoid(-1.0))


def probation_length(n: int) -> int:
    """Rows at a file's start that are not scored."""
    return int(min(math.floor(PROBATION_PERCENT * n), PROBATION_MAX))


@dataclass
class NabFile:
    """One data file: its rows' timestamps (and values) and its windows as inclusive row ranges."""

    name: str  # "<category>/<file>.csv", as in combined_windows.json
    category: str
    timestamps: np.ndarray  # datetime64
    windows: list[tuple[int, int]]
    values: np.ndarray | None = None
    _parts: tuple[np.ndarray, ...] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.timestamps)

    def parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: window index (-1 outside every window, -2 on probation), the unweighted
        TP value (window rows) and the unweighted FP value (other rows): NAB's sweep scores
        before the profile's weights."""
        if self._parts is None:
            n = len(self)
            window = np.full(n, -1, dtype=np.int64)
            tp = np.zeros(n)
            fp = np.full(n, -1.0)  # no window before: -1
            rows = np.arange(n, dtype=np.float64)
            for k, (left, right) in enumerate(self.windows):
                width = right - left + 1.0
                window[left : right + 1] = k
                tp[left : right + 1] = scaled_sigmoid(-(right - rows[left : right + 1] + 1) / width)
                after = slice(right + 1, self.windows[k + 1][0] if k + 1 < len(self.windows) else n)
                fp[after] = scaled_sigmoid(np.abs(right - rows[after]) / max(width - 1.0, 1e-12))
            window[: probation_length(n)] = -2
            self._parts = (window, tp / _MAX_TP, fp)
        return self._parts  # type: ignore[return-value]

    def scored_windows(self) -> int:
        """Windows with at least one row past probation (the ones NAB scores)."""
        return len(np.unique(self.parts()[0][self.parts()[0] >= 0]))


def _parse_times(cells: list[str]) -> np.ndarray:
    return np.array([c.strip() for c in cells], dtype="datetime64[us]")


def read_series(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``timestamp`` and the second column (``value`` or ``anomaly_score``) of a NAB CSV."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    times = _parse_times([r[0] for r in rows])
    values = np.array([float(r[1]) if r[1].strip() else np.nan for r in rows], dtype=np.float64)
    return times, values


def window_rows(times: np.ndarray, windows: list[list[str]]) -> list[tuple[int, int]]:
    """Windows ``[start, end]`` (timestamps, inclusive) as row ranges: the rows inside."""
    out = []
    for start, end in windows:
        left = int(np.searchsorted(times, np.datetime64(start.strip(), "us"), side="left"))
        right = int(np.searchsorted(times, np.datetime64(end.strip(), "us"), side="right")) - 1
        if right >= left:
            out.append((left, right))
    return sorted(out)


def load_corpus(root: str | Path, with_values: bool = True) -> list[NabFile]:
    """Every file of a NAB-layout corpus (``data/<category>/<name>.csv`` and
    ``labels/combined_windows.json``), sorted by name. Files missing from the labels
    have no windows."""
    root = Path(root)
    labels = json.loads((root / "labels" / "combined_windows.json").read_text())
    files = []
    for path in sorted((root / "data").glob("*/*.csv")):
        name = f"{path.parent.name}/{path.name}"
        times, values = read_series(path)
        windows = window_rows(times, labels.get(name, []))
        files.append(
            NabFile(name, path.parent.name, times, windows, values if with_values else None)
        )
    if not files:
        raise ValueError(f"{root}: no data/<category>/<name>.csv files")
    return files


def load_detector_scores(results_dir: str | Path, files: list[NabFile]) -> list[np.ndarray]:
    """``anomaly_score`` columns of ``<results_dir>/<category>/<name>.csv``, row-aligned to
    ``files`` (a row count mismatch raises)."""
    out = []
    for f in files:
        _, scores = read_series(Path(results_dir) / f.name)
        if len(scores) != len(f):
            raise ValueError(f"{f.name}: {len(scores)} scores for {len(f)} rows")
        out.append(scores)
    return out


def _clean(scores: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)


def score_file(f: NabFile, scores: np.ndarray, profile: Profile, threshold: float) -> float:
    """A file's raw NAB score at ``threshold`` (rows with score >= it are detections)."""
    window, tp, fp = f.parts()
    scored = window >= -1
    hit = (_clean(scores) >= threshold) & scored
    total = profile.fp * float(fp[hit & (window == -1)].sum())
    for k in np.unique(window[window >= 0]):
        mine = hit & (window == k)
        total += profile.tp * float(tp[mine].max()) if mine.any() else -profile.fn
    return total


def null_score(files: list[NabFile], profile: Profile) -> float:
    """Raw score of a detector that never fires."""
    return -profile.fn * sum(f.scored_windows() for f in files)


def perfect_score(files: list[NabFile], profile: Profile) -> float:
    """Raw score of a perfect detector, as NAB counts it: TP weight times the windows."""
    return profile.tp * sum(len(f.windows) for f in files)


def normalise(raw: float, files: list[NabFile], profile: Profile) -> float | None:
    """``100 (S - S_null) / (S_perfect - S_null)``; None when there is no window."""
    null, perfect = null_score(files, profile), perfect_score(files, profile)
    return None if perfect == null else 100.0 * (raw - null) / (perfect - null)


@dataclass
class Optimum:
    """The best threshold of one profile over a corpus."""

    profile: str
    threshold: float  # inf: never fire
    raw: float
    normalised: float | None


def sweep(
    files: list[NabFile], scores: list[np.ndarray], profile: Profile
) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate threshold (``inf``, then each distinct score, descending) and the
    corpus raw score there: one sort and a cumulative sum, no loop over thresholds."""
    all_scores, deltas = [], []
    for f, s in zip(files, scores, strict=True):
        window, tp, fp = f.parts()
        keep = window >= -1
        s = _clean(s)[keep]
        window, tp, fp = window[keep], tp[keep], fp[keep]
        delta = np.where(window == -1, profile.fp * fp, 0.0)
        # A window's part is the running max of its rows' TP values in descending score
        # order (from -fn): each row adds how far it lifts that max.
        for k in np.unique(window[window >= 0]):
            rows = np.flatnonzero(window == k)
            rows = rows[np.argsort(-s[rows], kind="stable")]
            best = np.maximum.accumulate(np.concatenate([[-profile.fn], profile.tp * tp[rows]]))
            delta[rows] = np.diff(best)
        all_scores.append(s)
        deltas.append(delta)
    s = np.concatenate(all_scores) if all_scores else np.zeros(0)
    d = np.concatenate(deltas) if deltas else np.zeros(0)
    order = np.argsort(-s, kind="stable")
    s, total = s[order], np.cumsum(d[order])
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if len(s) else np.zeros(0, int)
    base = null_score(files, profile)
    thresholds = np.concatenate([[np.inf], s[last]])
    raws = base + np.concatenate([[0.0], total[last]])
    return thresholds, raws


def optimise(files: list[NabFile], scores: list[np.ndarray], profile: Profile) -> Optimum:
    """The threshold that maximises the corpus raw score (the highest one on a tie)."""
    thresholds, raws = sweep(files, scores, profile)
    best = int(np.argmax(raws))  # first maximum: the highest threshold
    raw = sum(
        score_file(f, s, profile, thresholds[best]) for f, s in zip(files, scores, strict=True)
    )
    return Optimum(profile.name, float(thresholds[best]), raw, normalise(raw, files, profile))


@dataclass
class CorpusScore:
    """Per profile: the optimum over the corpus and normalised scores per category."""

    optima: dict[str, Optimum]
    categories: dict[str, dict[str, float | None]]  # profile -> category -> normalised
    raw_by_file: dict[str, dict[str, float]]  # profile -> file -> raw

    def as_dict(self) -> dict[str, object]:
        return {
            "profiles": {
                p: {
                    "threshold": None if math.isinf(o.threshold) else o.threshold,
                    "raw": o.raw,
                    "score": o.normalised,
                    "categories": self.categories[p],
                }
                for p, o in self.optima.items()
            }
        }


def score_corpus(
    files: list[NabFile], scores: list[np.ndarray], profiles: dict[str, Profile] | None = None
) -> CorpusScore:
    """Optimise each profile's threshold over the corpus; score it overall and per category."""
    profiles = profiles or PROFILES
    optima, categories, raw_by_file = {}, {}, {}
    for name, profile in profiles.items():
        opt = optimise(files, scores, profile)
        per_file = {
            f.name: score_file(f, s, profile, opt.threshold)
            for f, s in zip(files, scores, strict=True)
        }
        by_cat: dict[str, float | None] = {}
        for cat in sorted({f.category for f in files}):
            members = [f for f in files if f.category == cat]
            by_cat[cat] = normalise(sum(per_file[f.name] for f in members), members, profile)
        optima[name], categories[name], raw_by_file[name] = opt, by_cat, per_file
    return CorpusScore(optima, categories, raw_by_file)
