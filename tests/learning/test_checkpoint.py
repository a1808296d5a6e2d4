"""Checkpoints: round trip, atomic writes, retention, refusal of corrupt or mismatched files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from streamlstm.cli import main
from streamlstm.config import load_settings
from streamlstm.engine import Engine
from streamlstm.learning.checkpoint import (
    CheckpointError,
    architecture,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from streamlstm.model import RecurrentModel


def _model(seed: int = 0, hidden: int = 8) -> RecurrentModel:
    model = RecurrentModel(3, hidden, 2, seed=seed)
    torch.nn.init.normal_(model.head.weight)
    return model


def test_round_trip_keeps_weights_version_config_and_metrics(tmp_path: Path) -> None:
    model = _model()
    path = save_checkpoint(
        tmp_path, model.state_dict(), model.describe(), 5, {"a": 1}, {"loss": 0.25}
    )
    ckpt = load_checkpoint(path, expect=model.describe())
    assert (ckpt.version, ckpt.config, ckpt.metrics) == (5, {"a": 1}, {"loss": 0.25})
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[name], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000005.pt"]  # no temp file left


def test_keeps_the_newest_n(tmp_path: Path) -> None:
    model = _model()
    for version in range(1, 6):
        save_checkpoint(tmp_path, model.state_dict(), model.describe(), version, keep=2)
    assert [v for v, _ in list_checkpoints(tmp_path)] == [5, 4]


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_checkpoint_is_refused(tmp_path: Path, damage: str) -> None:
    model = _model()
    path = save_checkpoint(tmp_path, model.state_dict(), model.describe(), 1)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        # Flip a byte inside the weights' storage (torch's zip does not check CRCs).
        data_start = data.find(b"data/0")
        data[data_start + 200] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a checkpoint at all")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_a_flipped_weight_fails_the_integrity_check(tmp_path: Path) -> None:
    # Rewrite a valid file with one weight changed but the old hash: only the hash catches it.
    model = _model()
    path = save_checkpoint(tmp_path, model.state_dict(), model.describe(), 1)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.bias"][0] += 1.0
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="integrity check failed"):
        load_checkpoint(path)


def test_architecture_mismatch_is_refused_with_the_difference(tmp_path: Path) -> None:
    model = _model(hidden=8)
    path = save_checkpoint(tmp_path, model.state_dict(), model.describe(), 1)
    with pytest.raises(CheckpointError, match=r"hidden_size=8 \(config: 16\)"):
        load_checkpoint(path, expect=_model(hidden=16).describe())


def test_code_in_a_checkpoint_is_never_run(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    path = tmp_path / "ckpt-00000001.pt"
    path.write_bytes(pickle.dumps({"format": 1, "boom": Boom()}, protocol=2))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_resume_skips_a_corrupt_newest_and_uses_the_next(tmp_path: Path) -> None:
    old, new = _model(seed=1), _model(seed=2)
    save_checkpoint(tmp_path, old.state_dict(), old.describe(), 1)
    newest = save_checkpoint(tmp_path, new.state_dict(), new.describe(), 2)
    newest.write_bytes(newest.read_bytes()[:100])
    ckpt = latest_checkpoint(tmp_path, old.describe())
    assert ckpt is not None and ckpt.version == 1


def test_engine_resumes_from_the_newest_valid_checkpoint(tmp_path: Path) -> None:
    settings = load_settings(
        overrides={
            "model.input_size": "3",
            "model.hidden_size": "8",
            "training.checkpoint_dir": str(tmp_path),
        }
    )
    assert Engine.from_settings(settings).model_version == 0  # empty directory: fresh
    model = _model()
    save_checkpoint(tmp_path, model.state_dict(), architecture(model, settings), 9)
    engine = Engine.from_settings(settings)
    assert engine.model_version == 9
    assert torch.equal(engine.model.head.weight, model.head.weight)


def test_replay_refuses_a_mismatched_checkpoint_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = RecurrentModel(2, 8, 2)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.describe(), 1)
    data = tmp_path / "d.csv"
    data.write_text("t,a,b\n1,1,2\n2,2,3\n")
    code = main(
        ["replay", str(data), "--checkpoint-dir", str(tmp_path / "ckpt"), "-o", "/dev/null"]
    )
    assert code == 2
    assert "architecture does not match" in capsys.readouterr().err


def test_a_checkpoint_trained_on_changes_is_not_served_on_levels(tmp_path: Path) -> None:
    overrides = {"model.input_size": "3", "model.hidden_size": "8", "model.inputs": "change"}
    settings = load_settings(overrides={**overrides, "training.checkpoint_dir": str(tmp_path)})
    engine = Engine.from_settings(settings)
    arch = architecture(engine.model, settings)
    save_checkpoint(tmp_path, engine.model.state_dict(), arch, 3)
    assert Engine.from_settings(settings).model_version == 3
    settings.model.inputs = "level"
    with pytest.raises(CheckpointError, match=r"inputs='change' \(config: 'level'\)"):
        Engine.from_settings(settings)
