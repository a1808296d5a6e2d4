"""Replay buffer: windows, labels, start states, bounds, chains, sampling over keys and time."""

from __future__ import annotations

import math

import numpy as np
import torch

from streamlstm.config import load_settings
from streamlstm.engine import Engine, StepRecord
from streamlstm.events import EventBatch
from streamlstm.learning.buffer import ReplayBuffer

SHAPE = (1, 1, 2)


def _buffer(budget: int = 2**16, window: int = 4, burn_in: int = 1, **kw) -> ReplayBuffer:
    return ReplayBuffer(width=1, state_shape=SHAPE, budget_bytes=budget, window=window,
                        burn_in=burn_in, **kw)  # fmt: skip


def _feed(buf: ReplayBuffer, slots: list[int], counts: dict[int, int], base: float = 0.0) -> None:
    """One batched step of distinct slots; x = 1000*slot + step, state = x too."""
    for s in slots:
        counts[s] = counts.get(s, 0) + 1
    idx = torch.tensor(slots)
    step = torch.tensor([counts[s] - 1 for s in slots], dtype=torch.float32)
    x = (1000.0 * idx + step + base).unsqueeze(1)
    state = x.view(-1, 1, 1, 1).expand(-1, *SHAPE).clone()
    count = torch.tensor([float(counts[s]) for s in slots])
    buf.begin(len(slots), capacity=0)
    buf.record(StepRecord(idx, x, x.clone(), count, state, torch.arange(len(slots))))
    buf.end()


