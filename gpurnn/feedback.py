"""The gated-feedback RNN (Chung, Gulcehre, Cho, Bengio 2015, arXiv 1502.02367): a stack of L
layers, all of hidden size H, where every layer's candidate sees every layer's previous state
through a learned scalar gate per (source layer, target layer, sequence). The math, the
parameters and what a forward saves are written down here once; the NumPy reference
(gpurnn/backends/numpy_feedback.py) is the oracle, `FeedbackStack` the object the module skins
run (the interface of gpurnn.stack.Stack where the skins use it).

Notation: h_t^0 = x_t (dropped out: the masked input, see below); h*_{t-1} = [h_{t-1}^1; ...;
h_{t-1}^L] (L*H); layers j = 1..L, source layers i = 1..L; sigma is the logistic sigmoid.
  global reset gate   g^{i->j} = sigma(w_g^{i->j} . h_t^{j-1} + u_g^{i->j} . h*_{t-1} + beta^{i->j})
  feedback            fb^j = sum_i g^{i->j} U^{i->j} h_{t-1}^i
  gf_rnn_tanh/relu    h_t^j = f(W^j h_t^{j-1} + b_ih + b_hh + fb^j)          f = tanh | relu
  gf_gru (r, z, n)    r, z = sigma(W_i{r,z} h_t^{j-1} + b_i{r,z} + W_h{r,z} h_{t-1}^j + b_h{r,z})
                      n = tanh(W_in h_t^{j-1} + b_in + r * (fb^j + b_hn))
                      h_t^j = (1 - z) * n + z * h_{t-1}^j
  gf_lstm (i, f, g, o) i, f, o = sigma(W_i. h_t^{j-1} + b_i. + b_h. + W_h. h_{t-1}^j)
                      g = tanh(W_ig h_t^{j-1} + b_ig + b_hg + fb^j)
                      c_t^j = f * c_{t-1}^j + i * g ; h_t^j = o * tanh(c_t^j)
Only the candidate (the RNN's single gate, GRU's n, LSTM's g) takes the gated feedback; the
other gates see the layer's own previous state, as in torch.nn.

Parameters of layer j (suffix _l{j-1}, 0-based as torch; registered in this order); in_j is
input_size for the first layer, H otherwise; G = 1, 3, 4 for gf_rnn_*, gf_gru, gf_lstm:
  weight_ih (G*H, in_j)   every gate's input rows, torch's gate order
  weight_hh               GRU (2H, H) rows r, z; LSTM (3H, H) rows i, f, o; RNN: none
  bias_ih, bias_hh (G*H,) all G*H rows (the candidate's included)
  weight_fb (H, L*H)      [U^{1->j} ... U^{L->j}], the candidate's feedback weights
  weight_gx (L, in_j)     row i: w_g^{i->j}
  weight_gh (L, L*H)      row i: u_g^{i->j}
  bias_g (L,)             beta^{i->j}
bias=False drops every bias (beta included). Unidirectional only: the feedback couples every
layer's previous state, so there is no per-layer recurrence a reverse direction could run.

Dropout (as torch.nn): on h_t^{j-1} entering layer j > 1; the caller gives one fixed (T, B, H)
mask per layer but the first; the masked value is layer j's input (weight_ih and weight_gx
both read it); the feedback h*_{t-1} and y are never masked.
Lengths (B,): a padded step (t >= lengths[b]) copies every layer's h (and c) through and
outputs y = 0; padded x, whatever it holds (NaN), reaches no output and no gradient.
Returns y (T, B, H) (the top layer's h), h_n (L, B, H) and, gf_lstm only, c_n (L, B, H).

What a training forward saves (a tuple, x and the masks excluded: the caller has them):
  h       (T+1, B, L*H)  boundary states of every layer, h*-form: h[t] is h*_{t-1} of step t
                         (h[0] = the initial states), layer l (0-based) at [..., l*H:(l+1)*H];
                         padded steps copy the state through
  c       (T+1, B, L*H)  gf_lstm only: the cell states, same layout
  gates   (T, B, L*4*H)  gf_gru [r, z, n, hn] (hn = fb + b_hn), gf_lstm [i, f, g, o], activated,
                         layer l at [..., 4*H*l : 4*H*(l+1)]; gf_rnn_*: none (the derivative of
                         tanh and relu is read off h)
  fbgate  (T, B, L*L)    the global reset gates, fbgate[t, b, j*L + i] = g^{i->j} (0-based)
  gf_rnn_*: (h, fbgate); gf_gru: (h, gates, fbgate); gf_lstm: (h, c, gates, fbgate).
"""
from __future__ import annotations


