"""Truncated BPTT: the loss the network learns, burn-in, the update step, evaluation.

Shared by fine-tuning (:mod:`streamlstm.learning.gate`) and offline pretraining
(:mod:`streamlstm.learning.pretrain`), so both train exactly the same thing.

The network's output minus its input is a correction to the key's current values, in
the key's standard deviations (see ``streamlstm.engine``); it sees inputs clipped to
``engine.input_clip`` and learns the target correction (the key's change to its next
event, or its explicit target) clipped to the same bound, exactly as the engine applies
it, so a rare jump neither saturates the network nor dominates the loss.
"""

from __future__ import annotations

import math

import torch

from streamlstm.learning.windows import Windows
from streamlstm.model import RecurrentModel


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device is cuda but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def correction_loss(
    out: torch.Tensor, x_in: torch.Tensor, y: torch.Tensor, clip: float
) -> torch.Tensor:
    """Mean squared error of the model's correction ``out - x_in`` against the target
    correction ``y`` clipped to ``clip`` (NaN targets do not count)."""
    target = y.clamp(-clip, clip)
    known = ~torch.isnan(target)
    diff = torch.where(known, out - x_in - torch.nan_to_num(target), 0.0)
    return (diff * diff).sum() / known.sum().clamp(min=1)


def chunk_loss(
    model: RecurrentModel, x: torch.Tensor, y: torch.Tensor, state: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one chunk ``x, y: [T, B, F]`` from ``state``; returns (loss, final state)."""
    x_in = x.clamp(-clip, clip)
    out, new_state = model(x_in, state)
    return correction_loss(out, x_in, y, clip), new_state


def burn_in(
    model: RecurrentModel, x: torch.Tensor, state: torch.Tensor, steps: int, clip: float
) -> torch.Tensor:
    """Advance ``state`` over the first ``steps`` inputs without gradient."""
    if steps == 0:
        return state
    with torch.no_grad():
        _, state = model(x[:steps].clamp(-clip, clip), state)
    return state


def tbptt_update(
    model: RecurrentModel,
    optimizer: torch.optim.Optimizer,
    windows: Windows,
    burn_in_steps: int,
    tbptt_steps: int,
    clip: float,
    clip_norm: float,
) -> list[float]:
    """Train on a batch of windows: burn-in, then one optimiser step per TBPTT chunk.

    The state is detached at every chunk boundary, so no gradient flows into an
    earlier chunk (``tests/learning/test_trainer_tbptt.py``). Returns the chunks' losses.
    """
    state = burn_in(model, windows.x, windows.state, burn_in_steps, clip).detach()
    losses = []
    length = windows.x.shape[0]
    for start in range(burn_in_steps, length, tbptt_steps):
        chunk = slice(start, min(length, start + tbptt_steps))
        loss, state = chunk_loss(model, windows.x[chunk], windows.y[chunk], state, clip)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        state = state.detach()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate(
    model: RecurrentModel, windows: Windows, burn_in_steps: int, clip: float, batch: int = 512
) -> float:
    """Mean squared correction error over the windows' trained steps (after burn-in)."""
    total = count = 0.0
    for start in range(0, len(windows), batch):
        part = windows.take(slice(start, start + batch))
        state = burn_in(model, part.x, part.state, burn_in_steps, clip)
        x_in = part.x[burn_in_steps:].clamp(-clip, clip)
        out, _ = model(x_in, state)
        known = float((~torch.isnan(part.y[burn_in_steps:])).sum())
        total += float(correction_loss(out, x_in, part.y[burn_in_steps:], clip)) * known
        count += known
    return total / count if count else math.nan


class EarlyStop:
    """Stops when an exponential average of the losses has not improved for ``patience``."""

    def __init__(self, patience: int, smoothing: float = 0.9, min_delta: float = 1e-3) -> None:
        self.patience = patience
        self.smoothing = smoothing
        self.min_delta = min_delta
        self.average: float | None = None
        self.best = math.inf
        self.since = 0

    def update(self, loss: float) -> bool:
        """Feed one loss; True when training should stop."""
        a = self.smoothing
        self.average = loss if self.average is None else a * self.average + (1 - a) * loss
        if self.average < self.best * (1 - self.min_delta):
            self.best, self.since = self.average, 0
        else:
            self.since += 1
        return self.since >= self.patience
