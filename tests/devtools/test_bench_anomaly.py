"""`bench_anomaly` on a tiny synthetic corpus in NAB's layout: structure, and a planted
spike that the engine's anomaly score finds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from streamlstm.config import load_settings
from streamlstm.devtools import nab
from streamlstm.devtools.bench_anomaly import AnomalyReport, bench_anomaly

ROWS, SPIKE = 300, 200


def write_corpus(root: Path) -> Path:
    """Two files of one category; ``spiky.csv`` has one spike, inside its one window."""
    rng = np.random.default_rng(0)
    start = np.datetime64("2024-01-01T00:00:00")
    times = [str(start + np.timedelta64(5 * i, "m")).replace("T", " ") for i in range(ROWS)]
    (root / "data" / "synth").mkdir(parents=True)
    (root / "labels").mkdir()
    for name, spike in (("calm", False), ("spiky", True)):
        values = 10 + np.sin(np.arange(ROWS) * 2 * np.pi / 48) + 0.05 * rng.normal(size=ROWS)
        if spike:
            values[SPIKE] += 8.0
        lines = ["timestamp,value", *(f"{t},{v:.5f}" for t, v in zip(times, values, strict=True))]
        (root / "data" / "synth" / f"{name}.csv").write_text("\n".join(lines) + "\n")
    windows = {
        "synth/calm.csv": [],
        "synth/spiky.csv": [[times[SPIKE - 5] + ".000000", times[SPIKE + 14] + ".000000"]],
    }
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("nab"))


def test_corpus_loads_in_nab_layout(corpus: Path) -> None:
    files = nab.load_corpus(corpus)
    assert [f.name for f in files] == ["synth/calm.csv", "synth/spiky.csv"]
    assert files[1].windows == [(SPIKE - 5, SPIKE + 14)]


@pytest.mark.parametrize("one_stream", [False, True])
def test_bench_anomaly_report(corpus: Path, one_stream: bool) -> None:
    report = bench_anomaly(corpus, load_settings(), one_stream=one_stream, progress=False)
    assert isinstance(report, AnomalyReport)
    assert report.rows == 2 * ROWS and report.windows == 1 and len(report.files) == 2
    # merged or not, each file's rows come back to it, in its order
    assert [f.rows for f in report.files] == [ROWS, ROWS]
    assert all(f.persistence_mse > 0 for f in report.files)
    assert set(report.score.optima) == set(nab.PROFILES)
    # the spike is the most anomalous row: it is found at the window's 6th row
    standard = report.score.optima["standard"]
    assert standard.normalised is not None and standard.normalised > 0
    assert standard.threshold <= 1.0

    doc = json.loads(json.dumps(report.as_dict()))  # JSON-ready: no NaN, no inf
    assert doc["one_stream"] is one_stream and doc["files"] == 2
    assert set(doc["profiles"]) == set(nab.PROFILES)
    for profile in doc["profiles"].values():
        assert set(profile) == {"threshold", "raw", "score", "categories"}
        assert set(profile["categories"]) == {"synth"}
    forecast = doc["forecast"]
    assert set(forecast["files"]) == {"synth/calm.csv", "synth/spiky.csv"}
    assert forecast["worst_file"] in forecast["files"]
    assert math.isfinite(forecast["median_mse_ratio"])

    text = report.format()
    for needle in ("standard", "low-FP", "low-FN", "synth", "synth/spiky.csv", "median"):
        assert needle in text


@pytest.mark.slow
def test_workers_give_the_same_results(corpus: Path) -> None:
    """Files share nothing, so replaying them in processes changes no figure."""
    serial = bench_anomaly(corpus, load_settings(), progress=False).as_dict()
    parallel = bench_anomaly(corpus, load_settings(), progress=False, workers=2).as_dict()
    for doc in (serial, parallel):
        doc.pop("seconds")
        for f in doc["forecast"]["files"].values():
            f.pop("seconds")
    assert serial == parallel
