"""Checkpoint bytes (a model-topic record's value): the same checks as a checkpoint file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from streamlstm.learning.checkpoint import (
    CheckpointError,
    decode_checkpoint,
    encode_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from streamlstm.model import RecurrentModel


def _model(seed: int = 0, hidden: int = 8) -> RecurrentModel:
    model = RecurrentModel(3, hidden, 2, seed=seed)
    torch.nn.init.normal_(model.head.weight)
    return model


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
