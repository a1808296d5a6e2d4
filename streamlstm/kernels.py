"""The engine's fused one-step LSTM: the same arithmetic as ``nn.LSTM``, in fewer operations.

``nn.LSTM`` called for one time step repacks its weights, permutes and copies the state
in and out of ``[layers, batch, hidden]`` tensors and stacks the result, which costs
about as much as the matrix products themselves at the engine's sizes. Here each
layer's weights are packed once: ``[W_ih | W_hh]`` transposed into one ``[in + H, 4H]``
matrix with the gates reordered to (input, forget, output, cell) and the two biases
summed, so a layer is one ``addmm`` on ``[x, h]``, one sigmoid over three gates, one
tanh, and an update written straight into the key's state row (a view of the gathered
rows: no copies of the state). Results equal ``nn.LSTM``'s to float32 rounding
(``tests/core/test_engine_fused.py``).

>>> net = RecurrentModel(input_size=3, hidden_size=8, num_layers=2)
>>> state = torch.randn(4, 2, 2, 8)
>>> expected, expected_state = net.step(torch.ones(4, 3), state)
>>> out = PackedLstm(net).step_(torch.ones(4, 3), state)  # updates state in place
>>> bool(torch.allclose(out, expected, atol=1e-6))
True
>>> bool(torch.allclose(state, expected_state, atol=1e-6))
True
"""

from __future__ import annotations

import torch

from streamlstm.model import RecurrentModel


class PackedLstm:
    """A float LSTM model's inference step with packed weights (rebuilt when they change)."""

    def __init__(self, model: RecurrentModel) -> None:
        if model.cell != "lstm":
            raise ValueError("PackedLstm packs LSTM layers only")
        self.model = model
        self.hidden = model.hidden_size
        self._params = list(model.rnn.parameters())
        self._packed_for: tuple[int, ...] = ()
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pack()

    def _stamp(self) -> tuple[int, ...]:
        """Storage and in-place version of every LSTM parameter: a changed stamp means the
        packed copies are stale (``load_state_dict`` copies in place)."""
        return (*(p.data_ptr() for p in self._params), *(p._version for p in self._params))

    @torch.no_grad()
    def _pack(self) -> None:
        h = self.hidden
        # nn.LSTM's gate order is (i, f, g, o); (i, f, o, g) puts the three sigmoid gates side
        # by side, so one sigmoid covers them.
        ranges = (torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h))
        order = torch.cat(ranges)
        rnn = self.model.rnn
        self.layers = []
        for layer in range(self.model.num_layers):
            w_ih = getattr(rnn, f"weight_ih_l{layer}")
            w_hh = getattr(rnn, f"weight_hh_l{layer}")
            bias = getattr(rnn, f"bias_ih_l{layer}") + getattr(rnn, f"bias_hh_l{layer}")
            weight = torch.cat([w_ih, w_hh], 1)[order].t().contiguous()
            self.layers.append((weight, bias[order].contiguous()))
        self._packed_for = self._stamp()

    def refresh(self) -> None:
        """Repack if the model's weights changed since packing (e.g. ``load_state_dict``)."""
        if self._stamp() != self._packed_for:
            self._pack()

    def step_(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Advance B keys one event: x ``[B, F]``, state ``[B, layers, 2, H]`` (any strides,
        e.g. a view into gathered state rows) updated in place. Returns the predicted next
        inputs ``[B, F]``, as :meth:`RecurrentModel.step`."""
        self.refresh()
        h = self.hidden
        inp = x
        for layer, (weight, bias) in enumerate(self.layers):
            hidden, cell = state[:, layer, 0], state[:, layer, 1]
            gates = torch.addmm(bias, torch.cat([inp, hidden], 1), weight)
            sig = gates[:, : 3 * h].sigmoid_()
            candidate = gates[:, 3 * h :].tanh_()
            cell.mul_(sig[:, h : 2 * h]).addcmul_(sig[:, :h], candidate)
            inp = torch.tanh(cell).mul_(sig[:, 2 * h :])
            hidden.copy_(inp)
        head = self.model.head
        return torch.addmm(head.bias, inp, head.weight.t()).add_(x)
