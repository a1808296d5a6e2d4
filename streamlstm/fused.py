"""The engine's fused step: one pass over each key's row for the elementwise work.

The plain step (``Engine._step_group``) is ~40 tensor operations per batched step, each
a pass over a few thousand keys' small vectors, plus a gather and a scatter of the rows
and an ``nn.LSTM`` call that copies the state in and out; together they cost more than
the network's matrix products. Here the keys' rows are worked on in place in the table
(no gather, no scatter): the scoring, the scaler, the forecasters and their combination,
the anomaly and drift statistics run in two C loops over the keys (``fused_step.c``:
before and after the network), and the network runs on packed weights
(:class:`~streamlstm.kernels.PackedLstm`): one C call (``fused_network``) that takes
the keys in sub-blocks of a few hundred through each layer's matrix product (torch's own
BLAS ``sgemm_``, called from C) and its cells (sigmoid and tanh from one vectorised
exponential, the state updated in the table), and the head; where that BLAS cannot be
found, one ``addmm`` per layer and one C loop over its cells.

The C file is compiled on first use (:mod:`streamlstm.native`); where that fails the
engine runs the plain path: the daemon never depends on a compiler. The plain path stays
the reference: ``tests/core/test_engine_fused.py`` checks both give the same outputs.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import torch

from streamlstm import anomaly, combine, native
from streamlstm.config import Settings
from streamlstm.kernels import PackedLstm
from streamlstm.model import RecurrentModel
from streamlstm.rows import RowLayout
from streamlstm.state import KeyedState
from streamlstm.steps import StepConsumer, StepRecord

_MODES = {"both": 0, "up": 1, "down": 2}
# Layout columns, in the order of the C file's COL_* (-1: absent).
_COLUMNS: tuple[str, ...] = (
    "mean",
    "var",
    "net_pending",
    "step",
    "hedge",
    "err_scales",
    "err_var",
    "count",
)
_COLUMNS += ("has_pending", "err_mean", "err_count", "err_peak", "err_since", "err_gap")
_COLUMNS += ("err_repeats", "ph_mean")
# The C functions' arguments: I an int64, P an address.
_SIGNATURES = {
    "fused_before": "IPIPPPPIPIPPPPPPP",
    "fused_after": "IPIPPPPIPI" + "P" * 14,
    "fused_take": "IIPIPIPI",
    "fused_lstm_cell": "IIPPIPIIIIPII",
    "fused_network": "IIIIPPPPPIIPPIPPIP",
    "fused_sweep": "IIPIPPPPIPI" + "P" * 7 + "IIPPPPPIIPP" + "P" * 8,
}
# Keys per pass through the whole step (before, each layer's product and cells, after): a
# block's rows, gates and activations (~2.5 MB at hidden 64) stay in cache from one pass
# to the next, where a batch's (~10 MB at 4,096 keys) are evicted in between on a busy
# machine. In one process, alternating, load 3-5: blocks of 512-1024 keys took 0.73-0.80x
# the time of a whole 4,096-key step per batch; 256 (more Python per key) 0.81x.
BLOCK = 1024
# Where torch's BLAS is found (``blas_gemm``), the C code passes over the keys in
# sub-blocks of NETWORK_BLOCK itself (fused_sweep: all passes; fused_network: the
# network's, with a learner attached), and the step's blocks are best whole. In one
# process, the variants rotating per batch (100k keys, batches of 4,096, load 4.3-5.3),
# with fused_sweep: blocks of 1,024 keys took 1.08-1.20x the time of whole (4,096) ones;
# sub-blocks of 128 keys 0.93-1.0x (median 0.98x) that of 256, 64 0.96-1.04x, 96 0.98-1.0x,
# 192 0.99-1.01x, 512 0.97-1.07x.
BLOCK_WITH_BLAS = 4096
NETWORK_BLOCK = 128


def load() -> ctypes.CDLL | None:
    """The compiled kernels (:func:`streamlstm.native.load`), their signatures declared;
    None if they cannot be built or loaded here (the engine then runs the plain path)."""
    lib = native.load()
    if lib is not None:
        native.declare(lib, _SIGNATURES, returns={"fused_after", "fused_sweep"})
    return lib


def blas_gemm() -> int | None:
    """The address of the BLAS ``sgemm_`` torch runs its matrix products with (MKL's, 32-bit
    integers), for ``fused_network`` to call; None where torch has no MKL or it cannot be
    found (the step then calls ``addmm`` per layer)."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).with_name("lib") / "libtorch_cpu.so"))
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


