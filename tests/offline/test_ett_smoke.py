"""A slice of ETTh2 through benchmarks/ett.py's code path (the full run is a benchmark)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from streamlstm.cli import main

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "ett" / "ETTh2.csv"
pytestmark = pytest.mark.skipif(not DATA.exists(), reason="ETTh2.csv not present")


def test_pretrain_then_replay_with_inline_learning_on_a_slice(tmp_path: Path) -> None:
    sets = ["--set", "model.hidden_size=16", "--set", "training.interval_events=50",
            "--set", "training.steps_per_run=4", "--set", "training.batch_windows=8"]  # fmt: skip
    common = [str(DATA), "--ts-column", "date", "--no-progress", *sets]
    ckpt = tmp_path / "ckpt"
    assert main(["pretrain", *common, "--until-row", "480", "--validation-from", "360",
                 "--checkpoint-dir", str(ckpt), "--epochs", "2"]) == 0  # fmt: skip
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        assert main(["replay", *common, "--until-row", "600", "--checkpoint-dir", str(ckpt),
                     "-o", str(out)]) == 0  # fmt: skip
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]  # in-line learning: same file, config, seed -> same output
    records = [orjson.loads(line) for line in outputs[0].splitlines()]
    assert len(records) == 600 and len(records[0]["prediction"]) == 7
    assert records[0]["model_version"] == 1  # resumed from the pretrained checkpoint
    assert records[-1]["model_version"] >= 1