import numpy as np

from . import cells
from .arrays import check_dtype, check_shape
from .stack import check_sizes

__all__ = ["FeedbackStack", "FeedbackLayer", "CELLS", "DTYPES", "BACKENDS", "param_shapes",
           "saved_specs", "plain_cell", "stack_flops"]

CELLS = ("gf_rnn_tanh", "gf_rnn_relu", "gf_gru", "gf_lstm")
DTYPES = ("float32", "float64")
BACKENDS = ("numpy", "cpu", "sim", "cuda")     # the backends that run the gated-feedback cells

# the cells' facts; torch_class names the module family the skins build (GFRNN/GFGRU/GFLSTM)
FACTS = {
    "gf_rnn_tanh": cells.Cell("gf_rnn_tanh", 1, 0, "GFRNN", {"nonlinearity": "tanh"}),
    "gf_rnn_relu": cells.Cell("gf_rnn_relu", 1, 0, "GFRNN", {"nonlinearity": "relu"}),
    "gf_gru": cells.Cell("gf_gru", 3, 4, "GFGRU"),
    "gf_lstm": cells.Cell("gf_lstm", 4, 4, "GFLSTM", states=("h", "c")),
}
# rows of weight_hh (the gates that are not the candidate) and the candidate's gate index
HH_GATES = {"gf_rnn_tanh": 0, "gf_rnn_relu": 0, "gf_gru": 2, "gf_lstm": 3}
CANDIDATE = {"gf_rnn_tanh": 0, "gf_rnn_relu": 0, "gf_gru": 2, "gf_lstm": 2}


def stack_flops(cell, steps, batch, input_size, hidden, num_layers, *, backward=False):
    """FLOPs of a gated-feedback stack on gpurnn.planning's model (multiply-add 2 FLOPs, the
    plain cell's POINTWISE_FLOPS per row and unit, backward 3x the forward): per layer the
    input rows weight_ih and weight_gx, the own-state rows weight_hh, the feedback weight_fb and
    the gate rows weight_gh against h*, plus per gate pair a sigmoid and a scale of the
    feedback (2 + H)."""
    from .planning.cost import POINTWISE_FLOPS
    G, H, L = FACTS[check_cell(cell)].gates, hidden, num_layers
    total = 0
    for layer in range(L):
        width = input_size if layer == 0 else H
        macs = G * H * width + HH_GATES[cell] * H * H + H * L * H + L * width + L * L * H
        total += 2 * macs + POINTWISE_FLOPS[plain_cell(cell)] * H + L * (2 + H)
    fwd = steps * batch * total
    return 3 * fwd if backward else fwd


def plain_cell(cell):
    """The gpurnn.cells name of the cell a GF cell reduces to when only U^{j->j} is on and
    every gate is 1 ('gf_lstm' -> 'lstm')."""
    return {"gf_rnn_tanh": "rnn_tanh", "gf_rnn_relu": "rnn_relu", "gf_gru": "gru",
            "gf_lstm": "lstm"}[check_cell(cell)]


def check_cell(cell):
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
    return cell


def param_shapes(cell, input_size, hidden_size, num_layers, bias, layer):
    """[(name, shape)] of layer `layer` (0-based), names without the _l{k} suffix, in
    registration order."""
    G, H, L = FACTS[check_cell(cell)].gates, hidden_size, num_layers
    in_j = input_size if layer == 0 else H
    shapes = [("weight_ih", (G * H, in_j))]
    if HH_GATES[cell]:
        shapes.append(("weight_hh", (HH_GATES[cell] * H, H)))
    if bias:
        shapes += [("bias_ih", (G * H,)), ("bias_hh", (G * H,))]
    shapes += [("weight_fb", (H, L * H)), ("weight_gx", (L, in_j)), ("weight_gh", (L, L * H))]
    if bias:
        shapes.append(("bias_g", (L,)))
    return shapes