class FusedStep:
    """The fused step of one engine (its layout, settings and float LSTM model)."""

    def __init__(
        self, lib: ctypes.CDLL, model: RecurrentModel, layout: RowLayout, settings: Settings
    ) -> None:
        self.lib = lib
        self.lstm = PackedLstm(model)
        self.gemm = blas_gemm()
        self.block = BLOCK if self.gemm is None else BLOCK_WITH_BLAS
        self.network_block = NETWORK_BLOCK
        self.layout = layout
        cols = layout.columns
        starts = [cols[n].start if n in cols else -1 for n in _COLUMNS]
        rec = cols["recurrent"]  # then the state's columns, and those holding float16 pairs
        self.half = layout.recurrent_dtype == torch.float16
        halves = (rec.stop - rec.start) * self.half
        self.columns = np.array([*starts, rec.start, halves], np.int64)
        e, s, d = settings.engine, settings.state, settings.drift
        self.params = np.array(
            [
                e.input_clip,
                s.scaler_window,
                s.anomaly_short_alpha,
                s.anomaly_long_alpha,
                s.anomaly_min_events,
                math.nan if e.max_step is None else e.max_step,
                settings.model.inputs == "level",
                d.enabled,
                d.ph_delta,
                d.ph_threshold,
                d.ph_alpha,
                d.ph_min_instances,
                _MODES[d.ph_mode],
                combine.ETA,
                combine.LOSS_FLOOR,
                combine.DISCOUNT,
                combine.LOSS_CLIP,
                *anomaly.SCALES,
                anomaly.VAR_FLOOR,
                anomaly.SCALE,
                anomaly.MAX_VALUE_Z,
                anomaly.TESTS,
            ],
            np.float64,
        )
        if (len(combine.EXPERTS), len(anomaly.SCALES)) != (3, 3):  # K and S in the C file
            raise ValueError("fused_step.c is built for 3 forecasters and 3 anomaly scales")
        if e.max_step is not None and "step" not in cols:
            raise ValueError("engine.max_step needs the layout's step column")

    @classmethod
    def build(
        cls, model: RecurrentModel, layout: RowLayout, settings: Settings
    ) -> FusedStep | None:
        """The fused step where ``engine.fused`` is on, the model a float LSTM and the
        kernels build here; else None (the engine runs the plain step)."""
        if not settings.engine.fused or settings.model.quantize or model.cell != "lstm":
            return None
        if settings.engine.season_events is not None:  # four forecasters: the C file has 3
            return None
        lib = load()
        return None if lib is None else cls(lib, model, layout, settings)

    def group(
        self,
        store: KeyedState,
        s: torch.Tensor,
        x: torch.Tensor,
        positions: torch.Tensor,
        columns: list[torch.Tensor],
        learner: StepConsumer | None,
    ) -> None:
        """One batched step of distinct keys (slots ``s``, values ``x`` at ``positions`` of
        the chunk), in place in the store's rows, which are marked dirty; outputs written
        into ``columns`` (prediction, error, squared error, score, std-unit error, drift
        flag). A row that became non-finite (an overflow; a fault) is reset, counted. Runs
        in blocks of ``self.block`` keys (:data:`BLOCK`, or :data:`BLOCK_WITH_BLAS` where
        torch's BLAS is found; each block its own record for ``learner``)."""
        if not all(c.dtype == torch.float32 and c.is_contiguous() for c in columns):
            raise ValueError("the fused step writes float32, contiguous output columns")
        block = self.block
        for lo in range(0, len(s), block):
            hi = lo + block
            bad = self._step(store.table, s[lo:hi], x[lo:hi], positions[lo:hi], columns, learner)
            if len(bad):
                store.reset(bad, "non_finite")
        store.dirty[s] = True

    def _step(
        self,
        table: torch.Tensor,
        s: torch.Tensor,
        x: torch.Tensor,
        positions: torch.Tensor,
        columns: list[torch.Tensor],
        learner: StepConsumer | None,
    ) -> torch.Tensor:
        """:meth:`group` on the table; returns the slots whose rows became non-finite."""
        lib, layout = self.lib, self.layout
        n, width, f = len(s), layout.width, x.shape[1]
        # The C loops read raw float32 / int64 memory: make sure that is what they get.
        x, s = x.to(torch.float32).contiguous(), s.to(torch.int64).contiguous()
        positions = positions.to(torch.int64).contiguous()
        hidden = self.lstm.hidden
        xh = torch.empty(n, f + hidden)  # the first layer's input: [clipped input, hidden]
        # raw, change, std [n, f] each, then err, sq, std_err, score [n] each: one buffer
        scratch = np.empty(3 * n * f + 4 * n, np.float32)
        at = [scratch.ctypes.data + 4 * k for k in (0, n * f, 2 * n * f)]
        at += [at[2] + 4 * n * (f + k) for k in range(4)]  # err, sq, std_err, score
        table_at, s_at, xh_at, x_at = table.data_ptr(), s.data_ptr(), xh.data_ptr(), x.data_ptr()
        common = (n, table_at, width, s_at, self.columns.ctypes.data, self.params.ctypes.data)
        bad = np.zeros(n, np.uint8)
        outputs = (positions.data_ptr(), *(c.data_ptr() for c in columns), bad.ctypes.data)
        if learner is None and self.gemm is not None:  # the whole step in one C call
            net = _NetworkArgs(self)
            out = torch.empty(n, f)
            found = lib.fused_sweep(
                n, self.network_block, *common[1:], x_at, f, xh_at, f + hidden, *at,
                hidden, *net.args, out.data_ptr(), *outputs,
            )  # fmt: skip
        else:
            lib.fused_before(*common, x_at, f, xh_at, f + hidden, *at)
            if learner is not None:  # copies of the keys' state before the step, and counts
                rows = torch.empty(n, width)
                lib.fused_take(n, width, table_at, width, s_at, 0, rows.data_ptr(), width)
                count = layout.field(rows, "count")
                state = layout.field(rows, "recurrent").float()
                raw, change = torch.from_numpy(scratch[: 2 * n * f]).view(2, n, f)
                learner.record(StepRecord(s, raw, change, count, state, positions))
            out = self._network(table, s, xh, f)
            found = lib.fused_after(
                *common, x_at, f, xh_at, f + hidden, out.data_ptr(), *at[2:], *outputs
            )
        if found:
            return s[torch.from_numpy(bad.astype(bool))]
        return s[:0]

    def _network(
        self, table: torch.Tensor, s: torch.Tensor, xh: torch.Tensor, f: int
    ) -> torch.Tensor:
        """The LSTM step of the keys at slots ``s`` (their state updated in place in the
        table): ``fused_network``, or per layer one ``addmm`` for the gates and one C pass
        for the cells. ``xh`` holds the clipped inputs in its first ``f`` columns, then the
        first layer's hidden state. Returns the predicted next inputs [n, f]."""
        lib, lstm = self.lib, self.lstm
        lstm.refresh()
        n, width, h = len(s), table.shape[1], lstm.hidden
        rec = self.layout.columns["recurrent"].start  # (layer, part) at (2 * layer + part) * h
        table_at, s_at = table.data_ptr(), s.data_ptr()
        head = lstm.model.head
        if self.gemm is not None:
            out, net = torch.empty(n, f), _NetworkArgs(self)
            lib.fused_network(
                n, h, f, *net.args, table_at, width, s_at, xh.data_ptr(), self.network_block,
                out.data_ptr(),
            )  # fmt: skip
            return out
        inp = xh  # [inputs, the first layer's hidden state] (fused_before wrote both)
        for layer, (weight, bias) in enumerate(lstm.layers):
            gates = torch.addmm(bias, inp, weight)
            top = layer == len(lstm.layers) - 1
            dst = torch.empty(n, h if top else 2 * h)  # [h_new, next layer's h]: its input
            here = 2 * layer * h  # in the state's values
            lib.fused_lstm_cell(
                n, h, gates.data_ptr(), table_at, width, s_at, rec, self.half, here, here + h,
                dst.data_ptr(), dst.shape[1], -1 if top else here + 2 * h,
            )  # fmt: skip
            inp = dst
        return torch.addmm(head.bias, inp, head.weight.t()).add_(xh[:, :f])


class _NetworkArgs:
    """The network's arguments of ``fused_network`` / ``fused_sweep`` (after the hidden
    size): layers, BLAS, weights' and biases' addresses, head weight and bias, the state's
    first column, float16 flag, scratch; holding the arrays they point into."""

    def __init__(self, step: FusedStep) -> None:
        lstm = step.lstm
        lstm.refresh()
        head = lstm.model.head
        self.weights = np.array([w.data_ptr() for w, _ in lstm.layers], np.int64)
        self.biases = np.array([b.data_ptr() for _, b in lstm.layers], np.int64)
        self.head = head.weight.contiguous(), head.bias.contiguous()
        self.scratch = np.empty(step.network_block * 6 * lstm.hidden, np.float32)
        rec = step.layout.columns["recurrent"].start
        self.args = (
            len(lstm.layers), step.gemm, self.weights.ctypes.data, self.biases.ctypes.data,
            self.head[0].data_ptr(), self.head[1].data_ptr(), rec, step.half,
            self.scratch.ctypes.data,
        )  # fmt: skip
