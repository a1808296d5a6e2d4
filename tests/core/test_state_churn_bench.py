"""`streamlstm bench engine --churn` runs and reports its figures (speed is not asserted)."""

from __future__ import annotations

import json

import pytest

from streamlstm.cli import main


def test_bench_engine_churn_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "engine", "--churn", "--keys", "2000", "--batch", "128", "--rounds", "1"]
    assert main([*args, "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["keys"] == 2000
    assert figures["events_per_s"] > 0 and figures["churn_events_per_s"] > 0
    assert figures["ratio"] == pytest.approx(
        figures["churn_events_per_s"] / figures["events_per_s"]
    )
    # the first new key found the table full and freed its headroom (2% of 2,000 + 1) at once;
    # the round's ten new keys then fit without another eviction
    assert figures["evicted_at_once"] == 41
    assert figures["new_keys"] == 10 and figures["evictions"] == 0
