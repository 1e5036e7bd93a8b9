"""The layer-stack core under both module families (gpurnn.LSTM/GRU/RNN and gpurnn.torch's):
parameter names and shapes, the layer x direction loop, initial and final states, lengths,
dropout between layers, and what a training forward keeps for backward. It knows no framework:
it computes on the NumPy or CuPy arrays the boundary (gpurnn.arrays) hands it, and the skins
turn its results into their own (the torch skin: one autograd boundary, gpurnn.torchops).

    stack = Stack("lstm", input_size=16, hidden_size=32, num_layers=2, bidirectional=True)
    run = Run(backend="numpy", xp=numpy)
    y, h_n, c_n, saved = stack.forward(run, x, params, h0, c0, masks)
    dx, dh0, dc0, grads = stack.backward(run, saved, params, dy, dh_n, dc_n)

A cell is a `Layer`: how one layer, one direction runs forward and backward, which parameters
it has, and what it saves. The kernel cells (gpurnn.cells.REGISTRY) are `KernelLayer`s; a
variant is a Layer subclass and one `register` call, and both module families run it by name.

What a forward saves is plain arrays (`Saved.arrays()`), so it can cross a framework boundary
(torch.library custom ops, whose saved values must be tensors) and be rebuilt on the other side
(`Stack.saved_from`).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import cells
from .arrays import check_dtype, check_shape
from .backends import Reserve, get_backend, reserve_dtypes

__all__ = ["Stack", "Run", "Saved", "Layer", "KernelLayer", "register", "layer_of", "LAYERS",
           "split_states", "draw_noise", "make_stack", "check_sizes"]


@dataclass
class Run:
    """One call's settings, shared by every layer: the resolved backend and its validated
    options, the array module (numpy or cupy), the per-sequence lengths (host int64 or None)
    and whether this is a training forward that keeps what backward needs."""
    backend: str
    xp: Any = np
    options: Optional[dict] = None
    lengths: Any = None
    need_saved: bool = True


class Layer:
    """One layer, one direction of a cell. Subclasses give `cell` (a gpurnn.cells.Cell: its
    states) and the four methods below; arrays are NumPy or CuPy (run.xp), time-major."""
    cell: cells.Cell

    def param_shapes(self, input_size, hidden_size, bias):
        """[(name, shape)] of one layer-direction, names without the _l{k}[_reverse] suffix,
        in registration (torch) order."""
        raise NotImplementedError

    def state_size(self, hidden_size):
        """R: the width of the recurrent state h and of y per direction (a projection's
        proj_size; H otherwise). A cell state c, where there is one, is always H wide."""
        return hidden_size

    def wavefront_cell(self, dtype):
        """The kernel cell the layer wavefront (gpurnn/kernels/wavefront.py) runs a whole
        unidirectional stack of this layer as, for x of `dtype`; None where it has none."""
        return None

    def init_bound(self, hidden_size):
        """Parameters are drawn from uniform(-bound, bound) (torch.nn's rule by default)."""
        return 1.0 / np.sqrt(hidden_size)

    def forward(self, run, x, params, h0, c0, reverse):
        """h0 (B, R), c0 (B, H) or None -> (y (T, B, R), h_n (B, R), c_n (B, H) or None, saved:
        tuple of arrays, () when not run.need_saved); R = state_size(H)."""
        raise NotImplementedError

    def backward(self, run, x, params, saved, reverse, dy, dh_n, dc_n):
        """-> (dx, dh0, dc0 or None, {param name: gradient})."""
        raise NotImplementedError

    def saved_specs(self, run, T, B, I, H, dtype):
        """[(shape, dtype)] of what forward saves (so a framework can allocate it abstractly,
        e.g. torch.compile's fake tensors). Must match forward's `saved` exactly."""
        raise NotImplementedError


class KernelLayer(Layer):
    """A cell of gpurnn.cells run by the backends (the NumPy reference, the cpu fast path, the
    CUDA kernels, the simulator)."""

    def __init__(self, name):
        self.cell = cells.get(name)

    def param_shapes(self, input_size, hidden_size, bias):
        G, H = self.cell.gates, hidden_size
        shapes = [("weight_ih", (G * H, input_size)), ("weight_hh", (G * H, H))]
        if bias:
            shapes += [("bias_ih", (G * H,)), ("bias_hh", (G * H,))]
        return shapes

    def _kept(self):
        return ("h",) + (("c",) if self.cell.has_cell_state else ()) + (
            ("gates",) if self.cell.reserve_gates else ())

    takes_noise = True          # zoneout and recurrent dropout (gpurnn.layernorm's contract)

    def wavefront_cell(self, dtype):
        return self.cell.name

    def forward(self, run, x, params, h0, c0, reverse, noise=None):
        extra = {"noise": noise} if noise else {}
        y, h_n, c_n, res = get_backend(run.backend).forward(
            self.cell.name, x, params["weight_ih"], params["weight_hh"], params.get("bias_ih"),
            params.get("bias_hh"), h0, c0, run.lengths, bool(reverse), run.need_saved,
            options=run.options, **extra)
        saved = () if res is None else tuple(getattr(res, k) for k in self._kept())
        return y, h_n, c_n, saved

    def backward(self, run, x, params, saved, reverse, dy, dh_n, dc_n, noise=None):
        kept = dict(zip(self._kept(), saved))
        h = kept["h"]
        reserve = Reserve(cell=self.cell.name, backend=run.backend, reverse=bool(reverse), x=x,
                          w_ih=params["weight_ih"], w_hh=params["weight_hh"],
                          has_bias="bias_ih" in params, lengths=run.lengths, h=h,
                          c=kept.get("c"), gates=kept.get("gates"),
                          storage=x.dtype if h.dtype != x.dtype else None,
                          **({"noise": noise} if noise else {}))
        g = get_backend(run.backend).backward(reserve, dy, dh_n, dc_n, options=run.options)
        grads = {"weight_ih": g.dw_ih, "weight_hh": g.dw_hh}
        if g.db_ih is not None:
            grads.update(bias_ih=g.db_ih, bias_hh=g.db_hh)
        return g.dx, g.dh0, g.dc0, grads

    def saved_specs(self, run, T, B, I, H, dtype):
        h_dt, c_dt, g_dt = reserve_dtypes(run.backend, dtype)
        specs = {"h": ((T + 1, B, H), h_dt), "c": ((T + 1, B, H), c_dt),
                 "gates": ((T, B, self.cell.reserve_gates * H), g_dt)}
        return [specs[k] for k in self._kept()]


LAYERS = {name: KernelLayer(name) for name in cells.CELLS}


def register(name, layer):
    """Make `layer` (a Layer) runnable by both module families under the cell name `name`."""
    if not isinstance(layer, Layer):
        raise TypeError(f"layer must be a gpurnn.stack.Layer; got {type(layer).__name__}")
    LAYERS[name] = layer
    return layer


def layer_of(name):
    """The Layer registered as `name`; the LSTM family's names (gpurnn.variants: e.g.
    'lstm_peephole', 'cifg', 'mlstm', 'lstm_proj64') register themselves on first use."""
    if isinstance(name, str) and name not in LAYERS:
        from . import layernorm  # noqa: F401  (registers layernorm_lstm)
        from .variants import layer_for
        if name not in LAYERS:
            layer_for(name)
    try:
        return LAYERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"cell must be one of {tuple(LAYERS)} or an LSTM variant of "
                         f"gpurnn.variants; got {name!r}") from None


