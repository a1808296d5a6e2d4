"""Offline pretraining: held-out rows stay held out, it learns, and run/replay resume from it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import torch

from streamlstm.cli import main
from streamlstm.config import load_settings
from streamlstm.events import EventBatch
from streamlstm.learning.pretrain import Plateau, normalised_sequences, pretrain
from streamlstm.offline.eventfiles import read_events


def _csv(path: Path, rows: int = 400) -> Path:
    rng = np.random.default_rng(0)
    lines = ["ts,sensor,a,b"]
    for t in range(rows):
        for key, scale in (("s1", 1.0), ("s2", 50.0)):
            a = scale * (np.sin(t / 6) + 0.1 * rng.normal())
            b = scale * (np.cos(t / 6) + 0.1 * rng.normal()) + 3
            lines.append(f"{t},{key},{a:.5f},{b:.5f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _settings(**extra: str):
    return load_settings(
        overrides={
            "model.input_size": "2",
            "model.hidden_size": "16",
            "model.num_layers": "1",
            "training.window": "24",
            "training.burn_in": "4",
            "training.batch_windows": "8",
            "training.learning_rate": "0.01",
            **extra,
        }
    )


def test_labels_of_held_out_rows_never_reach_training() -> None:
    keys = ["a", "b", "a", "a", "b", "a", "b", "a"]
    values = np.arange(16, dtype=np.float32).reshape(8, 2)
    batch = EventBatch.from_arrays(keys, np.arange(8.0), values)
    seq = normalised_sequences(batch, _settings(), validation_from=5)
    # Key a: rows 0, 2, 3, 5, 7. Its step at row 3 is labelled by row 5 (held out).
    a = seq.keys.index("a")
    trained = ~torch.isnan(seq.train_y[:, a]).all(1)
    scored = ~torch.isnan(seq.val_y[:, a]).all(1)
    assert trained[:5].tolist() == [True, True, False, False, False]
    assert scored[:5].tolist() == [False, False, True, True, False]  # rows 3->5 and 5->7
    b = seq.keys.index("b")  # rows 1, 4, 6: 1->4 trains, 4->6 is held out
    assert (~torch.isnan(seq.train_y[:, b]).all(1))[:3].tolist() == [True, False, False]
    assert (~torch.isnan(seq.val_y[:, b]).all(1))[:3].tolist() == [False, True, False]


def test_pretraining_beats_the_untrained_model_on_held_out_rows(tmp_path: Path) -> None:
    data = read_events(_csv(tmp_path / "d.csv"), key_column="sensor")
    result = pretrain(data.batch, _settings(), tmp_path / "ckpt", epochs=8, progress=False)
    assert result.checkpoint is not None and result.checkpoint.exists()
    best = min(result.validation_loss)
    assert best < 0.8 * result.initial_validation_loss, result.validation_loss
    assert math.isfinite(result.train_loss[-1])


def test_cli_pretrain_then_replay_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    path = _csv(tmp_path / "d.csv", rows=200)
    sets = ["--set", "model.hidden_size=16", "--set", "model.num_layers=1",
            "--set", "training.window=24", "--set", "training.burn_in=4"]  # fmt: skip
    code = main(
        ["pretrain", str(path), "--key-column", "sensor", "--checkpoint-dir", str(tmp_path / "c"),
         "--epochs", "2", "--validation-from", "300", "--plot", str(tmp_path / "loss.png"),
         "--no-progress", *sets]
    )  # fmt: skip
    assert code == 0
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "c" / "ckpt-00000001.pt").exists()
    out = tmp_path / "out.jsonl"
    code = main(
        ["replay", str(path), "--key-column", "sensor", "--checkpoint-dir", str(tmp_path / "c"),
         "--no-training", "--no-progress", "-o", str(out), *sets]
    )  # fmt: skip
    assert code == 0
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(records) == 400 and {r["model_version"] for r in records} == {1}


def test_pretrain_without_a_checkpoint_dir_is_a_usage_error(tmp_path: Path) -> None:
    assert main(["pretrain", str(_csv(tmp_path / "d.csv", rows=50)), "--no-progress"]) == 2


def _plateau_run(losses: list[float], **kwargs: int) -> tuple[int, list[float]]:
    """Feed losses until the plateau says stop; return (epochs fed, learning rate after each)."""
    plateau = Plateau(lr=1.0, lr_patience=3, factor=0.5, min_lr=0.01, **kwargs)
    rates = []
    for epoch, loss in enumerate(losses, start=1):
        plateau.update(loss)
        rates.append(plateau.lr)
        if plateau.stop:
            return epoch, rates
    return len(losses), rates


def test_pretraining_stops_only_after_the_lowered_rate_had_lr_patience_epochs() -> None:
    epochs, rates = _plateau_run([1.0] + [2.0] * 20)
    # best at epoch 1; backed off after 3 epochs without improvement, stopped after 3 more
    assert rates[:4] == [1.0, 1.0, 1.0, 0.5]
    assert epochs == 7


def test_an_improvement_at_the_lowered_rate_restarts_both_counts() -> None:
    losses = [1.0, 2.0, 2.0, 2.0, 2.0, 0.5] + [2.0] * 20
    epochs, rates = _plateau_run(losses)
    assert rates[5] == 0.5, "the rate stays where it was when it improved"
    assert epochs == 12  # the improvement at epoch 6, then 6 epochs without one


def test_an_explicit_patience_overrides_the_derived_one() -> None:
    epochs, _ = _plateau_run([1.0] + [2.0] * 20, patience=2)
    assert epochs == 3
