"""Offline warm start: epochs of truncated BPTT over a file, early-stopped on held-out rows.

The file is first run through the engine's own per-key online scaler, so the model
trains on exactly the inputs and labels it will see when streaming (label of step t:
the key's change to step t+1 in step t's units; an explicit ``target`` overrides it).
Rows from ``validation_from`` on (file order, 0-based among the file's valid events)
are held out, and so is any label that comes from a held-out row.

Each epoch cuts every key's training rows into windows of ``training.window`` steps at a
random offset, and computes their start states with the *current* weights by running
each key's sequence from its first event (no stale states, unlike online replay).
Windows train as in fine-tuning (burn-in, TBPTT chunks, Adam, clipping). After each
epoch the validation loss is the next-step error over the held-out rows with the full
history of each key, exactly as streaming would score them; the best epoch's weights
are kept, the learning rate backs off after ``training.lr_patience`` epochs without
improvement, and training stops once a backed-off rate has had as many epochs and still
not improved (:class:`Plateau`). The result is one checkpoint that ``run`` and ``replay``
resume from.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from streamlstm.config import Settings
from streamlstm.engine import Engine, StepRecord
from streamlstm.events import EventBatch
from streamlstm.learning.checkpoint import architecture, list_checkpoints, save_checkpoint
from streamlstm.learning.tbptt import correction_loss, resolve_device, tbptt_update
from streamlstm.learning.windows import Windows
from streamlstm.model import RecurrentModel


@dataclass
class Sequences:
    """Per-key normalised sequences, padded to one time-major tensor."""

    x: torch.Tensor  # [T, K, F] normalised inputs (not clipped); padding is 0
    y: torch.Tensor  # [T, K, F] labels; NaN where unknown, held out or padding
    length: torch.Tensor  # [K] steps per key
    train_y: torch.Tensor  # [T, K, F] labels usable for training (NaN elsewhere)
    val_y: torch.Tensor  # [T, K, F] labels of held-out rows (NaN elsewhere)
    keys: list[str]


class _Step(NamedTuple):
    """What pretraining keeps of a :class:`~streamlstm.engine.StepRecord` (copied)."""

    slots: torch.Tensor
    x: torch.Tensor
    label_prev: torch.Tensor
    own_label: torch.Tensor  # NaN: none


class _Capture:
    """Keeps every step the engine hands over (a :class:`~streamlstm.engine.StepConsumer`)."""

    def __init__(self) -> None:
        self.steps: list[_Step] = []

    def begin(self, events: int, capacity: int) -> None:
        pass

    def record(self, step: StepRecord) -> None:
        own = torch.full_like(step.x, math.nan) if step.own_label is None else step.own_label
        self.steps.append(_Step(step.slots.clone(), step.x.clone(), step.label_prev.clone(), own))

    def end(self) -> None:
        pass


def normalised_sequences(batch: EventBatch, settings: Settings, validation_from: int) -> Sequences:
    """Run ``batch`` through the engine's scaler; split labels at ``validation_from``."""
    quiet = settings.model_copy(deep=True)
    quiet.drift.enabled = False
    engine = Engine.from_settings(quiet, resume=False)
    capture = _Capture()
    engine.attach_learner(capture)
    engine.process(batch)
    steps = capture.steps
    slots = torch.cat([step.slots for step in steps])
    x = torch.cat([step.x for step in steps])
    label_prev = torch.cat([step.label_prev for step in steps])
    own = torch.cat([step.own_label for step in steps])
    # Each key's steps were recorded in its event order: a stable sort groups them.
    order = torch.argsort(slots, stable=True)
    slots, x, label_prev, own = slots[order], x[order], label_prev[order], own[order]
    # The file row of each recorded step: the k-th event of a key is its k-th step.
    names = np.array(batch.keys)
    key_of = {engine.store.slot(key): key for key in dict.fromkeys(batch.keys)}
    rows_by_slot = {slot: np.flatnonzero(names == key) for slot, key in key_of.items()}
    unique, counts = torch.unique_consecutive(slots, return_counts=True)
    keys = [key_of[s] for s in unique.tolist()]
    rows = torch.from_numpy(np.concatenate([rows_by_slot[s] for s in unique.tolist()]))
    same_next = torch.zeros(len(slots), dtype=torch.bool)
    same_next[:-1] = slots[1:] == slots[:-1]
    label = torch.full_like(x, math.nan)
    label[:-1] = torch.where(same_next[:-1, None], label_prev[1:], math.nan)
    label = torch.where(torch.isnan(own), label, own)
    label_row = torch.full_like(rows, torch.iinfo(torch.int64).max)
    label_row[:-1] = torch.where(same_next[:-1], rows[1:], label_row[:-1])
    label_row = torch.where(torch.isnan(own).all(1), label_row, rows)

    k, t, f = len(keys), int(counts.max()), x.shape[1]
    starts = torch.cumsum(counts, 0) - counts
    step = torch.arange(len(slots)) - torch.repeat_interleave(starts, counts)
    lane = torch.repeat_interleave(torch.arange(k), counts)
    xs = torch.zeros(t, k, f)
    ys = torch.full((t, k, f), math.nan)
    train_mask = torch.zeros(t, k, dtype=torch.bool)
    xs[step, lane] = x
    ys[step, lane] = label
    train_mask[step, lane] = label_row < validation_from
    val_mask = torch.zeros(t, k, dtype=torch.bool)
    val_mask[step, lane] = (label_row >= validation_from) & (
        label_row < torch.iinfo(torch.int64).max
    )
    nan = torch.tensor(math.nan)
    return Sequences(
        x=xs,
        y=ys,
        length=counts,
        train_y=torch.where(train_mask[..., None], ys, nan),
        val_y=torch.where(val_mask[..., None], ys, nan),
        keys=keys,
    )


