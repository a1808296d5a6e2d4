"""`streamlstm replay`: CSV and JSONL give the same outputs; summary; key options."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import orjson
import pytest

from streamlstm.cli import main


def write_data(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    rows = []
    for t in range(60):
        for key in ("pump-1", "pump-2"):
            rows.append((key, 1_700_000_000 + 60.0 * t, np.sin(t / 5) + 0.1 * rng.normal(size=3)))
    csv_path = tmp_path / "pumps.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "sensor", "a", "b", "c"])
        for key, ts, v in rows:
            w.writerow([repr(ts), key, *map(repr, v.tolist())])
    jsonl_path = tmp_path / "pumps.jsonl"
    lines = (orjson.dumps({"key": k, "ts": ts, "values": v.tolist()}) for k, ts, v in rows)
    jsonl_path.write_bytes(b"".join(line + b"\n" for line in lines))
    return csv_path, jsonl_path


def read_lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_csv_and_jsonl_replays_give_the_same_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path, jsonl_path = write_data(tmp_path)
    common = ["--no-progress", "--set", "training.enabled=false", "--set", "model.seed=3"]
    csv_args = ["replay", str(csv_path), "--key-column", "sensor", "-o", str(tmp_path / "c")]
    assert main([*csv_args, *common]) == 0
    assert main(["replay", str(jsonl_path), "-o", str(tmp_path / "j"), *common]) == 0
    from_csv, from_jsonl = read_lines(tmp_path / "c"), read_lines(tmp_path / "j")
    assert len(from_csv) == len(from_jsonl) == 120
    assert from_csv == from_jsonl
    first = from_csv[0]
    assert set(first) >= {"key", "ts", "prediction", "error", "anomaly_score", "model_version"}
    assert first["error"] is None and first["anomaly_score"] is None
    assert len(first["prediction"]) == 3  # input_size taken from the file
    later = [r for r in from_csv if r["error"] is not None]
    assert len(later) == 118 and all(0 <= r["anomaly_score"] <= 1 for r in later)
    summary = capsys.readouterr().err
    assert "events: 120" in summary and "keys: 2" in summary
    assert "MAE" in summary and "MSE" in summary


def test_csv_constant_key_defaults_to_the_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "boiler.csv"
    path.write_text("time,t1,t2\n2024-01-01 00:00:00,1,2\n2024-01-01 01:00:00,1.5,2.5\nbad,1,2\n")
    out = tmp_path / "o.jsonl"
    assert main(["replay", str(path), "-o", str(out), "--no-progress"]) == 0
    lines = read_lines(out)
    assert [r["key"] for r in lines] == ["boiler", "boiler"]
    assert lines[1]["ts"] == 1704070800.0
    assert lines[1]["error"] == pytest.approx(0.5, abs=1e-4)  # persistence: |1.5-1|, |2.5-2|


def test_rejected_lines_are_counted_in_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text(
        '{"key": "a", "ts": 1, "values": [1, 2]}\n'
        "not json\n"
        '{"key": "a", "ts": 2, "values": [1]}\n'
        '{"key": "a", "ts": 3, "values": [2, 3]}\n'
    )
    assert main(["replay", str(path), "-o", str(tmp_path / "o"), "--no-progress"]) == 0
    assert len(read_lines(tmp_path / "o")) == 2
    assert "not_json=1" in capsys.readouterr().err


def test_width_mismatch_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path, _ = write_data(tmp_path)
    code = main(["replay", str(csv_path), "--key-column", "sensor", "--set", "model.input_size=5"])
    assert code == 2
    assert "3 feature columns but model.input_size is 5" in capsys.readouterr().err
