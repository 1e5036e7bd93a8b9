"""The LSTM family beyond torch.nn.LSTM, each one a `Layer` of the stack core (gpurnn.stack):
peephole connections, the coupled input-forget gate (CIFG), the multiplicative LSTM and the
projection (torch.nn.LSTM's proj_size). The math is written down here once; every backend runs
it through the same two entry points (`lstm_forward`, `lstm_backward`, below).

Notation as gpurnn.cells (torch gate conventions, sigma = sigmoid, x W^T as torch); R is the
width of the recurrent state h: proj_size when projecting, else H.
  plain       gates = x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh   (i, f, g, o; W_hh (4H, R))
              c_t = f*c_{t-1} + i*g ; h_t = o*tanh(c_t)
  peephole    i = sigma(.. + w_ci*c_{t-1}), f = sigma(.. + w_cf*c_{t-1}),
              o = sigma(.. + w_co*c_t)  -- the output gate sees the new cell
              (Gers & Schmidhuber 2000); weight_ch = [w_ci; w_cf; w_co] (3H,)
  coupled     gates i, g, o only (W (3H, .)), f = 1 - i (Greff et al. 2017, CIFG);
              with peephole: weight_ch = [w_ci; w_co] (2H,)
  mlstm       m_t = (x_t W_mx^T) * (h_{t-1} W_mh^T)  (W_mx (H, I), W_mh (H, H), no bias);
              gates = x W_ih^T + b_ih + m_t W_hh^T + b_hh (Krause et al. 2016)
  proj_size   h_t = (o*tanh(c_t)) W_hr^T, W_hr (R, H) (torch.nn.LSTM's proj_size); h_n has R
              features, c_n H. With the plain, peephole and coupled cells (not mlstm).

What a training forward saves (`saved_specs`, the same layout on every backend; float32 and
float64 only):
  h      (T+1, B, R)  boundary states, the convention of gpurnn.cells (h0 at h[0] forward,
                      h[T] reverse; masked steps t >= lengths[b] copy h and c through)
  c      (T+1, B, H)  cell states, the same convention
  gates  (T, B, G*H)  activated gates, time order: [i, f, g, o], coupled [i, g, o]
  mx, mh (T, B, H)    mlstm only: x_t W_mx^T and h_{t-1} W_mh^T of each step
(With a projection, o*tanh(c_t) is recomputed from gates and c by the backward.)

Backend entry points (each backend module has both; arrays are NumPy or CuPy, C-contiguous,
validated by the stack; params are a layer-direction's {name: array} of `param_shapes`, names
without the _l{k} suffix, biases absent with bias=False):
    lstm_forward(form, x, params, h0 (B, R), c0 (B, H), lengths, reverse, need_saved,
                 *, options=None) -> (y (T, B, R), h_n (B, R), c_n (B, H), saved tuple | None)
    lstm_backward(form, x, params, saved, lengths, reverse, dy (T, B, R), dh_n (B, R),
                  dc_n (B, H), *, options=None) -> (dx, dh0, dc0, {param name: gradient})
Like every backend call, they never write into an argument.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import cells
from .stack import LAYERS, Layer, register

__all__ = ["LSTMForm", "VariantLayer", "form_of", "layer_for", "lstm_form", "layer_flops", "DTYPES"]

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class LSTMForm:
    """Which LSTM: the flags of the module docstring. `name` is the stack's cell name."""
    peephole: bool = False
    coupled: bool = False
    multiplicative: bool = False
    proj_size: int = 0

    def __post_init__(self):
        if self.multiplicative and (self.peephole or self.coupled or self.proj_size):
            raise ValueError("the multiplicative LSTM (mlstm) takes no peephole, coupled or "
                             "proj_size")
        p = self.proj_size
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0:
            raise ValueError(f"proj_size must be an int >= 0; got {p!r}")

    @property
    def base(self):
        """The cell without its projection: lstm, lstm_peephole, cifg, cifg_peephole, mlstm."""
        if self.multiplicative:
            return "mlstm"
        return ("cifg" if self.coupled else "lstm") + ("_peephole" if self.peephole else "")

    @property
    def name(self):
        return self.base + (f"_proj{self.proj_size}" if self.proj_size else "")

    @property
    def kernel_cell(self):
        """The per-unit math the kernels run (gpurnn.kernels.cellmath): mlstm's is lstm's."""
        return "lstm" if self.multiplicative else self.base

    @property
    def gates(self):
        """G: 3 for the coupled cell (i, g, o), else 4 (i, f, g, o)."""
        return 3 if self.coupled else 4

    @property
    def peepholes(self):
        """How many peephole vectors weight_ch holds: [ci, cf, co] or, coupled, [ci, co]."""
        return 0 if not self.peephole else (2 if self.coupled else 3)

    def state_size(self, hidden_size):
        """R: the width of h (and of y per direction)."""
        return self.proj_size or hidden_size

    def param_shapes(self, input_size, hidden_size, bias):
        G, H, R = self.gates, hidden_size, self.state_size(hidden_size)
        shapes = [("weight_ih", (G * H, input_size)), ("weight_hh", (G * H, R))]
        if bias:
            shapes += [("bias_ih", (G * H,)), ("bias_hh", (G * H,))]
        if self.peephole:
            shapes.append(("weight_ch", (self.peepholes * H,)))
        if self.proj_size:
            shapes.append(("weight_hr", (R, H)))
        if self.multiplicative:
            shapes += [("weight_mx", (H, input_size)), ("weight_mh", (H, H))]
        return shapes

    def saved_specs(self, T, B, I, H, dtype):
        """[(name, shape, dtype)] of what a training forward saves, in order."""
        dt = np.dtype(dtype)
        R = self.state_size(H)
        specs = [("h", (T + 1, B, R), dt), ("c", (T + 1, B, H), dt),
                 ("gates", (T, B, self.gates * H), dt)]
        if self.multiplicative:
            specs += [("mx", (T, B, H), dt), ("mh", (T, B, H), dt)]
        return specs


