"""`streamlstm bench engine` runs and reports every figure (speed itself is not asserted)."""

from __future__ import annotations

import json

import pytest

from streamlstm.cli import main
from streamlstm.devtools.bench_engine import NaiveLoop, bench_engine, reference_settings
from streamlstm.engine import Engine
from streamlstm.events import EventBatch


def test_naive_loop_computes_what_the_engine_computes() -> None:
    """The baseline must do the same work, or the ratio means nothing."""
    import numpy as np
    import torch

    settings = reference_settings(keys=10, batch=16, threads=1)
    # The naive loop keeps a float32 state: so does the engine here. (With its float16
    # default the two differ by the state's rounding, up to ~2e-4 for some head weights:
    # 3 of 40 draws failed the 1e-4 bound below, the same before and after issue 12's
    # third pass; with float32, at most 1e-6 over the same 40 draws.)
    settings.state.recurrent_dtype = "float32"
    engine = Engine.from_settings(settings)
    with torch.no_grad():
        engine.model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    keys = [f"k{i % 3}" for i in range(30)]
    values = rng.normal(size=(30, 8)).astype(np.float32)
    out = engine.process(EventBatch.from_arrays(keys, np.zeros(30), values))
    naive = NaiveLoop(engine.model, settings)
    naive.process(keys, values)
    for key in ("k0", "k1", "k2"):
        last = max(i for i, k in enumerate(keys) if k == key)
        naive_prediction = naive.states[key][5].numpy()
        np.testing.assert_allclose(naive_prediction, out.prediction[last], atol=1e-4)


def test_bench_engine_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "engine", "--keys", "2000", "--batch", "256", "--rounds", "1", "--json"]
    assert main(args) == 0
    figures = json.loads(capsys.readouterr().out)
    for name in ("events_per_s", "naive_events_per_s", "bytes_per_key", "bound_events_per_s"):
        assert figures[name] > 0
    assert figures["ratio"] == pytest.approx(
        figures["events_per_s"] / figures["naive_events_per_s"]
    )


def test_bench_engine_reports_state_size() -> None:
    result = bench_engine(keys=1000, batch=128, rounds=1)
    raw = 2 * 2 * 64 * 4  # h and c of 2x64 units, float32
    assert raw // 2 < result.bytes_per_key <= 1.3 * raw  # stored in float16, plus stats
