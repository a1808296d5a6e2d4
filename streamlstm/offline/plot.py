"""A picture of one key's backtest: values, prediction and anomaly score over time.

``streamlstm replay FILE --plot key.png`` collects the key's events while the replay runs
(:class:`KeyTrace` is an ``on_batch`` hook) and draws two panels: the first feature's
values with the prediction made for them, and the anomaly score with the alarm threshold;
alarms are marked on both, and labelled anomaly windows (NAB's ``combined_windows.json``
layout, ``--windows``) are shaded where known.

>>> import numpy as np
>>> trace = KeyTrace("a")
>>> trace.add(["a", "b", "a"], np.array([0.0, 1.0, 2.0]), np.array([[1.5], [5.0], [2.5]]),
...           np.array([np.nan, np.nan, 0.2]))
>>> trace.ts.tolist(), trace.predicted.ravel().tolist(), trace.scores.tolist()
([0.0, 2.0], [nan, 1.5], [nan, 0.2...])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class KeyTrace:
    """One key's outputs as they pass: time, the prediction made for each event, score."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._ts: list[np.ndarray] = []
        self._predictions: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []

    def add(
        self,
        keys: list[str],
        ts: np.ndarray,
        prediction: np.ndarray,
        score: np.ndarray,
    ) -> None:
        """Keep the rows of this key from one batch (in order)."""
        mine = np.fromiter((k == self.key for k in keys), bool, len(keys))
        if mine.any():
            self._ts.append(ts[mine])
            self._predictions.append(prediction[mine])
            self._scores.append(score[mine])

    @property
    def ts(self) -> np.ndarray:
        return np.concatenate(self._ts) if self._ts else np.zeros(0)

    @property
    def predicted(self) -> np.ndarray:
        """The prediction made *for* each event (at the key's previous event)."""
        made = np.concatenate(self._predictions) if self._predictions else np.zeros((0, 1))
        shifted = np.full_like(made, np.nan)
        shifted[1:] = made[:-1]
        return shifted

    @property
    def scores(self) -> np.ndarray:
        return np.concatenate(self._scores) if self._scores else np.zeros(0)


def plot_key(
    trace: KeyTrace,
    values: np.ndarray,
    path: str | Path,
    threshold: float,
    windows: list[tuple[float, float]] | None = None,
) -> int:
    """Draw ``trace`` with the key's ``values`` [N, F] as a PNG; return the alarms shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = trace.ts.astype("datetime64[s]") if len(trace.ts) else trace.ts
    scores = np.nan_to_num(trace.scores)
    alarms = scores >= threshold
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5.5), dpi=110, sharex=True)
    top.plot(ts, values[:, 0], lw=0.8, label="value")
    top.plot(ts, trace.predicted[:, 0], lw=0.8, alpha=0.8, label="prediction")
    top.scatter(ts[alarms], values[alarms, 0], color="red", s=18, zorder=3, label="alarm")
    bottom.plot(ts, scores, lw=0.8, color="black", label="anomaly score")
    bottom.axhline(threshold, color="red", ls=":", lw=1, label="engine.anomaly_threshold")
    for start, end in windows or []:
        for ax in (top, bottom):
            ax.axvspan(
                np.datetime64(int(start), "s"),
                np.datetime64(int(end), "s"),
                color="orange",
                alpha=0.2,
                lw=0,
            )
    top.set_title(f"key {trace.key!r}: {int(alarms.sum())} alarms")
    top.legend(loc="upper left", fontsize=8)
    bottom.set_ylim(0, 1)
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return int(alarms.sum())


def read_windows(path: Path, data_file: Path) -> list[tuple[float, float]]:
    """The windows of ``data_file`` in NAB's ``combined_windows.json`` (matched by file
    name), as epoch seconds."""
    import json

    table: dict[str, list[list[str]]] = json.loads(Path(path).read_text())
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected {{file name: [[start, end], ...]}}")
    spans = next((v for k, v in table.items() if Path(k).name == Path(data_file).name), [])

    def epoch(stamp: str) -> float:
        return float(np.datetime64(stamp.strip(), "s").astype(np.int64))

    return [(epoch(a), epoch(b)) for a, b in spans]
