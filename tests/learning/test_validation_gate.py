"""The validation gate, both ways, and the learning-rate back-off at exactly its count.

The candidate is built by hand rather than trained, so the verdict does not depend on
training luck: the task is a constant correction of +0.5 on every feature. The serving
model (zero head: pure persistence) scores 0.25 on it; a candidate whose head bias is
+0.5 scores 0 (better); one whose bias is +3.0 scores 6.25 (worse).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamlstm.config import Settings, load_settings
from streamlstm.learning.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from streamlstm.learning.gate import FineTuner
from streamlstm.learning.windows import Windows
from streamlstm.model import RecurrentModel

WIDTH, HIDDEN = 2, 4
TARGET = 0.5  # the correction every row asks for


def _settings(tmp_path: Path | None = None, **overrides: str) -> Settings:
    base = {
        "model.input_size": str(WIDTH),
        "model.hidden_size": str(HIDDEN),
        "model.num_layers": "1",
        "training.device": "cpu",
        "training.window": "6",
        "training.burn_in": "2",
        "training.tbptt_steps": "4",
        "training.batch_windows": "4",
        "training.steps_per_run": "1",
        "training.validation_windows": "8",
    }
    if tmp_path is not None:
        base["training.checkpoint_dir"] = str(tmp_path / "ckpt")
    return load_settings(overrides={**base, **overrides})


def _windows(n: int, seed: int) -> Windows:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, n, WIDTH, generator=gen)
    y = torch.full((6, n, WIDTH), TARGET)
    return Windows(x, y, torch.zeros(n, 1, 2, HIDDEN), torch.arange(n))


class _Reader:
    """Stands in for the replay reader: fixed windows; records the cut of every sample.

    Each call reports ``rows`` rows written so far (100, 200, ...), as a ring would.
    """

    def __init__(self) -> None:
        self.cuts: list[int] = []
        self.rows = 0

    def sample(
        self, n_train: int, n_val: int, generator: torch.Generator, cut: int = -1
    ) -> tuple[Windows, Windows, int]:
        self.cuts.append(cut)
        self.rows += 100
        return _windows(n_train, seed=self.rows), _windows(n_val, seed=self.rows + 1), self.rows


def _tuner(settings: Settings) -> FineTuner:
    model = RecurrentModel.from_settings(settings.model)
    return FineTuner(model, settings)


def _candidate(tuner: FineTuner, bias: float) -> None:
    """Make the pending candidate the serving weights with head bias ``bias``."""
    weights = {k: v.clone() for k, v in tuner.serving.state_dict().items()}
    weights["head.bias"] = torch.full_like(weights["head.bias"], bias)
    tuner.trainee.load_state_dict(weights)
    tuner.candidate_ready = True


def _serving(tuner: FineTuner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tuner.serving.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_worse_candidate_is_rejected_and_nothing_changes(tmp_path: Path) -> None:
    tuner = _tuner(_settings(tmp_path))
    before = _serving(tuner)
    _candidate(tuner, bias=3.0)  # worse than persistence on this task
    outcome = tuner.run(_Reader())
    assert outcome.result == "rejected"
    assert outcome.validation_loss > outcome.serving_loss
    assert _same(_serving(tuner), before), "a rejected candidate changed the serving weights"
    assert tuner.version == outcome.version == 0
    assert outcome.weights is None
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_a_better_candidate_is_adopted_checkpointed_and_versioned(tmp_path: Path) -> None:
    tuner = _tuner(_settings(tmp_path))
    before = _serving(tuner)
    _candidate(tuner, bias=TARGET)  # exactly the correction asked for
    outcome = tuner.run(_Reader())
    assert outcome.result == "adopted"
    assert outcome.validation_loss < 1e-6 < outcome.serving_loss
    served = _serving(tuner)
    assert not _same(served, before)
    assert torch.allclose(served["head.bias"], torch.full((WIDTH,), TARGET))
    assert tuner.version == outcome.version == 1
    assert outcome.weights is not None and _same(outcome.state_dict(), served)
    assert [v for v, _ in list_checkpoints(tmp_path / "ckpt")] == [1]
    saved = load_checkpoint(checkpoint_path(tmp_path / "ckpt", 1))
    assert saved.version == 1 and _same(saved.state_dict, served)


def test_the_gate_validates_on_rows_newer_than_the_candidates_training_data() -> None:
    tuner = _tuner(_settings())
    reader = _Reader()
    first = tuner.run(reader)  # no candidate yet: trains one on rows up to 100
    assert first.result == "trained"
    tuner.run(reader)  # judges it on rows past 100 only, then trains on rows up to 200
    tuner.run(reader)
    assert reader.cuts == [-1, 100, 200], (
        "the gate must score each candidate only on rows written after it was trained"
    )


@pytest.mark.parametrize("patience", [1, 3])
def test_the_learning_rate_backs_off_after_exactly_lr_patience_rejections(patience: int) -> None:
    settings = _settings(
        **{
            "training.learning_rate": "0.01",
            "training.lr_patience": str(patience),
            "training.lr_factor": "0.5",
            "training.min_learning_rate": "0.004",
        }
    )
    tuner = _tuner(settings)
    reader = _Reader()

    def reject() -> None:
        _candidate(tuner, bias=3.0)
        assert tuner.run(reader).result == "rejected"

    for _ in range(patience - 1):
        reject()
        assert tuner.learning_rate == 0.01, "backed off before lr_patience rejections"
    reject()
    assert tuner.learning_rate == pytest.approx(0.005), "no back-off at lr_patience rejections"
    for _ in range(patience - 1):
        reject()
        assert tuner.learning_rate == pytest.approx(0.005)  # the count started again
    reject()
    assert tuner.learning_rate == pytest.approx(0.004)  # 0.0025 would be below the floor
    for _ in range(patience):
        reject()
    assert tuner.learning_rate == pytest.approx(0.004)


def test_an_adoption_resets_the_rejection_count() -> None:
    tuner = _tuner(_settings(**{"training.lr_patience": "2", "training.learning_rate": "0.01"}))
    reader = _Reader()
    _candidate(tuner, bias=3.0)
    assert tuner.run(reader).result == "rejected"
    _candidate(tuner, bias=TARGET)
    assert tuner.run(reader).result == "adopted"
    _candidate(tuner, bias=3.0)
    assert tuner.run(reader).result == "rejected"
    assert tuner.learning_rate == 0.01  # one rejection since the adoption, not two