def test_windows_hold_a_keys_consecutive_steps_labels_and_start_state() -> None:
    buf = _buffer()
    counts: dict[int, int] = {}
    rng = np.random.default_rng(0)
    for _ in range(60):
        _feed(buf, rng.choice(5, size=rng.integers(1, 5), replace=False).tolist(), counts)
    reader = buf.reader()
    cands = reader.candidates()
    w = reader.gather(cands)
    assert len(w) > 10
    for i in range(len(w)):
        xs = w.x[:, i, 0]
        assert torch.all(xs // 1000 == w.slot[i])  # one key
        assert torch.all(torch.diff(xs) == 1)  # consecutive steps, in order
        assert torch.all(w.y[:, i, 0] == xs + 1)  # label of step t: step t+1
        assert torch.all(w.state[i] == xs[0])  # the state before the first step
        assert (xs[0] % 1000) % buf.stride == 0  # windows start at snapshots


def test_memory_is_bounded_and_overwritten_windows_are_never_returned() -> None:
    budget = 2**16
    buf = _buffer(budget=budget, window=8, burn_in=2)
    counts: dict[int, int] = {}
    for _ in range(3 * buf.ring.rows // 3):  # wrap the ring three times over
        _feed(buf, [0, 1, 2], counts)
    assert buf.ring.nbytes() <= budget
    reader = buf.reader()
    w = reader.gather(reader.candidates())
    assert len(w) > 0
    oldest_kept = buf.rows_written - buf.ring.rows
    for i in range(len(w)):
        xs = w.x[:, i, 0]
        assert torch.all(torch.diff(xs) == 1)
        assert torch.all(w.y[:, i, 0] == xs + 1)
    # Every window lies within the rows still held.
    assert int(reader.candidates().start.min()) >= oldest_kept


def test_a_break_in_the_event_count_starts_a_new_chain() -> None:
    # A slot reused by a new key (its count restarts at 1) must not continue the old chain.
    buf = _buffer(window=4, burn_in=0)
    counts: dict[int, int] = {}
    for _ in range(6):
        _feed(buf, [0], counts)
    counts[0] = 0  # new key in slot 0
    for _ in range(6):
        _feed(buf, [0], counts, base=500.0)
    w = buf.reader().gather(buf.reader().candidates())
    for i in range(len(w)):
        xs = w.x[:, i, 0]
        assert bool(torch.all(xs < 500)) or bool(torch.all(xs >= 500))
        assert torch.all(torch.diff(xs) == 1)


def test_sampling_spreads_over_keys_and_favours_recent_windows() -> None:
    buf = _buffer(budget=2**20, window=4, burn_in=0, half_life=0.25)
    counts: dict[int, int] = {}
    rng = np.random.default_rng(1)
    for _ in range(4000):  # key 0 is busy (every step), keys 1-9 each 1 step in 10
        quiet = rng.choice(np.arange(1, 10), size=1).tolist()
        _feed(buf, [0, *quiet], counts)
    reader = buf.reader()
    cands = reader.candidates()
    busy_share = float((cands.slot == 0).float().mean())
    assert busy_share > 0.45  # the busy key owns half the windows held
    _, train, weights = reader.split(cands, n_val=5, cut=-1)
    picks = train[torch.multinomial(weights, 20_000, replacement=True,
                                    generator=torch.Generator().manual_seed(0))]  # fmt: skip
    per_key = torch.bincount(cands.slot[picks], minlength=10).float() / len(picks)
    assert float(per_key[0]) < 0.2  # ...but gets about a tenth of the samples
    assert float(per_key[1:].min()) > 0.05
    age = (cands.rows_written - cands.end[picks]).float()
    held = min(cands.rows_written, buf.ring.rows)
    assert float((age < held / 2).float().mean()) > 0.7  # the newer half of rows dominates


def test_validation_scores_only_rows_newer_than_the_cut() -> None:
    buf = _buffer(budget=2**18, window=4, burn_in=1)
    counts: dict[int, int] = {}
    for _ in range(300):
        _feed(buf, [0, 1, 2], counts)
    cut = buf.rows_written - 1  # what a candidate trained now would have seen
    for _ in range(6):
        _feed(buf, [0, 1, 2], counts)
    reader = buf.reader()
    cands = reader.candidates()
    val, train, _ = reader.split(cands, n_val=4, cut=cut)
    assert len(train) == len(cands)  # nothing is held back from training
    assert len(val) == 4 and set(cands.slot[val[:3]].tolist()) == {0, 1, 2}  # round-robin
    w = reader.gather(cands.take(val), cut)
    ids = buf.ring.ids[cands.pos[val]].T  # [W, N] row numbers of the windows
    labelled = ~torch.isnan(w.y[..., 0])
    assert torch.equal(labelled, ids > cut)  # scored exactly on the rows past the cut
    assert bool(labelled.any(0).all())


def test_engine_labels_are_next_values_in_the_previous_steps_units() -> None:
    # The label of step t is the correction (v[t+1] - v[t]) / std[t], std[t] the key's
    # scaler before event t+1 (exact mean/variance over its first events): its mean absolute
    # value, each feature clipped as in training, is persistence's std-unit error of t+1.
    overrides = {"model.input_size": "3", "model.hidden_size": "4", "training.window": "6"}
    settings = load_settings(overrides={**overrides, "training.burn_in": "0"})
    engine = Engine.from_settings(settings)
    buf = ReplayBuffer.from_settings(settings, engine.model.state_shape, 3)
    engine.attach_learner(buf)
    rng = np.random.default_rng(2)
    seen: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    for b in range(40):
        values = rng.normal(size=(2, 3)) * [1, 10, 100]
        engine.process(EventBatch.from_arrays(["a", "b"], [b, b + 0.5], values))
        seen["a"].append(values[0])
        seen["b"].append(values[1])

    def persistence_error(v: np.ndarray, t: int) -> float:
        past = v[:t]
        std = np.sqrt(past.var(0) + 1e-14 * past.mean(0) ** 2 + 1e-30)
        return float(np.minimum(np.abs(v[t] - v[t - 1]) / std, 10.0).mean())

    reader = buf.reader()
    cands = reader.candidates()
    w = reader.gather(cands)
    assert len(w) > 4
    slot_key = {engine.store.slot(k): k for k in ("a", "b")}
    for i in range(len(w)):
        v = np.array(seen[slot_key[int(w.slot[i])]])
        first_step = int(buf.ring.step[cands.pos[i, 0]])
        got = w.y[:, i].clamp(-10, 10).abs().mean(1)
        steps = range(first_step + 1, first_step + 1 + w.x.shape[0])
        want = torch.tensor([persistence_error(v, t) for t in steps], dtype=torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not math.isnan(float(w.y.sum()))
