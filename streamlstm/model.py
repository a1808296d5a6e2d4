"""The recurrent network: stacked LSTM (or GRU) layers and a next-step head.

The network predicts the next event's normalised values as a correction to the
current ones (``x_t + head(h_t)``). The head starts at zero, so an untrained model
is the persistence forecast, and learning only has to explain what changes.

Recurrent state is one tensor of shape ``[batch, layers, parts, hidden]``, where
``parts`` is 2 for an LSTM (hidden, cell) and 1 for a GRU (hidden). The state store
keeps one contiguous row of exactly this layout per key, so gathering a batch of keys
is one index operation that reads each key's state from one place in memory.

>>> import torch
>>> net = RecurrentModel(input_size=3, hidden_size=8, num_layers=2, cell="lstm")
>>> state = net.initial_state(batch=4)
>>> prediction, state = net.step(torch.zeros(4, 3), state)
>>> tuple(prediction.shape), tuple(state.shape)
((4, 3), (4, 2, 2, 8))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from streamlstm.config import ModelSettings

Cell = Literal["lstm", "gru"]


class RecurrentModel(nn.Module):
    """Stacked LSTM/GRU with dropout between layers and a residual linear head."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        num_layers: int = 2,
        cell: Cell = "lstm",
        dropout: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            self._build(input_size, hidden_size, num_layers, cell, dropout)

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> RecurrentModel:
        """The model as ``model.*`` configures it (seeded by ``model.seed``): the one way
        the engine, the trainers and pretraining build it, so they all train and serve
        the same network (dropout included)."""
        if settings.input_size is None:
            raise ValueError("model.input_size is not set")
        return cls(
            settings.input_size,
            settings.hidden_size,
            settings.num_layers,
            settings.cell,
            settings.dropout,
            settings.seed,
        )

    def _build(
        self, input_size: int, hidden_size: int, num_layers: int, cell: Cell, dropout: float
    ) -> None:
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.cell = cell
        self.parts = 2 if cell == "lstm" else 1
        rnn_class = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_class(
            input_size, hidden_size, num_layers, dropout=dropout if num_layers > 1 else 0.0
        )
        self.head = nn.Linear(hidden_size, input_size)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """Per-key state shape: (layers, parts, hidden)."""
        return (self.num_layers, self.parts, self.hidden_size)

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Zero state for ``batch`` keys: ``[batch, layers, parts, hidden]``."""
        return torch.zeros(batch, self.num_layers, self.parts, self.hidden_size, device=device)

    def _run(self, seq: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # nn.LSTM wants [layers, batch, hidden] per part; the store keeps keys as rows.
        parts = state.permute(2, 1, 0, 3)
        if self.cell == "lstm":
            out, (h, c) = self.rnn(seq, (parts[0].contiguous(), parts[1].contiguous()))
            return out, torch.stack((h, c), dim=2).permute(1, 0, 2, 3)
        out, h = self.rnn(seq, parts[0].contiguous())
        return out, h.unsqueeze(2).permute(1, 0, 2, 3)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance B independent streams by one event.

        x: ``[B, F]`` normalised inputs; state: ``[B, layers, parts, hidden]``.
        Returns the predicted next inputs ``[B, F]`` and the new state.
        """
        out, new_state = self._run(x.unsqueeze(0), state)
        return x + self.head(out[0]), new_state

    def forward(self, seq: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a sequence for training.

        seq: ``[T, B, F]`` normalised inputs; state: ``[B, layers, parts, hidden]``.
        Returns next-step predictions ``[T, B, F]`` and the final state.
        """
        out, new_state = self._run(seq, state)
        return seq + self.head(out), new_state

    def describe(self) -> dict[str, int | str]:
        """Architecture as plain values, stored in checkpoints to refuse mismatches."""
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "cell": self.cell,
        }


def flops_per_event(input_size: int, hidden_size: int, num_layers: int, cell: Cell) -> int:
    """Multiply-add FLOPs of one inference step for one key (gates + head)."""
    gates = 4 if cell == "lstm" else 3
    total = 0
    for layer in range(num_layers):
        fan_in = input_size if layer == 0 else hidden_size
        total += 2 * gates * hidden_size * (fan_in + hidden_size)
    return total + 2 * hidden_size * input_size


def quantize_for_inference(model: RecurrentModel) -> RecurrentModel:
    """Int8 dynamic quantization of the recurrent and linear layers (CPU inference): a
    copy of the same class with its layers swapped, so ``step`` works unchanged."""
    from torch.ao.quantization import quantize_dynamic

    quantized = quantize_dynamic(model, {nn.LSTM, nn.GRU, nn.Linear}, dtype=torch.qint8)
    assert isinstance(quantized, RecurrentModel)
    return quantized