def saved_specs(cell, steps, batch, num_layers, hidden_size, dtype):
    """[(name, shape, dtype)] of the saved tuple (the module docstring's layout)."""
    T, B, L, H = steps, batch, num_layers, hidden_size
    dt = np.dtype(dtype)
    specs = [("h", (T + 1, B, L * H), dt)]
    if FACTS[check_cell(cell)].has_cell_state:
        specs.append(("c", (T + 1, B, L * H), dt))
    if FACTS[cell].reserve_gates:
        specs.append(("gates", (T, B, L * FACTS[cell].reserve_gates * H), dt))
    specs.append(("fbgate", (T, B, L * L), dt))
    return specs


class FeedbackLayer:
    """The per-layer facts the skins read off `stack.layer`: `cell` (a gpurnn.cells.Cell), the
    dtypes it runs in, the init bound and the state width. Not a gpurnn.stack.Layer: a GF layer
    cannot run on its own (its candidate reads every layer's previous state)."""
    dtypes = DTYPES
    takes_noise = False

    def __init__(self, cell):
        self.cell = FACTS[check_cell(cell)]

    def init_bound(self, hidden_size):
        return 1.0 / np.sqrt(hidden_size)

    def state_size(self, hidden_size):
        return hidden_size


def _backend(run):
    """The module running the GF cells on run.backend: the NumPy reference on 'numpy' and
    'cpu' (the cpu backend checks its own options first), the whole-stack kernels
    (gpurnn/kernels/feedback.py) on 'sim' and 'cuda'; each has feedback_forward/backward."""
    if run.backend not in BACKENDS:
        raise ValueError(f"the gated-feedback cells run on the backends {BACKENDS}; got "
                         f"backend {run.backend!r}")
    from .backends import check_options, get_backend
    check_options(run.backend, run.options)
    if run.backend in ("numpy", "cpu"):
        from .backends import numpy_feedback
        return numpy_feedback
    return get_backend(run.backend)


