"""The fused step (``engine.fused``, the default) against the plain reference path.

Both engines run the same stream: keys interleaved with several events per key per
batch, new keys arriving in later batches (unscored first events), a key that overflows
float32 (its row reset as non-finite), a batch with explicit targets (some missing),
drift and anomaly statistics that move. Every output, every step handed to learning and
every state row must agree within 1e-5 (float32 rounding of differently ordered sums).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from streamlstm import fused, native
from streamlstm.config import load_settings
from streamlstm.engine import Engine, StepRecord
from streamlstm.events import EventBatch
from streamlstm.kernels import PackedLstm
from streamlstm.model import RecurrentModel

WIDTH, HIDDEN = 3, 16
needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


def _engine(fused_step: bool, **overrides: object) -> Engine:
    base = {
        "model.input_size": WIDTH,
        "model.hidden_size": HIDDEN,
        "model.num_layers": 2,
        "engine.fused": fused_step,
        "training.enabled": False,
        "drift.ph_threshold": 2.0,
        "drift.ph_min_instances": 5,
        "state.anomaly_min_events": 3,
        **overrides,
    }
    engine = Engine.from_settings(load_settings(overrides=base), resume=False)
    with torch.no_grad():  # weights that make the network matter (the head starts at 0)
        gen = torch.Generator().manual_seed(1)
        for p in engine.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    engine.offer_weights(engine.model.state_dict(), 1)
    return engine


def _stream() -> list[EventBatch]:
    rng = np.random.default_rng(3)
    batches = []
    for b in range(6):
        keys = [f"k{k}" for k in rng.integers(0, 4 + 2 * b, 40)]  # new keys as it goes
        t = np.arange(40.0) + 40 * b
        values = np.sin(t[:, None] / 5 + np.arange(WIDTH)) * (1 + 3 * (b == 4))
        values = values + 0.2 * rng.normal(size=(40, WIDTH))
        keys[-3:] = ["stuck"] * 3  # a feed that sends the same values, then other ones
        values[-3:] = 0.5 if b < 4 else -0.5
        if b == 3:
            values[5] = 1e38  # overflows the key's variance: a non-finite row, reset
        target = None
        if b == 5:  # explicit targets, some missing: the plain path in both engines
            target = values + 0.1
            target[::3] = np.nan
        batches.append(EventBatch.from_arrays(keys, t, values.astype(np.float32), target))
    return batches


class _Steps:
    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, ...]] = []

    def begin(self, events: int, capacity: int) -> None:
        pass

    def record(self, step: StepRecord) -> None:
        self.steps.append(
            (step.slots.clone(), step.x.clone(), step.label_prev.clone(), step.count.clone(),
             step.state.clone(), step.positions.clone())
        )  # fmt: skip

    def end(self) -> None:
        pass


SETTINGS = [
    {},
    {"engine.max_step": 0.5, "drift.ph_mode": "up"},
    {"model.inputs": "change", "drift.enabled": False},
]


def _state_and_rest(engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    """The store's recurrent states (float32) and its other columns."""
    table, rec = engine.store.table, engine.store.layout.columns["recurrent"]
    state = engine.store.layout.field(table, "recurrent").float()
    return state, torch.cat((table[:, : rec.start], table[:, rec.stop :]), 1)


@needs_compiler
@pytest.mark.parametrize("overrides", SETTINGS)
def test_fused_and_plain_engines_agree_within_1e_5(overrides: dict[str, object]) -> None:
    """With the state stored in float32: the formulas mirror each other."""
    _agree({**overrides, "state.recurrent_dtype": "float32"}, tolerance=1e-5)


@needs_compiler
def test_fused_and_plain_engines_agree_with_a_float16_state() -> None:
    """Stored in float16, the two paths' float32 states (within 1e-6) round to values one
    float16 step (2^-11 relative) apart where they straddle a rounding boundary; the
    difference propagates through the next steps, so the bound is a few such steps."""
    _agree({"state.recurrent_dtype": "float16"}, tolerance=2e-3)