@dataclass
class Saved:
    """What a training forward of a stack keeps: each layer's input (inputs[0] is x), what each
    layer-direction saved, and the dropout masks (None where no dropout ran)."""
    inputs: list
    saved: list                     # per layer * D + d: a tuple of arrays
    masks: list                     # per layer but the last: an array or None
    noise: Optional[list] = None    # per layer * D + d: the regularisers' masks (a dict) or None

    def arrays(self):
        """Everything but x as one flat list (x is the caller's own input)."""
        flat = list(self.inputs[1:])
        for s in self.saved:
            flat.extend(s)
        return flat


def _check_int(name, v, low):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}; got {v}")
    return int(v)


def check_sizes(input_size, hidden_size, num_layers, dropout):
    """(input_size, hidden_size, num_layers, dropout) checked as torch.nn's constructors check
    them (every stack core: Stack, gpurnn.feedback.FeedbackStack)."""
    sizes = (_check_int("input_size", input_size, 1), _check_int("hidden_size", hidden_size, 1),
             _check_int("num_layers", num_layers, 1))
    # any real number, as torch.nn (np.float32(0.25) included); NaN fails the range test
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a number in [0, 1]; got {dropout!r}")
    return sizes + (float(dropout),)


class Stack:
    """A stack of `num_layers` layers of one cell, each in one or two directions, with torch.nn's
    parameter names and the constructor checks both module families share."""

    def __init__(self, cell, input_size, hidden_size, num_layers=1, bias=True, dropout=0.0,
                 bidirectional=False, zoneout=None, recurrent_dropout=0.0):
        self.layer = layer_of(cell)
        self.cell = cell
        self.input_size, self.hidden_size, self.num_layers, self.dropout = check_sizes(
            input_size, hidden_size, num_layers, dropout)
        self.bias, self.bidirectional = bool(bias), bool(bidirectional)
        self.directions = 2 if self.bidirectional else 1
        self.states = self.layer.cell.states
        self.state_width = self.layer.state_size(self.hidden_size)   # R: h's features
        self.zoneout, self.recurrent_dropout = self._regularisers(zoneout, recurrent_dropout)

    def _regularisers(self, zoneout, recurrent_dropout):
        """((p_h, p_c) or (p_h,) or None, p) from the modules' keywords, checked."""
        def prob(name, v):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < 1:
                raise ValueError(f"{name} must be a number in [0, 1); got {v!r}")
            return float(v)
        has_c = self.layer.cell.has_cell_state
        if zoneout is not None:
            if has_c:
                if not isinstance(zoneout, (tuple, list)) or len(zoneout) != 2:
                    raise ValueError(f"zoneout for {self.cell} must be a pair (p_h, p_c); got "
                                     f"{zoneout!r}")
                zoneout = (prob("zoneout p_h", zoneout[0]), prob("zoneout p_c", zoneout[1]))
            else:
                if isinstance(zoneout, (tuple, list)):
                    raise ValueError(f"zoneout for {self.cell} is one probability p_h (it has no "
                                     f"cell state); got {zoneout!r}")
                zoneout = (prob("zoneout", zoneout),)
            if not any(zoneout):
                zoneout = None
        recurrent_dropout = prob("recurrent_dropout", recurrent_dropout)
        if (zoneout or recurrent_dropout) and not getattr(self.layer, "takes_noise", False):
            raise ValueError(f"zoneout and recurrent_dropout are not supported for {self.cell}")
        return zoneout, recurrent_dropout

    # ---- parameters --------------------------------------------------------------------
    @staticmethod
    def suffix(layer, d):
        return f"_l{layer}" + ("_reverse" if d else "")

    def layer_input_size(self, layer):
        return self.input_size if layer == 0 else self.state_width * self.directions

    def param_shapes(self):
        """[(name, shape)] of every parameter, in torch.nn's registration order (layer,
        direction, then the layer's own order), names as torch's state_dict keys."""
        out = []
        for layer in range(self.num_layers):
            for d in range(self.directions):
                sfx = self.suffix(layer, d)
                out += [(name + sfx, shape) for name, shape in self.layer.param_shapes(
                    self.layer_input_size(layer), self.hidden_size, self.bias)]
        return out

    def _of(self, params, layer, d):
        sfx = self.suffix(layer, d)
        names = [n for n, _ in self.layer.param_shapes(self.layer_input_size(layer),
                                                       self.hidden_size, self.bias)]
        return {n: params[n + sfx] for n in names}

    def state_shape(self, batch, state="h"):
        """(L*D, B, R) for h, (L*D, B, H) for the cell state c."""
        width = self.hidden_size if state == "c" else self.state_width
        return (self.num_layers * self.directions, batch, width)

    def mask_shapes(self, steps, batch):
        """Shapes of the dropout masks a training forward takes (between layers)."""
        if self.dropout == 0:
            return []
        return [(steps, batch, self.state_width * self.directions)] * (self.num_layers - 1)

    def noise_specs(self, steps, batch, training):
        """What the regularisers need for one forward, per layer-direction: {key: (shape, rule,
        p)} (gpurnn.layernorm's keys) or None, with rule 'zoneout' (1 with probability p),
        'fill' (every value p: evaluation's expectation) or 'dropout' (0 with probability p,
        else 1/(1-p)). The skins draw them, in this order, from their generator."""
        if self.zoneout is None and not self.recurrent_dropout:
            return None
        R, H = self.state_width, self.hidden_size
        spec = {}
        if self.recurrent_dropout and training:
            spec["recurrent"] = ((batch, R), "dropout", self.recurrent_dropout)
        if self.zoneout is not None:
            rule = "zoneout" if training else "fill"
            for key, width, p in zip(("zoneout_h", "zoneout_c"), (R, H), self.zoneout):
                if p:
                    spec[key] = ((steps, batch, width), rule, p)
        if not spec:
            return None
        return [dict(spec) for _ in range(self.num_layers * self.directions)]

    # ---- forward / backward --------------------------------------------------------------
    def _wavefront(self, run, x, masks, noise):
        """The cell the whole stack runs as in one layer-wavefront launch (gpurnn/kernels/
        wavefront.py) instead of a launch per layer, or None: a unidirectional stack of a cell
        the wavefront runs (Layer.wavefront_cell: the kernel cells and the kernel-cell LSTM
        variants) with no dropout masks between layers and no regularisers, on a backend whose
        plan chooses it (the cuda backend where the stack fits and is predicted faster; any
        kernel backend when backend_options={'wavefront': True})."""
        cell = self.layer.wavefront_cell(x.dtype)
        if (cell is None or self.directions != 1 or self.num_layers < 2
                or any(m is not None for m in (masks or [])) or (noise and any(noise))):
            return None
        choose = getattr(get_backend(run.backend), "use_wavefront", None)
        if choose is not None and choose(cell, self.input_size, self.hidden_size, x.shape[1],
                                         self.num_layers, x.shape[0], x.dtype, run.options):
            return cell
        return None

    def _layers(self, params):
        return [self._of(params, layer, 0) for layer in range(self.num_layers)]

    def check_states(self, x, states, names):
        """`states` (h0[, c0]) each None or (L*D, B, R) / (L*D, B, H) in x's dtype."""
        for state, name, s in zip(("h", "c"), names, states):
            if s is not None:
                want = self.state_shape(x.shape[1], state)
                form = "(L*D, B, H)" if want[2] == self.hidden_size else "(L*D, B, proj_size)"
                check_shape(name, s, want, form)
                check_dtype(name, s, x.dtype, "the dtype of x")

    def forward(self, run, x, params, h0=None, c0=None, masks=None, noise=None):
        """x (T, B, I); params: name -> array; h0 (L*D, B, R), c0 (L*D, B, H) or None (zeros);
        masks: one array (T, B, D*R) per layer but the last, or None (no dropout); noise: per
        layer-direction a dict of regulariser masks (noise_specs, gpurnn.layernorm) or None. Returns
        (y (T, B, D*R), h_n (L*D, B, R), c_n or None, Saved or None); R = state_width."""
        xp, D, H, R = run.xp, self.directions, self.hidden_size, self.state_width
        check_shape("x", x, (x.shape[0], x.shape[1], self.input_size), "(T, B, input_size)")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected at least one step and one "
                             f"sequence")
        self.check_states(x, (h0, c0), ("h0", "c0"))
        if noise and any(noise) and not getattr(self.layer, "takes_noise", False):
            raise ValueError(f"zoneout and recurrent_dropout are not supported for {self.cell}")
        B = x.shape[1]
        has_c = self.layer.cell.has_cell_state
        wave = self._wavefront(run, x, masks, noise)
        if wave is not None:
            y, h_n, c_n, reserves, outputs = get_backend(run.backend).stack_forward(
                wave, x, self._layers(params), h0, c0, run.lengths, run.need_saved,
                options=run.options)
            keep = (Saved([x] + list(outputs[:-1]), list(reserves), [None] * (self.num_layers - 1))
                    if run.need_saved else None)
            return y, h_n, c_n, keep
        zeros_h = xp.zeros((B, R), x.dtype) if h0 is None else None
        zeros_c = xp.zeros((B, H), x.dtype) if has_c and c0 is None else None
        inputs, saved, h_n, c_n = [x], [], [], []
        masks = list(masks) if masks else [None] * (self.num_layers - 1)
        layer_input = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                i = layer * D + d
                h = zeros_h if h0 is None else h0[i]
                c = None if not has_c else (zeros_c if c0 is None else c0[i])
                extra = {"noise": noise[i]} if noise and noise[i] else {}
                y, hn, cn, s = self.layer.forward(run, layer_input, self._of(params, layer, d),
                                                  h, c, bool(d), **extra)
                outs.append(y)
                saved.append(s)
                h_n.append(hn)
                if cn is not None:
                    c_n.append(cn)
            out = outs[0] if D == 1 else xp.concatenate(outs, axis=2)
            if layer < self.num_layers - 1:
                if masks[layer] is not None:
                    out = out * masks[layer]
                inputs.append(out)
            layer_input = out
        keep = Saved(inputs, saved, masks, list(noise) if noise else None) if run.need_saved else None
        return layer_input, xp.stack(h_n), xp.stack(c_n) if c_n else None, keep

    def backward(self, run, saved, params, dy, dh_n=None, dc_n=None):
        """Gradients of one forward's outputs. dy (T, B, D*R); dh_n (L*D, B, R), dc_n
        (L*D, B, H) or None.
        Returns (dx, dh0, dc0 or None, {name: gradient}). Nothing is written: a failure leaves
        `saved` as it was, so the same call can be retried."""
        xp, D, H, L, R = run.xp, self.directions, self.hidden_size, self.num_layers, self.state_width
        x = saved.inputs[0]
        T, B = x.shape[0], x.shape[1]
        check_shape("dy", dy, (T, B, D * R), "(T, B, D*H)" if R == H else "(T, B, D*proj_size)")
        check_dtype("dy", dy, x.dtype, "the dtype of x")
        self.check_states(x, (dh_n, dc_n), ("dh_n", "dc_n"))
        has_c = self.layer.cell.has_cell_state
        wave = self._wavefront(run, x, saved.masks, saved.noise)
        if wave is not None:
            dx, dh0, dc0, per_layer = get_backend(run.backend).stack_backward(
                wave, x, self._layers(params), (saved.saved, saved.inputs[1:]), run.lengths,
                dy, dh_n, dc_n, options=run.options)
            grads = {name + self.suffix(layer, 0): g
                     for layer, g_l in enumerate(per_layer) for name, g in g_l.items()}
            return dx, dh0, dc0, grads
        zeros_h, zeros_c = xp.zeros((B, R), x.dtype), xp.zeros((B, H), x.dtype)
        grads, dh0, dc0 = {}, [None] * (L * D), [None] * (L * D)
        grad_out = dy
        for layer in reversed(range(L)):
            if layer < L - 1 and saved.masks[layer] is not None:
                grad_out = grad_out * saved.masks[layer]
            grad_in = None
            for d in range(D):
                i = layer * D + d
                dh = zeros_h if dh_n is None else dh_n[i]
                dc = (zeros_c if dc_n is None else dc_n[i]) if has_c else None
                gy = grad_out if D == 1 else grad_out[:, :, d * R:(d + 1) * R]
                extra = {"noise": saved.noise[i]} if saved.noise and saved.noise[i] else {}
                dx, g_h0, g_c0, g = self.layer.backward(
                    run, saved.inputs[layer], self._of(params, layer, d), saved.saved[i], bool(d),
                    xp.ascontiguousarray(gy), xp.ascontiguousarray(dh),
                    None if dc is None else xp.ascontiguousarray(dc), **extra)
                grad_in = dx if grad_in is None else grad_in + dx
                dh0[i], dc0[i] = g_h0, g_c0
                sfx = self.suffix(layer, d)
                grads.update((name + sfx, v) for name, v in g.items())
            grad_out = grad_in
        return grad_out, xp.stack(dh0), xp.stack(dc0) if has_c else None, grads

    # ---- what crosses a framework boundary -------------------------------------------------
    def saved_specs(self, run, steps, batch, dtype):
        """[(shape, dtype)] of Saved.arrays() for a forward of x (steps, batch, input_size)."""
        D, H = self.directions, self.hidden_size
        specs = [((steps, batch, D * self.state_width), np.dtype(dtype))] * (self.num_layers - 1)
        for layer in range(self.num_layers):
            for _ in range(D):
                specs += self.layer.saved_specs(run, steps, batch, self.layer_input_size(layer),
                                                H, dtype)
        return specs

    def saved_from(self, x, arrays, masks, noise=None):
        """The Saved that `Saved.arrays()` flattened (x, the masks and the noise given back
        separately)."""
        arrays = list(arrays)
        L, D = self.num_layers, self.directions
        inputs = [x] + arrays[:L - 1]
        rest = arrays[L - 1:]
        per = len(rest) // (L * D) if rest else 0
        saved = [tuple(rest[i * per:(i + 1) * per]) for i in range(L * D)]
        masks = list(masks) if masks else [None] * (L - 1)
        return Saved(inputs, saved, masks, list(noise) if noise else None)