@dataclass
class PretrainResult:
    """What pretraining did."""

    checkpoint: Path | None
    version: int
    epochs: int
    best_epoch: int
    initial_validation_loss: float = math.nan  # the untrained model: persistence
    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        best = self.validation_loss[self.best_epoch - 1] if self.validation_loss else math.nan
        return [
            f"epochs: {self.epochs} (best {self.best_epoch}, validation loss {best:.4f}, "
            f"untrained {self.initial_validation_loss:.4f})",
            f"checkpoint: {self.checkpoint} (model_version {self.version})",
            f"time: {self.seconds:.1f} s",
        ]


def _windows(seq: Sequences, model: RecurrentModel, settings: Settings, offset: int) -> Windows:
    """Training windows starting at ``offset + i * stride`` of every key, with the start
    states the current weights give (each key run from its first event)."""
    t = settings.training
    clip = settings.engine.input_clip
    length = seq.x.shape[0]
    stride = t.window - t.burn_in
    starts = list(range(offset, length - t.window + 1, stride))
    xs, ys, states, lanes = [], [], [], []
    state = model.initial_state(seq.x.shape[1], seq.x.device)
    done = 0
    with torch.no_grad():
        for s in starts:
            if s > done:
                _, state = model(seq.x[done:s].clamp(-clip, clip), state)
                done = s
            labels = seq.train_y[s + t.burn_in : s + t.window]
            live = (seq.length.to(labels.device) >= s + t.window) & ~torch.isnan(labels).all(2).all(
                0
            )
            if bool(live.any()):
                idx = torch.nonzero(live).flatten()
                xs.append(seq.x[s : s + t.window, idx])
                ys.append(seq.train_y[s : s + t.window, idx])
                states.append(state[idx])
                lanes.append(idx)
    if not xs:
        shape = model.state_shape
        return Windows(
            torch.zeros(t.window, 0, seq.x.shape[2]),
            torch.zeros(t.window, 0, seq.x.shape[2]),
            torch.zeros(0, *shape),
            torch.zeros(0, dtype=torch.int64),
        )
    return Windows(torch.cat(xs, 1), torch.cat(ys, 1), torch.cat(states), torch.cat(lanes))


@torch.no_grad()
def sequence_loss(
    model: RecurrentModel, seq: Sequences, labels: torch.Tensor, clip: float, chunk: int = 512
) -> float:
    """Next-step correction error over the labelled steps, each key from its first event."""
    state = model.initial_state(seq.x.shape[1], seq.x.device)
    total = count = 0.0
    for s in range(0, seq.x.shape[0], chunk):
        x = seq.x[s : s + chunk]
        x_in = x.clamp(-clip, clip)
        out, state = model(x_in, state)
        known = ~torch.isnan(labels[s : s + chunk])
        n = float(known.sum())
        if n:
            total += float(correction_loss(out, x_in, labels[s : s + chunk], clip)) * n
            count += n
    return total / count if count else math.nan


class Plateau:
    """When pretraining backs off the learning rate, and when it stops.

    The rate is multiplied by ``factor`` after ``lr_patience`` epochs without a better
    validation loss (as the gate backs off after that many rejections), and training stops
    after ``patience`` epochs without one. By default ``patience`` is ``2 * lr_patience``:
    the lowered rate gets as many epochs to improve as the first one had. A validation
    curve on a few months of data wanders by more than a single epoch's gain, so a stop
    that comes sooner (one or two epochs after a back-off) ends training at a chance
    bump, not where it stopped learning: on ETTh2's rows < 3600 (seeds 0 and 2), stopping
    two epochs after the back-off kept epoch 7 of 12; three epochs after, training went on
    to epoch 40-49 with a 4-5% lower validation loss.

    >>> plateau = Plateau(lr=1e-3, lr_patience=3, factor=0.5, min_lr=1e-5)
    >>> [plateau.update(loss) for loss in (1.0, 0.9, 0.95, 0.95, 0.95)]
    [True, True, False, False, False]
    >>> plateau.lr, plateau.stop
    (0.0005, False)
    >>> [plateau.update(0.95) for _ in range(3)], plateau.stop
    ([False, False, False], True)
    """

    def __init__(
        self, lr: float, lr_patience: int, factor: float, min_lr: float, patience: int | None = None
    ) -> None:
        self.lr = lr
        self.lr_patience = max(1, lr_patience)  # 0 counts as 1, as in the gate
        self.patience = 2 * self.lr_patience if patience is None else patience
        self.factor = factor
        self.min_lr = min_lr
        self.best = math.inf
        self.since = self.since_lr = 0
        self.stop = False

    def update(self, loss: float) -> bool:
        """Feed one epoch's validation loss; True when it is the best so far."""
        if loss < self.best:
            self.best, self.since, self.since_lr = loss, 0, 0
            return True
        self.since += 1
        self.since_lr += 1
        if self.since_lr >= self.lr_patience:
            self.lr = max(self.min_lr, self.lr * self.factor)
            self.since_lr = 0
        self.stop = self.since >= self.patience
        return False


