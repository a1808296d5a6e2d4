"""The validation gate, both ways, and the learning-rate back-off at exactly its count.

The candidate is built by hand rather than trained, so the verdict does not depend on
training luck: the task is a constant correction of +0.5 on every feature. The serving
model (zero head: pure persistence) scores 0.25 on it; a candidate whose head bias is
+0.5 scores 0 (better); one whose bias is +3.0 scores 6.25 (worse).
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from streamlstm.config import Settings, load_settings
from streamlstm.learning import gate
from streamlstm.learning.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from streamlstm.learning.gate import (
    FineTuner,
    RunOutcome,
    record_run_metrics,
    weights_from_bytes,
    weights_to_bytes,
)
from streamlstm.learning.windows import Windows
from streamlstm.metrics import Metrics
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


def _windows(n: int, seed: int, length: int = 6) -> Windows:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(length, n, WIDTH, generator=gen)
    y = torch.full((length, n, WIDTH), TARGET)
    return Windows(x, y, torch.zeros(n, 1, 2, HIDDEN), torch.arange(n))


class _Reader:
    """Stands in for the replay reader: fixed windows; records the cut of every sample.

    Each call reports ``rows`` rows written so far (100, 200, ...), as a ring would.
    """

    def __init__(self, length: int = 6) -> None:
        self.cuts: list[int] = []
        self.sizes: list[tuple[int, int]] = []  # (n_train, n_val) asked for
        self.seeds: list[int] = []  # the generator's seed of each sample
        self.rows = 0
        self.length = length

    def sample(
        self, n_train: int, n_val: int, generator: torch.Generator, cut: int = -1
    ) -> tuple[Windows, Windows, int]:
        self.cuts.append(cut)
        self.sizes.append((n_train, n_val))
        self.seeds.append(generator.initial_seed())
        self.rows += 100
        train = _windows(n_train, seed=self.rows, length=self.length)
        return train, _windows(n_val, seed=self.rows + 1, length=self.length), self.rows


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


def test_a_candidate_no_better_than_the_serving_weights_is_rejected() -> None:
    tuner = _tuner(_settings())
    _candidate(tuner, bias=0.0)  # the serving weights themselves: equal loss
    outcome = tuner.run(_Reader())
    assert outcome.validation_loss == outcome.serving_loss
    assert outcome.result == "rejected" and tuner.version == 0


def test_a_candidate_with_a_non_finite_loss_is_rejected() -> None:
    tuner = _tuner(_settings())
    _candidate(tuner, bias=float("nan"))
    outcome = tuner.run(_Reader())
    assert outcome.result == "rejected" and tuner.version == 0
    assert all(torch.isfinite(v).all() for v in tuner.serving.state_dict().values())


def test_adoption_is_not_checkpointed_when_the_trainer_is_told_not_to(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    tuner = FineTuner(
        RecurrentModel.from_settings(settings.model), settings, write_checkpoints=False
    )
    _candidate(tuner, bias=TARGET)
    assert tuner.run(_Reader()).result == "adopted"
    assert not (tmp_path / "ckpt").exists() or list_checkpoints(tmp_path / "ckpt") == []


def test_checkpoints_keep_the_configured_number_and_record_the_losses(tmp_path: Path) -> None:
    tuner = _tuner(_settings(tmp_path, **{"training.keep_checkpoints": "2"}))
    reader = _Reader()
    for bias in (0.2, 0.35, TARGET):  # each closer to the correction than the last
        _candidate(tuner, bias=bias)
        outcome = tuner.run(reader)
        assert outcome.result == "adopted" and outcome.checkpoint_error is None
    assert sorted(v for v, _ in list_checkpoints(tmp_path / "ckpt")) == [2, 3]
    saved = load_checkpoint(checkpoint_path(tmp_path / "ckpt", 3))
    assert saved.metrics["validation_loss"] == pytest.approx(outcome.validation_loss)
    assert saved.config["training"]["keep_checkpoints"] == 2
    assert saved.config["training"]["checkpoint_dir"] == str(tmp_path / "ckpt")  # JSON, not Path


def test_a_failed_checkpoint_write_keeps_the_adoption(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "ckpt"
    blocker.write_text("a file where the directory should be")
    tuner = _tuner(_settings(tmp_path))
    _candidate(tuner, bias=TARGET)
    outcome = tuner.run(_Reader())
    assert outcome.result == "adopted" and tuner.version == outcome.version == 1
    assert outcome.checkpoint_error is not None and outcome.weights is not None
    assert outcome.checkpoint_error.split(":")[0].endswith("Error")  # the exception's type
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"adopted weights v1 are served but could not be checkpointed in {blocker}" in logged
    assert outcome.checkpoint_error in logged


# -- the training half of a run, with the TBPTT step scripted ---------------------------


class _ScriptedSteps:
    """Stands in for ``tbptt_update``: returns the next scripted chunk losses per batch
    and records the batch size and the learning rate each batch trained with."""

    def __init__(self, losses: list[list[float]]) -> None:
        self.losses = list(losses)
        self.batches: list[int] = []
        self.rates: list[float] = []
        self.decays: list[float] = []

    def __call__(self, model, optimizer, batch, burn_in, tbptt, clip, clip_norm):
        self.batches.append(len(batch))
        self.rates.append(optimizer.param_groups[0]["lr"])
        self.decays.append(optimizer.param_groups[0]["weight_decay"])
        return self.losses.pop(0) if self.losses else [1.0] * 3


# window 11, burn-in 2, chunks of 3 steps: 3 chunks (3 + 3 + 3) per window
CHUNKED = {"training.window": "11", "training.burn_in": "2", "training.tbptt_steps": "3"}


def _chunked(monkeypatch: pytest.MonkeyPatch, steps: _ScriptedSteps, **overrides: str) -> FineTuner:
    monkeypatch.setattr(gate, "tbptt_update", steps)
    return _tuner(_settings(**{**CHUNKED, **overrides}))


def test_a_run_samples_batches_for_its_steps_and_the_configured_validation_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = _ScriptedSteps([[9.0, 8.0, 7.0], [6.0, 5.0, 4.0], [3.0, 2.0, 1.0]])
    tuner = _chunked(monkeypatch, steps, **{"training.steps_per_run": "7"})
    reader = _Reader(length=11)
    outcome = tuner.run(reader)
    # 7 steps at 3 chunks a batch: 3 batches of 4 windows, and the 8 validation windows
    assert reader.sizes == [(12, 8)]
    assert outcome.windows == 20
    assert steps.batches == [4, 4, 4]
    assert outcome.steps == 9
    assert outcome.train_loss == pytest.approx(2.0)  # the last batch's chunks
    assert outcome.result == "trained" and tuner.candidate_ready


def test_a_run_stops_early_after_early_stop_patience_steps_without_improvement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = _ScriptedSteps([])  # always [1, 1, 1]: never better than the first batch
    tuner = _chunked(
        monkeypatch,
        steps,
        **{"training.steps_per_run": "300", "training.early_stop_patience": "4"},
    )
    outcome = tuner.run(_Reader(length=11))
    # patience 4 steps = 2 batches of 3 chunks (rounded up) after the first one
    assert len(steps.batches) == 3 and outcome.steps == 9


def test_a_run_with_an_improving_loss_trains_all_its_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    losses = [[100.0 / (b + 1)] * 3 for b in range(10)]
    steps = _ScriptedSteps(losses)
    tuner = _chunked(
        monkeypatch,
        steps,
        **{"training.steps_per_run": "30", "training.early_stop_patience": "1"},
    )
    assert tuner.run(_Reader(length=11)).steps == 30


def test_a_non_finite_training_loss_fails_the_run_and_discards_the_candidate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = _ScriptedSteps([[1.0, float("nan"), 1.0]])
    tuner = _chunked(monkeypatch, steps)
    with torch.no_grad():
        for p in tuner.trainee.parameters():
            p.add_(1.0)  # what a diverging step would have left behind
    outcome = tuner.run(_Reader(length=11))
    assert outcome.result == "failed"
    assert "FloatingPointError" in (outcome.error or "") and "not finite" in (outcome.error or "")
    assert outcome.version == tuner.version == 0 and 0 <= outcome.seconds < 60
    assert _same({k: v.clone() for k, v in tuner.trainee.state_dict().items()}, _serving(tuner))
    assert outcome.learning_rate == tuner.learning_rate


def test_a_cancelled_run_stops_before_its_next_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _ScriptedSteps([])
    monkeypatch.setattr(gate, "tbptt_update", steps)
    settings = _settings(**CHUNKED)
    model = RecurrentModel.from_settings(settings.model)
    tuner = FineTuner(model, settings, cancel=SimpleNamespace(is_set=lambda: True))
    outcome = tuner.run(_Reader(length=11))
    assert steps.batches == [] and outcome.steps == 0


def test_training_uses_the_backed_off_learning_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _ScriptedSteps([])
    tuner = _chunked(
        monkeypatch,
        steps,
        **{
            "training.learning_rate": "0.01",
            "training.lr_patience": "1",
            "training.lr_factor": "0.5",
            "training.early_stop_patience": "1",
        },
    )
    reader = _Reader(length=11)
    tuner.run(reader)
    _candidate(tuner, bias=3.0)
    outcome = tuner.run(reader)
    assert outcome.result == "rejected" and outcome.learning_rate == pytest.approx(0.005)
    assert steps.rates[0] == pytest.approx(0.01) and steps.rates[-1] == pytest.approx(0.005)


def test_nothing_to_sample_or_nothing_new_to_judge_skips_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = _ScriptedSteps([])
    tuner = _chunked(monkeypatch, steps)
    empty = SimpleNamespace(sample=lambda n_train, n_val, generator, cut: None)
    outcome = tuner.run(empty)  # type: ignore[arg-type]
    assert (outcome.result, outcome.version, outcome.steps, outcome.windows) == ("skipped", 0, 0, 0)
    assert math.isnan(outcome.train_loss) and outcome.weights is None and outcome.error is None
    tuner.candidate_ready = True
    no_new = SimpleNamespace(
        sample=lambda n_train, n_val, generator, cut: (
            _windows(n_train, 1, 11),
            _windows(0, 2, 11),
            100,
        )
    )
    skipped = tuner.run(no_new)  # type: ignore[arg-type]
    assert (skipped.result, skipped.version) == ("skipped", 0)
    assert steps.batches == []


def test_sampling_is_reproducible_from_the_seed_and_differs_run_to_run() -> None:
    def seeds(seed: int) -> list[int]:
        tuner = _tuner(_settings(**{"training.seed": str(seed)}))
        reader = _Reader()
        for _ in range(3):
            tuner.run(reader)
        return reader.seeds

    first = seeds(0)
    assert first == seeds(0)
    assert len(set(first)) == 3
    assert not set(first) & set(seeds(1))


# -- metrics --------------------------------------------------------------------------


def _value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


def test_run_metrics_count_judged_runs_and_report_the_served_loss() -> None:
    metrics = Metrics()
    record_run_metrics(metrics, RunOutcome("skipped", 0, seconds=1.0))
    assert _value(metrics, "streamlstm_finetune_seconds_count") == 0
    record_run_metrics(metrics, RunOutcome("trained", 0, seconds=1.0, train_loss=0.5))
    assert _value(metrics, "streamlstm_finetune_runs_total", {"result": "trained"}) is None
    assert _value(metrics, "streamlstm_finetune_seconds_count") == 1
    assert _value(metrics, "streamlstm_finetune_loss") == 0.5
    adopted = RunOutcome("adopted", 1, train_loss=0.25, validation_loss=0.1, serving_loss=0.3)
    record_run_metrics(metrics, adopted)
    assert _value(metrics, "streamlstm_finetune_runs_total", {"result": "adopted"}) == 1
    assert _value(metrics, "streamlstm_validation_loss") == 0.1  # the candidate now served
    rejected = RunOutcome("rejected", 1, validation_loss=0.9, serving_loss=0.2)
    record_run_metrics(metrics, rejected)
    assert _value(metrics, "streamlstm_validation_loss") == 0.2  # the weights still served
    assert _value(metrics, "streamlstm_finetune_loss") == 0.25  # NaN train loss: unchanged
    record_run_metrics(metrics, RunOutcome("failed", 1, error="x"))
    assert _value(metrics, "streamlstm_finetune_runs_total", {"result": "failed"}) == 1
    assert _value(metrics, "streamlstm_validation_loss") == 0.2
    assert _value(metrics, "streamlstm_checkpoint_failures_total") == 0
    record_run_metrics(metrics, RunOutcome("adopted", 2, checkpoint_error="disk full"))
    assert _value(metrics, "streamlstm_checkpoint_failures_total") == 1
    record_run_metrics(None, adopted)  # no metrics: nothing to do


def test_weights_survive_the_trip_between_processes() -> None:
    model = RecurrentModel.from_settings(_settings().model)
    weights = weights_to_bytes(model.state_dict())
    assert _same(weights_from_bytes(weights), model.state_dict())
    assert (
        RunOutcome("adopted", 1, weights=weights).state_dict().keys() == model.state_dict().keys()
    )


def test_fine_tuning_never_changes_the_model_it_was_given() -> None:
    settings = _settings()
    model = RecurrentModel.from_settings(settings.model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuner = FineTuner(model, settings)
    _candidate(tuner, bias=TARGET)
    assert tuner.run(_Reader()).result == "adopted"  # the engine swaps the weights in itself
    assert _same(model.state_dict(), before)


def test_the_gate_does_not_score_the_burn_in_steps() -> None:
    class BurnInNoise(_Reader):
        """Targets during burn-in that no model should be judged on."""

        def sample(self, n_train, n_val, generator, cut=-1):  # type: ignore[no-untyped-def]
            train, val, rows = super().sample(n_train, n_val, generator, cut)
            val.y[:2] = 50.0  # the 2 burn-in steps
            return train, val, rows

    tuner = _tuner(_settings())
    _candidate(tuner, bias=TARGET)
    outcome = tuner.run(BurnInNoise())
    assert outcome.result == "adopted" and outcome.validation_loss < 1e-6


def test_adam_uses_the_configured_weight_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = _ScriptedSteps([])
    tuner = _chunked(monkeypatch, steps, **{"training.weight_decay": "0.01"})
    tuner.run(_Reader(length=11))
    assert steps.decays and set(steps.decays) == {0.01}


def test_a_checkpoint_records_the_training_loss_of_the_run_that_made_the_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = _ScriptedSteps([[3.0, 2.0, 1.0]])
    monkeypatch.setattr(gate, "tbptt_update", steps)
    tuner = _tuner(_settings(tmp_path, **{**CHUNKED, "training.steps_per_run": "3"}))
    reader = _Reader(length=11)
    first = tuner.run(reader)
    assert first.result == "trained" and first.train_loss == pytest.approx(2.0)
    _candidate(tuner, bias=TARGET)
    assert tuner.run(reader).result == "adopted"
    saved = load_checkpoint(checkpoint_path(tmp_path / "ckpt", 1))
    assert saved.metrics["train_loss"] == pytest.approx(2.0)


class _Payload:
    """Not a tensor: unpickling it would run code of the sender's choosing."""


def test_weights_from_another_process_are_loaded_without_running_code() -> None:
    buffer = io.BytesIO()
    torch.save({"head.bias": _Payload()}, buffer)
    with pytest.raises(pickle.UnpicklingError):
        weights_from_bytes(buffer.getvalue())


def test_the_serving_weights_are_not_scored_on_the_burn_in_steps_either() -> None:
    class EasyBurnIn(_Reader):
        """Burn-in steps that persistence (the serving weights) gets exactly right."""

        def sample(self, n_train, n_val, generator, cut=-1):  # type: ignore[no-untyped-def]
            train, val, rows = super().sample(n_train, n_val, generator, cut)
            val.y[:2] = 0.0
            return train, val, rows

    tuner = _tuner(_settings())
    _candidate(tuner, bias=0.05)  # 0.2025 after burn-in, against the serving weights' 0.25
    outcome = tuner.run(EasyBurnIn())
    assert outcome.serving_loss == pytest.approx(0.25, rel=1e-4)
    assert outcome.result == "adopted"