def lstm_form(hidden_size, proj_size=0, *, peephole=False, coupled=False):
    """The LSTMForm of the LSTM modules' keywords, with torch.nn.LSTM's proj_size checks."""
    form = LSTMForm(peephole=peephole, coupled=coupled, proj_size=proj_size)
    if form.proj_size and isinstance(hidden_size, (int, np.integer)) and form.proj_size >= hidden_size:
        raise ValueError(f"proj_size has to be smaller than hidden_size; got proj_size="
                         f"{proj_size}, hidden_size={hidden_size}")
    return form


def layer_flops(form, steps, batch, input_size, hidden, *, backward=False):
    """FLOPs of one layer and direction of `form`, on gpurnn.planning's model (multiply-add = 2,
    the kernel cell's POINTWISE_FLOPS per row and unit, backward 3x the forward): the gate
    products x W_ih^T and (h or m) W_hh^T, plus the projection (o*tanh c) W_hr^T and the
    multiplicative LSTM's x W_mx^T, h W_mh^T and its product m = mx*mh. For LSTMForm() it is
    planning.layer_flops('lstm', ...)."""
    from .planning.cost import POINTWISE_FLOPS
    G, H, R = form.gates, hidden, form.state_size(hidden)
    macs = G * H * input_size + G * H * R
    if form.proj_size:
        macs += R * H
    if form.multiplicative:
        macs += H * input_size + H * R
    pointwise = POINTWISE_FLOPS[form.kernel_cell] + (1 if form.multiplicative else 0)
    fwd = steps * batch * (2 * macs + pointwise * H)
    return 3 * fwd if backward else fwd


_NAME = re.compile(r"(lstm|lstm_peephole|cifg|cifg_peephole|mlstm)(?:_proj([1-9][0-9]*))?")


def form_of(name):
    """The LSTMForm whose `name` is `name`, or None when it names no LSTM variant."""
    m = _NAME.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        return None
    base, proj = m.group(1), int(m.group(2) or 0)
    return LSTMForm(peephole=base.endswith("_peephole"), coupled=base.startswith("cifg"),
                    multiplicative=base == "mlstm", proj_size=proj)


class VariantLayer(Layer):
    """One layer-direction of an LSTM variant, run by the backends' lstm_forward/backward."""
    dtypes = DTYPES

    def __init__(self, form):
        self.form = form
        self.cell = cells.Cell(form.name, form.gates, form.gates, "LSTM", states=("h", "c"))

    def param_shapes(self, input_size, hidden_size, bias):
        return self.form.param_shapes(input_size, hidden_size, bias)

    def state_size(self, hidden_size):
        return self.form.state_size(hidden_size)

    def wavefront_cell(self, dtype):
        """Every form runs as a layer wavefront (gpurnn.backends.cuda.wavefront_modules: the
        kernel-cell variants lstm_peephole, cifg, cifg_peephole with the plain cells, the
        projections and the mLSTM on their own kernels), in float32 / float64."""
        return self.form.name if np.dtype(dtype).name in DTYPES else None

    @staticmethod
    def _check_dtype(x):
        if np.dtype(x.dtype).name not in DTYPES:
            raise TypeError(f"x has dtype {x.dtype}; the LSTM variants run in {DTYPES} "
                            f"(16-bit storage is for the plain cells)")

    def forward(self, run, x, params, h0, c0, reverse):
        from .backends import get_backend
        self._check_dtype(x)
        y, h_n, c_n, saved = get_backend(run.backend).lstm_forward(
            self.form, x, params, h0, c0, run.lengths, bool(reverse), run.need_saved,
            options=run.options)
        return y, h_n, c_n, (tuple(saved) if saved is not None else ())

    def backward(self, run, x, params, saved, reverse, dy, dh_n, dc_n):
        from .backends import get_backend
        return get_backend(run.backend).lstm_backward(
            self.form, x, params, tuple(saved), run.lengths, bool(reverse), dy, dh_n, dc_n,
            options=run.options)

    def saved_specs(self, run, T, B, I, H, dtype):
        return [(shape, dt) for _, shape, dt in self.form.saved_specs(T, B, I, H, dtype)]


def layer_for(name):
    """The registered Layer of variant `name`, registering it on first use; None when `name`
    names no LSTM variant."""
    if name in LAYERS:
        return LAYERS[name]
    form = form_of(name)
    if form is None or form.name == "lstm":
        return None
    return register(form.name, VariantLayer(form))