def draw_noise(specs, uniform, fill, cast):
    """The regularisers' masks of Stack.noise_specs, drawn in order: uniform(shape) gives
    U[0, 1) values from the skin's generator, fill(shape, p) a constant array, cast(a) the
    array in the compute dtype on the right device. Works on NumPy arrays and torch tensors."""
    if specs is None:
        return None
    out = []
    for spec in specs:
        drawn = {}
        for key, (shape, rule, p) in spec.items():
            if rule == "fill":
                drawn[key] = cast(fill(shape, p))
            elif rule == "zoneout":
                drawn[key] = cast((uniform(shape) < p) * 1.0)
            else:
                drawn[key] = cast((uniform(shape) >= p) * (1.0 / (1.0 - p)))
        out.append(drawn)
    return out


def make_stack(cell, input_size, hidden_size, num_layers=1, bias=True, dropout=0.0,
                bidirectional=False, zoneout=None, recurrent_dropout=0.0):
    """The stack core of `cell`: a Stack of layers, or, for the gated-feedback cells whose
    layers cannot run one at a time (gpurnn.feedback), a FeedbackStack with the same interface."""
    if isinstance(cell, str) and cell.startswith("gf_"):
        from .feedback import FeedbackStack
        return FeedbackStack(cell, input_size, hidden_size, num_layers, bias, dropout,
                             bidirectional, zoneout, recurrent_dropout)
    return Stack(cell, input_size, hidden_size, num_layers, bias, dropout, bidirectional,
                 zoneout, recurrent_dropout)


def split_states(facts, hx, names=("h0", "c0", "hx")):
    """(h, c) from torch.nn's hx: a tuple (h, c) for cells with a cell state, else one array.
    `facts` is the cell's gpurnn.cells.Cell (a stack's `layer.cell`); `names` are what the
    messages call the arguments (backward passes its own). Shapes are checked by the stack;
    this only checks the form."""
    if hx is None:
        return None, None
    if facts.has_cell_state:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"{names[2]} for {facts.torch_class} must be a tuple ({names[0]}, "
                            f"{names[1]}); got {type(hx).__name__}")
        for name, s in zip(names, hx):
            if s is None:
                raise TypeError(f"{name} must be an array of shape (L*D, B, H); got None (pass "
                                f"{names[2]}=None for zeros in both)")
        return hx[0], hx[1]
    if isinstance(hx, (tuple, list)):
        raise TypeError(f"{names[2]} for {facts.torch_class} must be an array of shape "
                        f"(L*D, B, H); got a {type(hx).__name__}")
    return hx, None