class FeedbackStack:
    """A gated-feedback stack with gpurnn.stack.Stack's interface where the module skins use it
    (attributes, param_shapes, state_shape, mask_shapes, noise_specs, check_states, forward,
    backward, saved_specs, saved_from). `zoneout` and `recurrent_dropout` are accepted only
    off, so the skins can pass Stack's arguments unchanged."""

    def __init__(self, cell, input_size, hidden_size, num_layers=1, bias=True, dropout=0.0,
                 bidirectional=False, zoneout=None, recurrent_dropout=0.0):
        self.layer = FeedbackLayer(cell)
        self.cell = cell
        self.input_size, self.hidden_size, self.num_layers, self.dropout = check_sizes(
            input_size, hidden_size, num_layers, dropout)
        if bidirectional:
            raise ValueError(f"bidirectional=True is not supported for {cell}: the gated "
                             f"feedback couples every layer's previous state (h*_{{t-1}}), so a "
                             f"reverse direction has no per-layer recurrence to run backwards")
        if zoneout is not None or (recurrent_dropout is not None and recurrent_dropout != 0):
            raise ValueError(f"zoneout and recurrent_dropout are not supported for {cell}; got "
                             f"zoneout={zoneout!r}, recurrent_dropout={recurrent_dropout!r}")
        self.bias, self.bidirectional = bool(bias), False
        self.directions = 1
        self.states = self.layer.cell.states
        self.state_width = self.hidden_size
        self.zoneout, self.recurrent_dropout = None, 0.0

    # ---- parameters --------------------------------------------------------------------
    @staticmethod
    def suffix(layer, d=0):
        return f"_l{layer}"

    def layer_input_size(self, layer):
        return self.input_size if layer == 0 else self.hidden_size

    def param_shapes(self):
        """[(name, shape)] of every parameter in registration order (layer, then the layer's
        own order of the module docstring), names with the _l{k} suffix."""
        return [(name + self.suffix(layer), shape) for layer in range(self.num_layers)
                for name, shape in param_shapes(self.cell, self.input_size, self.hidden_size,
                                                self.num_layers, self.bias, layer)]

    def state_shape(self, batch, state="h"):
        """(L, B, H) for h and for the cell state c."""
        return (self.num_layers, batch, self.hidden_size)

    def mask_shapes(self, steps, batch):
        """Shapes of the dropout masks a training forward takes: one per layer but the first
        (on the input of layers 2..L)."""
        if self.dropout == 0:
            return []
        return [(steps, batch, self.hidden_size)] * (self.num_layers - 1)

    def noise_specs(self, steps, batch, training):
        """No regulariser but dropout: None."""
        return None

    # ---- forward / backward --------------------------------------------------------------
    def check_states(self, x, states, names):
        """`states` (h0[, c0]) each None or (L, B, H) in x's dtype."""
        for state, name, s in zip(("h", "c"), names, states):
            if s is not None:
                check_shape(name, s, self.state_shape(x.shape[1], state), "(L, B, H)")
                check_dtype(name, s, x.dtype, "the dtype of x")

    def _check_x(self, x):
        check_shape("x", x, (x.shape[0], x.shape[1], self.input_size), "(T, B, input_size)")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected at least one step and one "
                             f"sequence")
        if np.dtype(x.dtype).name not in DTYPES:
            raise TypeError(f"x has dtype {x.dtype}; the gated-feedback cells run in {DTYPES}")

    def _own(self, params):
        """This stack's parameters out of `params` (the reference names any that are missing)."""
        return {n: params[n] for n, _ in self.param_shapes() if n in params}

    def _masks(self, masks):
        masks = list(masks) if masks else []
        return masks if any(m is not None for m in masks) else None

    def forward(self, run, x, params, h0=None, c0=None, masks=None, noise=None):
        """x (T, B, I); params: name -> array; h0, c0 (L, B, H) or None (zeros); masks: one
        (T, B, H) array per layer but the first, or None. Returns (y (T, B, H), h_n (L, B, H),
        c_n (L, B, H) or None, gpurnn.stack.Saved or None)."""
        from .stack import Saved
        self._check_x(x)
        self.check_states(x, (h0, c0), ("h0", "c0"))
        if noise and any(noise):
            raise ValueError(f"zoneout and recurrent_dropout are not supported for {self.cell}")
        mod = _backend(run)
        masks = self._masks(masks)
        y, h_n, c_n, saved = mod.feedback_forward(
            self.cell, x, self._own(params), h0, c0, run.lengths,
            masks, run.need_saved, options=run.options if run.backend != "cpu" else None)
        keep = None
        if run.need_saved:
            keep = Saved([x], [saved], list(masks) if masks else [None] * (self.num_layers - 1))
        return y, h_n, c_n, keep

    def backward(self, run, saved, params, dy, dh_n=None, dc_n=None):
        """Gradients of one forward's outputs: dy (T, B, H); dh_n, dc_n (L, B, H) or None.
        Returns (dx, dh0, dc0 or None, {name: gradient}); writes nothing."""
        x = saved.inputs[0]
        T, B = x.shape[0], x.shape[1]
        check_shape("dy", dy, (T, B, self.hidden_size), "(T, B, H)")
        check_dtype("dy", dy, x.dtype, "the dtype of x")
        self.check_states(x, (dh_n, dc_n), ("dh_n", "dc_n"))
        mod = _backend(run)
        return mod.feedback_backward(
            self.cell, x, self._own(params), saved.saved[0],
            run.lengths, self._masks(saved.masks), dy, dh_n, dc_n,
            options=run.options if run.backend != "cpu" else None)

    # ---- what crosses a framework boundary -------------------------------------------------
    def saved_specs(self, run, steps, batch, dtype):
        """[(shape, dtype)] of Saved.arrays() for a forward of x (steps, batch, input_size)."""
        return [(shape, dt) for _, shape, dt in saved_specs(
            self.cell, steps, batch, self.num_layers, self.hidden_size, dtype)]

    def saved_from(self, x, arrays, masks, noise=None):
        """The Saved that `Saved.arrays()` flattened (x and the masks given back separately)."""
        from .stack import Saved
        if noise and any(noise):
            raise ValueError(f"zoneout and recurrent_dropout are not supported for {self.cell}")
        masks = list(masks) if masks else [None] * (self.num_layers - 1)
        return Saved([x], [tuple(arrays)], masks)