@needs_compiler
def test_without_a_learner_the_whole_step_is_one_c_call_and_agrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No learner to hand the rows to between the passes: ``fused_sweep`` runs them all,
    per sub-block of keys (where torch's BLAS is found; here of 5 keys)."""
    monkeypatch.setattr(fused, "NETWORK_BLOCK", 5)
    _agree({"state.recurrent_dtype": "float32"}, tolerance=1e-5, learner=False)


@needs_compiler
@pytest.mark.parametrize("learner", [True, False], ids=["blocked", "one-call"])
def test_fused_and_plain_engines_score_a_stuck_feed_alike(learner: bool) -> None:
    """A key whose values never repeated, then a run of exact repeats (a stuck feed):
    the repeat evidence and its counts agree, event by event."""
    rng = np.random.default_rng(5)
    stuck = rng.normal(size=(60, WIDTH)).astype(np.float32)
    stuck[40:] = stuck[39]  # stuck from its 41st event on
    plain, fast = (_engine(f, **{"state.recurrent_dtype": "float32"}) for f in (False, True))
    if learner:
        plain.attach_learner(_Steps())
        fast.attach_learner(_Steps())
    scores = []
    for start in range(0, 60, 4):  # 4 events of the stuck key and 4 of a noisy one a batch
        rows = np.empty((8, WIDTH), np.float32)
        rows[::2], rows[1::2] = stuck[start : start + 4], rng.normal(size=(4, WIDTH))
        batch = EventBatch.from_arrays(["stuck", "noisy"] * 4, np.arange(8.0) + start, rows)
        a, b = plain.process(batch), fast.process(batch)
        np.testing.assert_allclose(b.anomaly_score, a.anomaly_score, rtol=1e-6, atol=1e-5)
        scores += a.anomaly_score[::2].tolist()
    field = plain.store.layout.field
    for engine in (plain, fast):
        counts = field(engine.store.table, "err_repeats")[engine.store.slot("stuck")]
        assert counts[0] == 20 and counts[3] > 0  # 20 repeats seen, the run's evidence
    assert max(scores[40:]) > 0.1 > max(scores[3:40])  # stuck: evidence the noise never had


def _agree(overrides: dict[str, object], tolerance: float, learner: bool = True) -> None:
    plain, fast = _engine(False, **overrides), _engine(True, **overrides)
    assert plain.fused_step is None and fast.fused_step is not None
    taps = _Steps(), _Steps()
    if learner:
        plain.attach_learner(taps[0])
        fast.attach_learner(taps[1])
    close = {"rtol": tolerance / 10, "atol": tolerance, "equal_nan": True}
    drifts, top_score = 0, 0.0
    for batch in _stream():
        a, b = plain.process(batch), fast.process(batch)
        for name in ("prediction", "error", "squared_error", "anomaly_score", "scaled_error"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), **close, err_msg=name)
        top_score = max(top_score, float(np.nanmax(a.anomaly_score)))
        if a.drift is not None:
            np.testing.assert_array_equal(b.drift, a.drift)
            drifts += int(a.drift.sum())
    assert plain.store.resets["non_finite"] == fast.store.resets["non_finite"] == 1
    assert top_score > 0.1  # the anomaly statistics were exercised
    runs = plain.store.layout.field(plain.store.table, "err_repeats")[plain.store.slot("stuck")]
    assert runs[0] == 16 and runs[3] > 0  # repeats counted (11, then 5 since the change)
    if plain.drift.enabled:
        assert drifts > 0
    assert len(taps[0].steps) == len(taps[1].steps) > (10 if learner else -1)
    for mine, theirs in zip(taps[1].steps, taps[0].steps, strict=True):
        for x, y in zip(mine, theirs, strict=True):
            torch.testing.assert_close(x, y, **close)
    assert plain.store.keys() == fast.store.keys()
    for mine, theirs in zip(_state_and_rest(fast), _state_and_rest(plain), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=tolerance / 10, atol=tolerance)
    assert torch.equal(fast.store.dirty, plain.store.dirty)


