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
import re
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .arrays import Call, check_dtype, cupy, host_copy, kind_of, lengths_array
from .backends import BACKENDS, check_options
from .cells import rnn_cell
from .kernels.dtypes import numpy_dtype
from .stack import Run, draw_noise, make_stack, split_states
from .variants import lstm_form

_SEED_TYPES = (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence)


def _device_index(device):
    """'cpu' -> None; 'cuda' / 'cuda:N' -> N (0 by default); anything else a ValueError."""
    if device == "cpu":
        return None
    m = re.fullmatch(r"cuda(?::(\d+))?", str(device))
    if m is None:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}")
    return int(m.group(1) or 0)


class RNNBase:
    """The NumPy/CuPy skin over gpurnn.stack.Stack. Subclasses name the cell (`cell`)."""
    cell = ""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, *, dtype="float32", backend="auto", seed=None,
                 device="cpu", zoneout=None, recurrent_dropout=0.0):
        self._stack = make_stack(self.cell, input_size, hidden_size, num_layers, bias, dropout,
                                 bidirectional, zoneout, recurrent_dropout)
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
        st = self._stack
        allowed = getattr(st.layer, "dtypes", None)
        if allowed is not None and np.dtype(dtype).name not in allowed:
            raise TypeError(f"dtype must be one of {allowed} for {self.cell}; got "
                            f"{np.dtype(dtype).name}")
        self.input_size, self.hidden_size, self.num_layers = st.input_size, st.hidden_size, st.num_layers
        self.bias, self.batch_first, self.bidirectional = st.bias, bool(batch_first), st.bidirectional
        self.dropout = st.dropout
        # as given: (p_h, p_c) for the LSTMs, p_h for GRU and RNN
        self.zoneout = st.zoneout if st.zoneout is None or len(st.zoneout) == 2 else st.zoneout[0]
        self.recurrent_dropout = st.recurrent_dropout
        self.dtype = dtype
        self.backend = backend
        self.training = True
        self.device = "cpu"
        self._rng = np.random.default_rng(seed)
        self._saved = None
        k = st.layer.init_bound(self.hidden_size)
        self._params = OrderedDict()
        initial = getattr(st.layer, "initial_value", lambda name, shape, dtype: None)
        for key, shape in st.param_shapes():
            fixed = initial(key.rsplit("_l", 1)[0], shape, dtype)
            self._params[key] = (fixed if fixed is not None else
                                 self._rng.uniform(-k, k, size=shape).astype(dtype))
        self.grads = OrderedDict((key, np.zeros_like(v)) for key, v in self._params.items())
        self.to(device)

    # ---- parameters -------------------------------------------------------------------
    @property
    def num_directions(self):
        return self._stack.directions

    def _xp(self):
        return np if self.device == "cpu" else cupy("the module's parameters")

    def to(self, device):
        """Move the parameters and gradients to `device` ('cpu', 'cuda' or 'cuda:N'); they
        stay there: forward and backward on the 'cuda' backend copy nothing host<->device.
        Returns the module."""
        index = _device_index(device)
        if index is None:
            move = lambda a: a if isinstance(a, np.ndarray) else a.get()   # noqa: E731
        else:
            cp = cupy("to('cuda')")

            def move(a):
                with cp.cuda.Device(index):
                    return cp.asarray(a)
        self._params = OrderedDict((k, move(v)) for k, v in self._params.items())
        self.grads = OrderedDict((k, move(v)) for k, v in self.grads.items())
        self.device = "cpu" if index is None else f"cuda:{index}"
        self._saved = None
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self, index=0):
        return self.to(f"cuda:{index}")

    def state_dict(self):
        """Host (NumPy) copies of the parameters under torch's keys."""
        return OrderedDict((k, host_copy(k, v)) for k, v in self._params.items())

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters from anything NumPy can convert (e.g. torch tensors, CuPy arrays);
        they land on the module's device. All or nothing: a bad entry raises before any
        parameter changes."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of parameter names to arrays (what "
                            f"state_dict() returns); got {type(state_dict).__name__}")
        expected = dict(self._stack.param_shapes())
        unknown = sorted(set(state_dict) - set(expected))
        missing = sorted(set(expected) - set(state_dict))
        if strict and (unknown or missing):
            raise ValueError(f"state_dict keys do not match: missing {missing}, unexpected {unknown}")
        new = {}
        for key, value in state_dict.items():
            if key not in expected:
                continue
            try:
                arr = host_copy(f"state_dict[{key!r}]", value)
            except TypeError as exc:
                raise TypeError(f"state_dict[{key!r}] cannot be converted to an array: "
                                f"{type(value).__name__}") from exc
            if arr.shape != expected[key]:
                raise ValueError(f"state_dict[{key!r}] has shape {arr.shape}; expected {expected[key]}")
            if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
                raise TypeError(f"state_dict[{key!r}] has dtype {arr.dtype}; expected a float dtype")
            new[key] = self._xp().asarray(np.ascontiguousarray(arr, dtype=self.dtype))
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
        for k in ("proj_size", "peephole", "coupled", "zoneout", "recurrent_dropout"):
            if getattr(self, k, 0):
                extra += f", {k}={getattr(self, k)}"
        if self.device != "cpu":
            extra += f", device={self.device!r}"
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size}{extra})"

    # ---- forward / backward -----------------------------------------------------------
    def _call(self, named, backend):
        """Classify this call's arrays (gpurnn.arrays.Call), with the module's device as one
        of them: a device array into a host module (or the reverse) is a TypeError."""
        arg = next((n for n, a in named.items() if a is not None), "x")
        kind = kind_of(named[arg], arg)
        if (kind == "device") != (self.device != "cpu"):
            raise TypeError(f"{arg} is a {kind} array but the module's parameters are on "
                            f"{self.device}; call module.to({'cuda' if kind == 'device' else 'cpu'!r}) "
                            f"first (or pass {'host' if kind == 'device' else 'device'} arrays)")
        return Call(named, backend)

    def _states(self, call, names):
        states = [call[n] for n in names]
        for name, s in zip(names, states):
            if s is not None:
                check_dtype(name, s, self.dtype, "the module's dtype")
        return states

    def __call__(self, x, hx=None, lengths=None, backend_options=None):
        return self.forward(x, hx, lengths, backend_options)

    def forward(self, x, hx=None, lengths=None, backend_options=None):
        """torch.nn semantics: LSTM returns y, (h_n, c_n); GRU and RNN return y, h_n. x is
        (T, B, I), or (B, T, I) with batch_first; lengths (B,) or None."""
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
        h0, c0 = split_states(self._stack.layer.cell, hx)
        names = ("h0", "c0") if self._stack.layer.cell.has_cell_state else ("hx",)
        call = self._call({"x": x, names[0]: h0, **({names[1]: c0} if len(names) > 1 else {})},
                          self.backend)
        x = call["x"]
        check_dtype("x", x, self.dtype, "the module's dtype")
        if x.shape[2] != self.input_size:
            raise ValueError(f"x has {x.shape[2]} features; expected input_size = {self.input_size}")
        if self.batch_first:
            x = call.xp.ascontiguousarray(x.transpose(1, 0, 2))
        T, B = x.shape[0], x.shape[1]
        states = self._states(call, names) + [None]
        self._stack.check_states(x, states[:2], names)
        run = Run(call.backend, call.xp, check_options(call.backend, backend_options),
                  lengths_array(lengths, T, B), need_saved=self.training)
        # the dropout masks come from the module's generator; a failed forward puts it back
        before = self._rng.bit_generator.state
        try:
            masks = [self._mask(shape, call.xp) for shape in self._stack.mask_shapes(T, B)] \
                if self.training else None
            noise = self._noise(T, B, call.xp)
            y, h_n, c_n, saved = self._stack.forward(run, x, self._params, states[0], states[1],
                                                     masks, noise)
        except BaseException:
            self._rng.bit_generator.state = before
            raise
        # the parameters as they were (a load_state_dict before backward does not change them)
        self._saved = (run, saved, dict(self._params)) if self.training else None
        if self.batch_first:
            y = y.transpose(1, 0, 2)
        y, h_n, c_n = call.back(y), call.back(h_n), call.back(c_n)
        return (y, (h_n, c_n)) if c_n is not None else (y, h_n)

    def _noise(self, T, B, xp):
        """Zoneout / recurrent-dropout masks (gpurnn.layernorm) from the module's generator,
        in the compute dtype (float32 for 16-bit storage)."""
        compute = np.float32 if np.dtype(self.dtype).itemsize == 2 else self.dtype
        return draw_noise(self._stack.noise_specs(T, B, self.training), self._rng.random,
                          lambda shape, p: np.full(shape, p),
                          lambda a: xp.asarray(np.asarray(a, dtype=compute)))

    def _mask(self, shape, xp):
        """An inverted-dropout mask: 0 with probability p, else 1/(1-p)."""
        keep = 1.0 - self.dropout
        draw = self._rng.random(shape) < keep if keep > 0 else np.zeros(shape, bool)
        return xp.asarray((draw / keep if keep > 0 else draw).astype(self.dtype))

    def backward(self, dy, dhx=None):
        """Back-propagate through the last training forward. dy is shaped like y; dhx like the
        returned state (a tuple for LSTM) or None. Returns (dx, dhx); parameter gradients are
        added into self.grads. A failed call changes nothing (the same call can be retried)."""
        if self._saved is None:
            raise RuntimeError("backward needs a forward in training mode first (call m.train() "
                               "and run forward; each forward feeds one backward)")
        run, saved, params = self._saved
        x = saved.inputs[0]
        T, B = x.shape[0], x.shape[1]
        R, D = self._stack.state_width, self.num_directions
        want = (B, T, D * R) if self.batch_first else (T, B, D * R)
        if dy is None:
            raise TypeError(f"dy must be an array of the shape of y = {want}; got None (pass "
                            f"zeros where the loss does not depend on y)")
        dh, dc = split_states(self._stack.layer.cell, dhx, names=("dh_n", "dc_n", "dhx"))
        names = ("dh_n", "dc_n") if self._stack.layer.cell.has_cell_state else ("dhx",)
        call = self._call({"dy": dy, names[0]: dh, **({names[1]: dc} if len(names) > 1 else {})},
                          run.backend)
        dy = call["dy"]
        if tuple(dy.shape) != want:
            raise ValueError(f"dy has shape {tuple(dy.shape)}; expected the shape of y = {want}")
        check_dtype("dy", dy, self.dtype, "the module's dtype")
        if self.batch_first:
            dy = call.xp.ascontiguousarray(dy.transpose(1, 0, 2))
        states = self._states(call, names) + [None]
        # Nothing moves until every layer's backward has succeeded: the stack writes nothing,
        # and the gradients are added here at the end.
        dx, dh0, dc0, grads = self._stack.backward(run, saved, params, dy, states[0], states[1])
        for key, val in grads.items():
            self.grads[key] += val
        self._saved = None          # each forward feeds one backward
        if self.batch_first:
            dx = dx.transpose(1, 0, 2)
        dx, dh0, dc0 = call.back(dx), call.back(dh0), call.back(dc0)
        return (dx, (dh0, dc0)) if dc0 is not None else (dx, dh0)


