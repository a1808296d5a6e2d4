"""Truncated BPTT: no gradient crosses a chunk boundary or reaches the burn-in."""

from __future__ import annotations

import math

import torch

from streamlstm.learning.tbptt import chunk_loss, tbptt_update
from streamlstm.learning.windows import Windows
from streamlstm.model import RecurrentModel


def _windows(steps: int, batch: int = 3, width: int = 2) -> Windows:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, width, generator=gen).requires_grad_(True)
    y = torch.randn(steps, batch, width, generator=gen)
    state = torch.randn(batch, 2, 2, 8, generator=gen)
    return Windows(x, y, state, torch.arange(batch))


def test_no_gradient_flows_past_the_truncation_boundary() -> None:
    model = RecurrentModel(2, 8, 2, seed=0)
    torch.nn.init.normal_(model.head.weight)  # a zero head would hide every gradient
    w = _windows(steps=4 + 2 * 5)
    # Only the last chunk has labels: any gradient on earlier inputs crossed a boundary.
    w.y[: 4 + 5] = math.nan
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    losses = tbptt_update(model, optimizer, w, burn_in_steps=4, tbptt_steps=5, clip=10, clip_norm=1)
    assert len(losses) == 2 and losses[0] == 0.0 and losses[1] > 0
    grad = w.x.grad
    assert grad is not None
    assert torch.count_nonzero(grad[: 4 + 5]) == 0  # burn-in and first chunk: none
    assert torch.count_nonzero(grad[4 + 5 :]) > 0  # the labelled chunk: some


def test_without_truncation_the_gradient_would_reach_back() -> None:
    # The control: one chunk over the same steps does reach the earlier inputs, so the
    # test above measures truncation, not an input that never mattered.
    model = RecurrentModel(2, 8, 2, seed=0)
    torch.nn.init.normal_(model.head.weight)
    w = _windows(steps=10)
    w.y[:5] = math.nan
    loss, _ = chunk_loss(model, w.x, w.y, w.state, clip=10)
    loss.backward()
    assert torch.count_nonzero(w.x.grad[:5]) > 0


def test_one_optimiser_step_per_chunk() -> None:
    model = RecurrentModel(2, 8, 1, seed=0)
    steps = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    w = _windows(steps=3 + 7)
    w.state = torch.zeros(3, 1, 2, 8)
    losses = tbptt_update(model, optimizer, w, burn_in_steps=3, tbptt_steps=3, clip=10, clip_norm=1)
    assert len(losses) == len(steps) == 3  # chunks of 3, 3 and 1 after 3 burn-in steps