@needs_compiler
def test_without_torchs_blas_the_step_runs_addmm_per_layer_and_agrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where ``sgemm_`` cannot be found, the network runs through ``addmm`` and
    ``fused_lstm_cell`` per layer (and the head's ``addmm``): the same outputs."""
    monkeypatch.setattr(fused, "blas_gemm", lambda: None)
    engine = _engine(True)
    engine.adopt_offered()
    assert engine.fused_step is not None and engine.fused_step.gemm is None
    _agree({"state.recurrent_dtype": "float32"}, tolerance=1e-5)


@needs_compiler
@pytest.mark.parametrize(("block", "network_block"), [(7, 256), (4096, 5)])
def test_a_step_run_in_blocks_of_keys_equals_one_run_whole(block: int, network_block: int) -> None:
    """Keys are independent: blocks of 7 keys (cache-sized blocks in production), or the
    network's sub-blocks of 5, give the whole step's outputs and rows (to the matrix
    products' rounding)."""
    f32 = {"state.recurrent_dtype": "float32"}  # a float16 step could round either way
    whole, blocks = _engine(True, **f32), _engine(True, **f32)
    for engine in (whole, blocks):
        engine.adopt_offered()  # the offered weights build the fused step anew
    assert whole.fused_step is not None and blocks.fused_step is not None
    whole.fused_step.block = 4096
    blocks.fused_step.block, blocks.fused_step.network_block = block, network_block
    for batch in _stream():
        a, b = whole.process(batch), blocks.process(batch)
        for name in ("prediction", "error", "squared_error", "anomaly_score", "drift"):
            np.testing.assert_allclose(getattr(b, name), getattr(a, name), 1e-6, 1e-6, True)
    assert whole.store.resets == blocks.store.resets
    torch.testing.assert_close(blocks.store.table, whole.store.table, rtol=1e-6, atol=1e-6)
    assert torch.equal(blocks.store.dirty, whole.store.dirty)


@needs_compiler
@pytest.mark.parametrize("fused_step", [False, True])
def test_a_float16_state_is_the_float32_step_rounded_to_nearest_even(fused_step: bool) -> None:
    """From the same (zero) state, one step stores exactly ``half()`` of what the float32
    layout stores: the step computes in float32 and rounds once, to nearest even."""
    batch = EventBatch.from_arrays(
        [f"k{i}" for i in range(300)], np.zeros(300), np.random.default_rng(0).normal(
            size=(300, WIDTH)).astype(np.float32)
    )  # fmt: skip
    wide, narrow = (
        _engine(fused_step, **{"state.recurrent_dtype": dtype}) for dtype in ("float32", "float16")
    )
    wide.process(batch)
    narrow.process(batch)
    full, half = (_state_and_rest(e)[0][:300] for e in (wide, narrow))
    assert narrow.store.layout.field(narrow.store.table, "recurrent").dtype == torch.float16
    assert full.abs().max() > 0.1 and not torch.equal(full, half)  # the rounding mattered
    assert torch.equal(half, full.half().float())


@needs_compiler
@pytest.mark.parametrize("fused_step", [False, True])
def test_a_non_finite_float16_state_resets_the_row(fused_step: bool) -> None:
    """A NaN in a float16 state value need not make its float32 column non-finite (the
    low half of the pair): it is found and the row reset all the same."""
    engine = _engine(fused_step)
    batch = _stream()[0]
    engine.process(batch)
    store = engine.store
    slot = store.slot(batch.keys[0])
    assert slot is not None
    state = store.layout.field(store.table[slot : slot + 1], "recurrent")
    state.view(-1)[0] = float("nan")  # the low half of the first column
    assert bool(torch.isfinite(store.table[slot]).all())  # invisible as float32
    engine.process(EventBatch.from_arrays([batch.keys[0]], [100.0], batch.values[:1]))
    assert store.resets["non_finite"] == 1
    assert bool(torch.isfinite(state).all())


def test_without_a_compiler_the_engine_runs_the_plain_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setenv("STREAMLSTM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    engine = _engine(True)
    assert engine.fused_step is None and native._failure is not None
    out = engine.process(_stream()[0])
    assert np.isfinite(out.prediction).all()
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


@needs_compiler
def test_an_unwritable_cache_folder_builds_in_a_temporary_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("STREAMLSTM_CACHE", str(blocked / "cache"))
    engine = _engine(True)
    assert engine.fused_step is not None, native._failure
    assert np.isfinite(engine.process(_stream()[0]).prediction).all()


def test_packed_weights_follow_weights_changed_in_place() -> None:
    net = RecurrentModel(input_size=WIDTH, hidden_size=8, num_layers=2)
    packed = PackedLstm(net)
    with torch.no_grad():  # as load_state_dict does: the same tensors, new values
        for p in net.rnn.parameters():
            p.mul_(-2.0)
    x, state = torch.randn(4, WIDTH), torch.randn(4, 2, 2, 8)
    expected, expected_state = net.step(x, state)
    out = packed.step_(x, state)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)