def pretrain(
    batch: EventBatch,
    settings: Settings,
    checkpoint_dir: str | Path | None,
    epochs: int = 50,
    validation_from: int | None = None,
    validation_fraction: float = 0.2,
    patience: int | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a fresh model (seeded by ``model.seed``) on ``batch``; write a checkpoint.

    ``patience``: epochs without improvement before stopping (None: see :class:`Plateau`).
    """
    started = time.perf_counter()
    t = settings.training
    clip = settings.engine.input_clip
    n = len(batch)
    split = validation_from if validation_from is not None else int(n * (1 - validation_fraction))
    if not 0 < split < n:
        raise ValueError(f"validation split at row {split} leaves no training or validation rows")
    device = resolve_device(t.device)
    seq = normalised_sequences(batch, settings, split)
    seq.x, seq.y, seq.train_y, seq.val_y = (
        v.to(device) for v in (seq.x, seq.y, seq.train_y, seq.val_y)
    )
    torch.manual_seed(t.seed)
    model = RecurrentModel.from_settings(settings.model)
    model.to(device)
    plateau = Plateau(t.learning_rate, t.lr_patience, t.lr_factor, t.min_learning_rate, patience)
    optimizer = torch.optim.Adam(model.parameters(), lr=plateau.lr, weight_decay=t.weight_decay)
    generator = torch.Generator().manual_seed(t.seed)
    best = sequence_loss(model, seq, seq.val_y, clip)
    plateau.update(best)
    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    result = PretrainResult(None, 0, 0, 0, initial_validation_loss=best)
    bar = tqdm(range(1, epochs + 1), desc="pretrain", unit="epoch", disable=not progress)
    for epoch in bar:
        offset = int(torch.randint(0, t.window - t.burn_in, (1,), generator=generator))
        model.eval()
        windows = _windows(seq, model, settings, offset)
        if len(windows) == 0:
            raise ValueError("no training window: the file is shorter than training.window")
        order = torch.randperm(len(windows), generator=generator).to(device)
        model.train()
        losses: list[float] = []
        for b in range(0, len(windows), t.batch_windows):
            part = windows.take(order[b : b + t.batch_windows])
            losses += tbptt_update(
                model, optimizer, part, t.burn_in, t.tbptt_steps, clip, t.clip_norm
            )
        model.eval()
        val = sequence_loss(model, seq, seq.val_y, clip)
        result.train_loss.append(sum(losses) / len(losses))
        result.validation_loss.append(val)
        result.epochs = epoch
        lr = plateau.lr
        bar.set_postfix(train=f"{result.train_loss[-1]:.4f}", val=f"{val:.4f}", lr=f"{lr:.1e}")
        if plateau.update(val):
            best = val
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            result.best_epoch = epoch
        for group in optimizer.param_groups:
            group["lr"] = plateau.lr
        if plateau.stop:
            break
    bar.close()
    model.cpu().load_state_dict(best_state)
    if checkpoint_dir is not None:
        existing = list_checkpoints(checkpoint_dir)
        result.version = existing[0][0] + 1 if existing else 1
        result.checkpoint = save_checkpoint(
            checkpoint_dir,
            model.state_dict(),
            architecture(model, settings),
            result.version,
            config=settings.model_dump(mode="json"),
            metrics={"validation_loss": best, "epochs": result.epochs},
            keep=t.keep_checkpoints,
        )
    result.seconds = time.perf_counter() - started
    return result


def plot_losses(result: PretrainResult, path: str | Path) -> None:
    """Training and validation loss per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    epochs = range(1, len(result.train_loss) + 1)
    ax.plot(epochs, result.train_loss, label="training")
    ax.plot(epochs, result.validation_loss, label="validation")
    if result.best_epoch:
        ax.axvline(result.best_epoch, color="grey", linestyle=":", label="best epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE of the next-step correction (normalised units)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
