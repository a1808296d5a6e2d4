"""Checkpoints: round trip, atomic writes, retention, refusal of corrupt or mismatched files;
the same checks on checkpoint bytes (a model-topic record's value)."""

from __future__ import annotations

import io
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
    decode_checkpoint,
    encode_checkpoint,
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


def test_a_failed_checkpoint_write_keeps_trainer_and_engine_on_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule: adopted weights are served by both (trainer and engine) even when their
    checkpoint cannot be written; the failure is counted, the next adoption checkpoints."""
    import itertools

    import streamlstm.learning.gate as gate
    from streamlstm.devtools.synthetic import SyntheticStream
    from streamlstm.events import EventBatch
    from streamlstm.learning.inline import InlineTrainer
    from streamlstm.metrics import Metrics

    losses = itertools.cycle([0.5, 1.0])  # the gate scores the candidate, then the serving
    monkeypatch.setattr(gate, "evaluate", lambda *args: next(losses))
    real_save = gate.save_checkpoint

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gate, "save_checkpoint", disk_full)
    settings = load_settings(
        overrides={
            "model.input_size": "2",
            "model.hidden_size": "8",
            "model.num_layers": "1",
            "training.interval_events": "200",
            "training.steps_per_run": "2",
            "training.batch_windows": "4",
            "training.window": "8",
            "training.burn_in": "2",
            "training.replay_bytes": str(2**20),
            "training.checkpoint_dir": str(tmp_path),
            "drift.enabled": "false",
        }
    )
    engine = Engine.from_settings(settings)
    metrics = Metrics()
    trainer = InlineTrainer(engine, settings, metrics, write_checkpoints=True)
    stream = SyntheticStream(n_keys=4, width=2, seed=3, start_ts=0.0, anomaly_rate=0.0)

    def step() -> None:
        a = stream.arrays(100)
        names = [stream.key_names[k] for k in a.key_index]
        trainer.on_batch(engine.process(EventBatch.from_arrays(names, a.ts, a.values)))

    for _ in range(40):
        step()
        if trainer.tuner.version >= 1:
            break
    adopted = trainer.outcomes[-1]
    assert adopted.result == "adopted" and adopted.version == 1
    assert adopted.checkpoint_error is not None and "No space left" in adopted.checkpoint_error
    assert list_checkpoints(tmp_path) == []
    sample = metrics.registry.get_sample_value
    assert sample("streamlstm_checkpoint_failures_total") == 1
    assert sample("streamlstm_finetune_runs_total", {"result": "adopted"}) == 1
    engine.process(EventBatch.from_arrays(["x"], [1e6], [[0.0, 0.0]]))  # the swap
    assert engine.model_version == trainer.tuner.version == 1
    for name, tensor in trainer.tuner.serving.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor.cpu()), name

    monkeypatch.setattr(gate, "save_checkpoint", real_save)  # the disk has room again
    for _ in range(40):
        step()
        if trainer.tuner.version >= 2:
            break
    assert trainer.outcomes[-1].checkpoint_error is None
    assert [v for v, _ in list_checkpoints(tmp_path)] == [2]
    assert Engine.from_settings(settings).model_version == 2


def test_temp_files_of_dead_writers_are_removed_on_start(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    from streamlstm.learning.checkpoint import remove_stale_temp_files

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    dead, me = done.pid, os.getpid()
    model = _model()
    save_checkpoint(tmp_path, model.state_dict(), model.describe(), 1)
    now = time.time()
    ages = {
        f".ckpt-{dead}-killed.tmp": 120,  # writer gone: removed
        f".ckpt-{dead}-fresh.tmp": 10,  # writer gone, but just now (another namespace?)
        f".ckpt-{me}-writing.tmp": 120,  # a live writer: kept
        f".ckpt-{me}-ancient.tmp": 700,  # far too old for any write: removed
        ".ckpt-oldstyle.tmp": 700,  # an older release's name, no pid: removed by age
        ".ckpt-oldstyle2.tmp": 100,
        "notes.tmp": 700,  # not ours
    }
    for name, age in ages.items():
        path = tmp_path / name
        path.write_bytes(b"partial")
        os.utime(path, (now - age, now - age))
    ckpt = latest_checkpoint(tmp_path, expect=model.describe())  # what the engine does at start
    assert ckpt is not None and ckpt.version == 1
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(
        [
            "ckpt-00000001.pt",
            f".ckpt-{dead}-fresh.tmp",
            f".ckpt-{me}-writing.tmp",
            ".ckpt-oldstyle2.tmp",
            "notes.tmp",
        ]
    )
    assert remove_stale_temp_files(tmp_path, now=now + 3600)  # all of ours, in time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000001.pt", "notes.tmp"]
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_record_round_trip_keeps_weights_version_and_metrics() -> None:
    model = _model()
    data = encode_checkpoint(model.state_dict(), model.describe(), 12, {"a": 1}, {"loss": 0.5})
    ckpt = decode_checkpoint(data, expect=model.describe())
    assert (ckpt.version, ckpt.config, ckpt.metrics, ckpt.path) == (
        12,
        {"a": 1},
        {"loss": 0.5},
        None,
    )
    for name, tensor in model.state_dict().items():
        assert torch.equal(ckpt.state_dict[name], tensor)


def test_a_file_and_a_record_are_the_same_bytes_with_the_same_checks(tmp_path: Path) -> None:
    model = _model()
    path = save_checkpoint(tmp_path, model.state_dict(), model.describe(), 3)
    ckpt = decode_checkpoint(path.read_bytes(), expect=model.describe())
    assert ckpt.version == 3 and load_checkpoint(path).path == path


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty"])
def test_a_corrupted_record_is_refused(damage: str) -> None:
    model = _model()
    data = bytearray(encode_checkpoint(model.state_dict(), model.describe(), 1))
    if damage == "flip":  # inside the weights' storage (torch's zip does not check CRCs)
        data[data.find(b"data/0") + 200] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"not a checkpoint at all")
    else:
        data = bytearray()
    with pytest.raises(CheckpointError, match="model record"):
        decode_checkpoint(bytes(data), model.describe(), where="model record")


def test_a_changed_weight_under_the_old_digest_fails_the_integrity_check() -> None:
    model = _model()
    payload = torch.load(
        io.BytesIO(encode_checkpoint(model.state_dict(), model.describe(), 1)), weights_only=True
    )
    payload["state_dict"]["head.bias"][0] += 1.0
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with pytest.raises(CheckpointError, match="integrity check failed"):
        decode_checkpoint(buffer.getvalue(), model.describe())


def test_a_record_of_another_architecture_is_refused_with_the_difference() -> None:
    small, big = _model(hidden=8), _model(hidden=16)
    data = encode_checkpoint(small.state_dict(), small.describe(), 1)
    with pytest.raises(CheckpointError, match=r"hidden_size=8 \(config: 16\).*other settings"):
        decode_checkpoint(data, big.describe(), hint="other settings")