class LSTM(RNNBase):
    """Multi-layer LSTM (gate order i, f, g, o), torch.nn.LSTM's constructor and keys, plus the
    cells of gpurnn.variants: `peephole=True` (weight_ch_l{k}: [w_ci; w_cf; w_co]),
    `coupled=True` (CIFG: gates i, g, o and f = 1 - i; with peephole weight_ch is [w_ci; w_co])
    and `proj_size` (torch.nn.LSTM's projection: weight_hr_l{k}, h of proj_size features).
    The variants run in float32 and float64."""
    cell = "lstm"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, *, peephole=False,
                 coupled=False, **kwargs):
        form = lstm_form(hidden_size, proj_size, peephole=bool(peephole), coupled=bool(coupled))
        self.cell = form.name
        self.peephole, self.coupled, self.proj_size = form.peephole, form.coupled, form.proj_size
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, **kwargs)


class LayerNormLSTM(RNNBase):
    """Multi-layer layer-normalised LSTM (Ba et al. 2016, Haste's formulation; gpurnn.layernorm):
    LN on x W_ih^T, on h W_hh^T (over the 4H gate features) and on c (over H) before its tanh.
    torch.nn.LSTM's parameters plus layernorm_{x,h,c}_{weight,bias}_l{k} (LN weights start
    at 1, biases at 0); float32 and float64. Takes zoneout= and recurrent_dropout= as LSTM."""
    cell = "layernorm_lstm"


