"""The NAB scorer: hand-computed cases, the vectorised sweep against a brute force, and
NAB's published figures for two of its detectors on the nab-dev corpus."""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import numpy as np
import pytest

from streamlstm.devtools import nab
from streamlstm.devtools.nab import PROFILES, NabFile, score_corpus, score_file

STANDARD, LOW_FP, LOW_FN = (PROFILES[p] for p in PROFILES)
NAB_DEV = Path(__file__).resolve().parents[3] / "shared" / "data" / "nab-dev"


def sigma(x: float) -> float:
    return -1.0 if x >= 3 else 2 / (1 + math.exp(5 * x)) - 1


def make(n: int = 100, windows: list[tuple[int, int]] | None = None) -> NabFile:
    times = np.datetime64("2024-01-01T00:00") + np.arange(n).astype("timedelta64[m]")
    return NabFile("cat/f.csv", "cat", times, [(40, 49)] if windows is None else windows)


def spikes(n: int, *rows: int) -> np.ndarray:
    s = np.zeros(n)
    s[list(rows)] = 1.0
    return s


def test_doctests() -> None:
    assert doctest.testmod(nab).failed == 0


def test_probation_length() -> None:
    assert nab.probation_length(100) == 15
    assert nab.probation_length(4032) == 604
    assert nab.probation_length(22_695) == 750


def test_detection_at_window_start_is_one_tp() -> None:
    assert score_file(make(), spikes(100, 40), STANDARD, 0.5) == pytest.approx(1.0)


def test_later_detection_in_window_is_worth_less() -> None:
    # row 47 of window 40..49 (w = 10): p = -(49 - 47 + 1) / 10
    expected = sigma(-0.3) / sigma(-1.0)
    assert score_file(make(), spikes(100, 47), STANDARD, 0.5) == pytest.approx(expected)
    assert 0 < expected < 1


def test_only_the_earliest_detection_in_a_window_counts() -> None:
    f = make()
    assert score_file(f, spikes(100, 42, 45, 49), STANDARD, 0.5) == pytest.approx(
        score_file(f, spikes(100, 42), STANDARD, 0.5)
    )


def test_missed_window_costs_fn_weight() -> None:
    f = make(windows=[(40, 49), (70, 79)])
    zero = np.zeros(100)
    assert score_file(f, zero, STANDARD, 0.5) == pytest.approx(-2.0)
    assert score_file(f, zero, LOW_FN, 0.5) == pytest.approx(-4.0)
    assert score_file(f, spikes(100, 40), LOW_FN, 0.5) == pytest.approx(1.0 - 2.0)


def test_false_positive_right_after_window_vs_far_vs_before_any() -> None:
    f = make()
    base = 1.0  # the window itself is detected at its start
    # right after the end (row 50): q = 1 / 9, close to 0 -> almost no penalty
    near = score_file(f, spikes(100, 40, 50), STANDARD, 0.5) - base
    assert near == pytest.approx(0.11 * sigma(1 / 9))
    assert -0.11 < near < 0
    # far away (row 90: q = 41 / 9 > 3) -> full penalty
    far = score_file(f, spikes(100, 40, 90), STANDARD, 0.5) - base
    assert far == pytest.approx(-0.11)
    # before any window (row 20, past probation) -> full penalty; low-FP doubles it
    before = score_file(f, spikes(100, 40, 20), LOW_FP, 0.5) - base
    assert before == pytest.approx(-0.22)


def test_probation_rows_are_ignored() -> None:
    f = make()  # probation: rows 0..14
    assert score_file(f, spikes(100, 3, 14), STANDARD, 0.5) == pytest.approx(-1.0)
    assert score_file(f, spikes(100, 15), STANDARD, 0.5) == pytest.approx(-1.11)


def test_window_inside_probation_is_not_scored_but_fp_is_measured_from_it() -> None:
    f = make(windows=[(2, 11), (40, 49)])
    assert score_file(f, np.zeros(100), STANDARD, 0.5) == pytest.approx(-1.0)
    # a FP at row 16 (probation: 0..14) is 5 rows past the first window's end (w = 10)
    assert score_file(f, spikes(100, 16), STANDARD, 0.5) == pytest.approx(-1 + 0.11 * sigma(5 / 9))


def test_nan_scores_count_as_zero() -> None:
    s = spikes(100, 40)
    s[50:60] = np.nan
    assert score_file(make(), s, STANDARD, 0.5) == pytest.approx(1.0)


def test_sweep_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    files = [make(300, [(60, 89), (200, 219)]), make(200, []), make(250, [(100, 139)])]
    scores = [np.round(rng.random(len(f)), 2) for f in files]  # ties on purpose
    for profile in PROFILES.values():
        thresholds, raws = nab.sweep(files, scores, profile)
        assert np.isinf(thresholds[0]) and np.all(np.diff(thresholds[1:]) < 0)
        for t, raw in zip(thresholds, raws, strict=True):
            brute = sum(score_file(f, s, profile, t) for f, s in zip(files, scores, strict=True))
            assert raw == pytest.approx(brute, abs=1e-9)
        opt = nab.optimise(files, scores, profile)
        assert opt.raw == pytest.approx(raws.max())


def test_never_firing_scores_zero_and_perfect_scores_100() -> None:
    f = make(windows=[(40, 49), (70, 79)])
    result = score_corpus([f], [np.zeros(100)])
    assert all(o.normalised == pytest.approx(0.0) for o in result.optima.values())
    result = score_corpus([f], [spikes(100, 40, 70)])
    assert all(o.normalised == pytest.approx(100.0) for o in result.optima.values())
    assert result.categories["standard"]["cat"] == pytest.approx(100.0)


@pytest.mark.skipif(not NAB_DEV.is_dir(), reason=f"NAB dev corpus not found at {NAB_DEV}")
@pytest.mark.parametrize(
    ("detector", "expected"),
    [("numenta", (71.21, 64.99, 75.87)), ("windowedGaussian", (36.71, 21.40, 45.17))],
)
def test_reproduces_nab_reference_figures(detector: str, expected: tuple[float, ...]) -> None:
    files = nab.load_corpus(NAB_DEV, with_values=False)
    assert len(files) == 31 and sum(len(f.windows) for f in files) == 57
    scores = nab.load_detector_scores(NAB_DEV / "reference-results" / detector, files)
    result = score_corpus(files, scores)
    got = tuple(result.optima[p].normalised for p in PROFILES)
    assert got == pytest.approx(expected, abs=0.5), got
    assert got == pytest.approx(expected, abs=0.006), got  # in fact to the published digits
