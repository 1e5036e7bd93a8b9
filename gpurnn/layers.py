"""Framework-free multi-layer LSTM / GRU / RNN with torch.nn's constructor, parameters and
state-dict keys, a training forward that keeps reserves, and an explicit backward.

    m = gpurnn.LSTM(16, 32, num_layers=2, bidirectional=True)
    y, (h_n, c_n) = m(x)                      # x (T, B, I), or (B, T, I) with batch_first
    dx, (dh0, dc0) = m.backward(dy, (dh_n, dc_n))
    m.grads["weight_hh_l0_reverse"]           # accumulated; m.zero_grad() clears

Dropout follows torch: on the outputs of every layer but the last, only in training mode, with
inverted scaling; never on the recurrence. Its masks are drawn from the module's own
generator (`seed`) and kept for backward.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from . import functional as F
from .arrays import _cupy
from .backends import BACKENDS, is_device_array, resolve
from .cells import GATES, rnn_cell
from .kernels.dtypes import numpy_dtype

_SEED_TYPES = (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)


def _to_numpy(name, value):
    if hasattr(value, "detach"):                       # torch tensor, any device
        value = value.detach().cpu().numpy()
    elif is_device_array(value) and hasattr(value, "get"):
        value = value.get()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"state_dict[{name!r}] cannot be converted to an array: "
                        f"{type(value).__name__}") from exc


class _RNNBase:
    cell = ""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, *, dtype="float32", backend="auto", seed=None):
        for name, v, low in (("input_size", input_size, 1), ("hidden_size", hidden_size, 1),
                             ("num_layers", num_layers, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int; got {type(v).__name__}")
            if v < low:
                raise ValueError(f"{name} must be >= {low}; got {v}")
        # any real number, as torch.nn (np.float32(0.25) included); NaN fails the range test
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1]; got {dropout!r}")
        dtype = numpy_dtype(dtype)      # float32, float64, float16 or bfloat16 (ml_dtypes)
        if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")
        if seed is not None and not isinstance(seed, _SEED_TYPES):
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise TypeError(f"seed must be None, a non-negative int or a numpy.random "
                                f"Generator / BitGenerator / SeedSequence; got "
                                f"{type(seed).__name__} {seed!r}")
            if seed < 0:
                raise ValueError(f"seed must be a non-negative int; got {seed}")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bias, self.batch_first, self.bidirectional = bool(bias), bool(batch_first), bool(bidirectional)
        self.dropout = float(dropout)
        self.dtype = dtype
        self.backend = backend
        self.training = True
        self._rng = np.random.default_rng(seed)
        self._saved = None
        k = 1.0 / np.sqrt(self.hidden_size)
        self._params = OrderedDict()
        for key, shape in self._param_shapes():
            self._params[key] = self._rng.uniform(-k, k, size=shape).astype(dtype)
        self.grads = OrderedDict((key, np.zeros_like(v)) for key, v in self._params.items())

    # ---- parameters -------------------------------------------------------------------
    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def _param_shapes(self):
        G, H = GATES[self.cell], self.hidden_size
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else H * self.num_directions
            for d in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                yield f"weight_ih{sfx}", (G * H, in_size)
                yield f"weight_hh{sfx}", (G * H, H)
                if self.bias:
                    yield f"bias_ih{sfx}", (G * H,)
                    yield f"bias_hh{sfx}", (G * H,)

    def state_dict(self):
        """Copies of the parameters under torch's keys."""
        return OrderedDict((k, v.copy()) for k, v in self._params.items())

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters from anything NumPy can convert (e.g. torch CPU tensors). All or
        nothing: a bad entry raises before any parameter changes."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of parameter names to arrays (what "
                            f"state_dict() returns); got {type(state_dict).__name__}")
        expected = dict(self._param_shapes())
        unknown = sorted(set(state_dict) - set(expected))
        missing = sorted(set(expected) - set(state_dict))
        if strict and (unknown or missing):
            raise ValueError(f"state_dict keys do not match: missing {missing}, unexpected {unknown}")
        new = {}
        for key, value in state_dict.items():
            if key not in expected:
                continue
            arr = _to_numpy(key, value)
            if arr.shape != expected[key]:
                raise ValueError(f"state_dict[{key!r}] has shape {arr.shape}; expected {expected[key]}")
            if not np.issubdtype(arr.dtype, np.floating):
                raise TypeError(f"state_dict[{key!r}] has dtype {arr.dtype}; expected a float dtype")
            new[key] = np.ascontiguousarray(arr, dtype=self.dtype)
        self._params.update(new)

    def parameters(self):
        return list(self._params.values())

    def zero_grad(self):
        for g in self.grads.values():
            g[...] = 0

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def __repr__(self):
        extra = "".join(f", {k}={getattr(self, k)}" for k in ("num_layers", "bias", "batch_first",
                                                              "dropout", "bidirectional")
                        if getattr(self, k) != {"num_layers": 1, "bias": True, "batch_first": False,
                                                "dropout": 0.0, "bidirectional": False}[k])
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}{extra})"

    # ---- forward / backward -----------------------------------------------------------
    def _split_hx(self, hx, B, device, names=("h0", "c0", "hx")):
        """(h0, c0) from hx (torch's form), each (L*D, B, H) or None; c0 is None except LSTM;
        converted to the arrays the backend computes on (NumPy, or CuPy when `device`).
        `names` are what the messages call the arguments (backward passes its own)."""
        shape = (self.num_layers * self.num_directions, B, self.hidden_size)
        if hx is None:
            return None, None
        if self.cell == "lstm":
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{names[2]} for LSTM must be a tuple ({names[0]}, {names[1]}); "
                                f"got {type(hx).__name__}")
            pairs = zip(names[:2], hx)
        else:
            if isinstance(hx, (tuple, list)):
                raise TypeError(f"{names[2]} for {type(self).__name__} must be an array of shape "
                                f"(L*D, B, H) = {shape}; got a {type(hx).__name__}")
            pairs = [(names[2], hx)]
        out = []
        for name, a in pairs:
            if not hasattr(a, "shape"):
                raise TypeError(f"{name} must be an array of shape (L*D, B, H) = {shape}; "
                                f"got {type(a).__name__}")
            if tuple(a.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(a.shape)}; expected (L*D, B, H) = {shape}")
            a = F._as_array(name, a, device)      # a torch tensor's dtype is then NumPy's too
            if a.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {a.dtype}; expected {self.dtype} (the module's dtype)")
            out.append(a)
        return (out[0], out[1]) if self.cell == "lstm" else (out[0], None)

    def _device_params(self, backend):
        if backend != "cuda":
            return self._params
        import cupy
        return {k: cupy.asarray(v) for k, v in self._params.items()}

    def __call__(self, x, hx=None, lengths=None):
        return self.forward(x, hx, lengths)

    def forward(self, x, hx=None, lengths=None):
        """torch.nn semantics: LSTM returns y, (h_n, c_n); GRU and RNN return y, h_n."""
        if not hasattr(x, "shape"):
            # a nested list (or another array-like without a dtype) is read in the module's dtype
            try:
                x = np.asarray(x, dtype=self.dtype)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"x must be an array or a nested list of numbers; got a "
                                f"{type(x).__name__} NumPy cannot read as {self.dtype} ({exc})") from exc
        if len(x.shape) != 3:
            raise ValueError(f"x must have 3 dimensions ({'(B, T, I)' if self.batch_first else '(T, B, I)'}); "
                             f"got shape {tuple(x.shape)}")
        if self.cell == "lstm" and isinstance(hx, (tuple, list)) and len(hx) == 2:
            named = {"x": x, "h0": hx[0], "c0": hx[1]}
        else:
            named = {"x": x, "hx": hx if not isinstance(hx, (tuple, list)) else None}
        backend = resolve(self.backend, named)
        device = backend == "cuda"
        xp = _cupy("x") if device else np
        x = F._as_array("x", x, device)
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype}; expected {self.dtype} (the module's dtype)")
        if x.shape[2] != self.input_size:
            raise ValueError(f"x has {x.shape[2]} features; expected input_size = {self.input_size}")
        if self.batch_first:
            x = x.transpose(1, 0, 2)
        x = xp.ascontiguousarray(x)
        B = x.shape[1]
        h0_all, c0_all = self._split_hx(hx, B, device)
        params = self._device_params(backend)
        D = self.num_directions
        training = self.training
        layer_input = x
        reserves, masks, h_n, c_n = [], [], [], []
        for layer in range(self.num_layers):
            outs, layer_res = [], []
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                idx = layer * D + d
                y, hn, cn, res = F.forward(
                    self.cell, layer_input, params[f"weight_ih{sfx}"], params[f"weight_hh{sfx}"],
                    params.get(f"bias_ih{sfx}"), params.get(f"bias_hh{sfx}"),
                    None if h0_all is None else h0_all[idx],
                    None if c0_all is None else c0_all[idx],
                    lengths, reverse=bool(d), training=training, backend=backend)
                outs.append(y)
                layer_res.append(res)
                h_n.append(hn)
                if cn is not None:
                    c_n.append(cn)
            out = outs[0] if D == 1 else xp.concatenate(outs, axis=2)
            mask = None
            if training and self.dropout > 0 and layer < self.num_layers - 1:
                keep = 1.0 - self.dropout
                draw = self._rng.random(out.shape) < keep if keep > 0 else np.zeros(out.shape, bool)
                mask = xp.asarray((draw / keep if keep > 0 else draw).astype(self.dtype))
                out = out * mask
            reserves.append(layer_res)
            masks.append(mask)
            layer_input = out
        y = layer_input.transpose(1, 0, 2) if self.batch_first else layer_input
        h_n = xp.stack(h_n)
        self._saved = (reserves, masks, backend) if training else None
        if self.cell == "lstm":
            return y, (h_n, xp.stack(c_n))
        return y, h_n

    def backward(self, dy, dhx=None):
        """Back-propagate through the last training forward. dy is shaped like y; dhx like the
        returned state (a tuple for LSTM) or None. Returns (dx, dhx); parameter gradients are
        added into self.grads."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward in training mode first (call m.train() "
                               "and run forward; each forward feeds one backward)")
        reserves, masks, backend = self._saved
        T, B, _, _ = reserves[0][0].shape
        H, D, L = self.hidden_size, self.num_directions, self.num_layers
        device = backend == "cuda"
        xp = _cupy("dy") if device else np
        want = (B, T, D * H) if self.batch_first else (T, B, D * H)
        if dy is None:
            raise TypeError(f"dy must be an array of the shape of y = {want}; got None (pass "
                            f"zeros where the loss does not depend on y)")
        resolve(backend, {"dy": dy})
        dy = F._as_array("dy", dy, device)
        if tuple(dy.shape) != want:
            raise ValueError(f"dy has shape {tuple(dy.shape)}; expected the shape of y = {want}")
        if dy.dtype != self.dtype:
            raise TypeError(f"dy has dtype {dy.dtype}; expected {self.dtype} (the module's dtype)")
        if self.batch_first:
            dy = dy.transpose(1, 0, 2)
        dh_all, dc_all = self._split_hx(dhx, B, device, names=("dh_n", "dc_n", "dhx"))
        # Nothing moves until every layer's backward has succeeded: the parameter gradients are
        # collected here and added at the end, and if a layer fails the reserves already used
        # in this call are handed back (backends never write into a reserve), so the same
        # call can be retried and the forward's work is not lost.
        new_grads = {}
        used = []
        dh0, dc0 = [None] * (L * D), [None] * (L * D)
        grad_out = dy
        try:
            for layer in reversed(range(L)):
                if masks[layer] is not None:
                    grad_out = grad_out * masks[layer]
                grad_in = None
                for d in range(D):
                    sfx = f"_l{layer}" + ("_reverse" if d else "")
                    idx = layer * D + d
                    g = F.backward(reserves[layer][d],
                                   xp.ascontiguousarray(grad_out[:, :, d * H:(d + 1) * H]),
                                   None if dh_all is None else dh_all[idx],
                                   None if dc_all is None else dc_all[idx])
                    used.append(reserves[layer][d])
                    grad_in = g.dx if grad_in is None else grad_in + g.dx
                    dh0[idx], dc0[idx] = g.dh0, g.dc0
                    for key, val in ((f"weight_ih{sfx}", g.dw_ih), (f"weight_hh{sfx}", g.dw_hh),
                                     (f"bias_ih{sfx}", g.db_ih), (f"bias_hh{sfx}", g.db_hh)):
                        if val is not None:
                            new_grads[key] = val.get() if device else val
                grad_out = grad_in
        except BaseException:
            for reserve in used:
                reserve.consumed = False
            raise
        for key, val in new_grads.items():
            self.grads[key] += val
        self._saved = None          # each forward feeds one backward
        dx = grad_out.transpose(1, 0, 2) if self.batch_first else grad_out
        if self.cell == "lstm":
            return dx, (xp.stack(dh0), xp.stack(dc0))
        return dx, xp.stack(dh0)


class LSTM(_RNNBase):
    """Multi-layer LSTM (gate order i, f, g, o), torch.nn.LSTM's constructor and keys."""
    cell = "lstm"


class GRU(_RNNBase):
    """Multi-layer GRU (gate order r, z, n; b_hn inside the reset product), as torch.nn.GRU."""
    cell = "gru"


class RNN(_RNNBase):
    """Multi-layer Elman RNN, nonlinearity 'tanh' or 'relu', as torch.nn.RNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, **kwargs):
        self.cell = rnn_cell(nonlinearity)
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, **kwargs)