class GFLSTM(RNNBase):
    """The gated-feedback LSTM (Chung et al. 2015; gpurnn.feedback): every layer's candidate
    sees every layer's previous state through learned global reset gates. Unidirectional;
    returns y of the top layer, (h_n, c_n) (L, B, H); float32 and float64."""
    cell = "gf_lstm"


class GFGRU(RNNBase):
    """The gated-feedback GRU (gpurnn.feedback); returns y of the top layer and h_n (L, B, H)."""
    cell = "gf_gru"


class GFRNN(RNNBase):
    """The gated-feedback Elman RNN (gpurnn.feedback), nonlinearity 'tanh' or 'relu'."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, **kwargs):
        self.cell = "gf_" + rnn_cell(nonlinearity)
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, **kwargs)


class MLSTM(RNNBase):
    """Multi-layer multiplicative LSTM (Krause et al. 2016; gpurnn.variants): m_t =
    (x_t W_mx^T) * (h_{t-1} W_mh^T) is the recurrent input of an LSTM. torch.nn.LSTM's
    parameters plus weight_mx_l{k} (H, I) and weight_mh_l{k} (H, H); float32 and float64."""
    cell = "mlstm"


class GRU(RNNBase):
    """Multi-layer GRU (gate order r, z, n; b_hn inside the reset product), as torch.nn.GRU."""
    cell = "gru"


class RNN(RNNBase):
    """Multi-layer Elman RNN, nonlinearity 'tanh' or 'relu', as torch.nn.RNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, **kwargs):
        self.cell = rnn_cell(nonlinearity)
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, **kwargs)
