"""Drop-in `torch.nn.LSTM` / `GRU` / `RNN` running on gpurnn's backends, through autograd.

    import gpurnn.torch
    lstm = gpurnn.torch.LSTM(16, 32, num_layers=2, bidirectional=True, batch_first=True)
    lstm.load_state_dict(torch.nn.LSTM(16, 32, 2, bidirectional=True).state_dict())
    out, (h_n, c_n) = lstm(x)            # a tensor or a PackedSequence, exactly as torch

Same constructor, parameter names, shapes, init (uniform(-1/sqrt(H), 1/sqrt(H)) drawn in
torch's order, so one seed gives both modules the same weights) and return values as torch.nn,
plus `backend=` ('auto': CPU tensors -> the 'cpu' fast path, zero copy, its GEMMs by torch's MKL
on torch's own OpenMP threads; 'numpy' the readable reference; CUDA tensors -> the 'cuda'
backend through DLPack on torch's current stream; 'sim' runs the CUDA kernels in Numba's
simulator on CPU tensors). `proj_size` is not supported.

Each layer and direction is one `torch.autograd.Function` around `gpurnn.functional.forward`
and `backward`; layers, directions, concatenation and inter-layer dropout are composed in
torch, so autograd (and DistributedDataParallel) handle the rest unchanged.

Training vs inference follows cuDNN: in eval mode, or when autograd is off (torch.no_grad,
inference_mode) or nothing needs a gradient, no reserve is kept, and a backward through an
eval-mode forward raises (cuDNN: "backward can only be called in training mode").

This module imports torch; `import gpurnn` does not import it.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional as F
from .backends import BACKENDS, resolve
from .cells import GATES, rnn_cell
from .interop import convert_all, from_compute, to_compute, torch_stream

__all__ = ["LSTM", "GRU", "RNN"]


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _autocast_dtype(x):
    """The 16-bit dtype an enclosing torch.autocast region asks for on x's device, else None.
    Inside one, the layers run as torch.nn's RNNs do there: inputs and weights cast to that
    dtype (differentiably: gradients reach float32 parameters as float32)."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


class _Layer(torch.autograd.Function):
    """One layer, one direction. Tensors in, tensors out, time-major:
    x (T, B, I); h0, c0 (B, H) or None (zeros); weights as torch; lengths a (B,) int64 NumPy
    array or None. Returns (y, h_n, c_n) for LSTM, (y, h_n) otherwise."""

    @staticmethod
    def forward(ctx, cell, reverse, backend, lengths, keep_reserve, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        # DLPack exchanges inside the stream context too: CuPy then consumes and produces on
        # torch's current stream, and no exchange needs a synchronisation.
        with torch_stream(x):
            _, family, a = convert_all({"x": x, "h0": h0, "c0": c0, "w_ih": w_ih, "w_hh": w_hh,
                                        "b_ih": b_ih, "b_hh": b_hh})
            y, h_n, c_n, reserve = F.forward(cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"],
                                             a["b_hh"], a["h0"], a["c0"], lengths, reverse,
                                             keep_reserve, backend)
            outs = tuple(from_compute(o, family) for o in ((y, h_n) if c_n is None else (y, h_n, c_n)))
        ctx.reserve, ctx.kept_reserve = reserve, reserve is not None
        ctx.has_h0, ctx.has_c0, ctx.has_bias = h0 is not None, c0 is not None, b_ih is not None
        ctx.family = family
        # The reserve aliases these tensors' memory (zero copy); saving them lets autograd's
        # version counters turn an in-place change before backward into an error, not wrong grads.
        ctx.save_for_backward(x, w_ih, w_hh)
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n=None):
        if not ctx.kept_reserve:
            raise RuntimeError("gpurnn: backward through a forward run in eval mode (or with "
                               "autograd off) is not supported, as with cuDNN; call "
                               "module.train() before the forward you differentiate")
        if ctx.reserve is None:
            raise RuntimeError("gpurnn: a second backward through the same forward (retain_graph"
                               "=True) is not supported: the reserve feeds exactly one backward; "
                               "run the forward again")
        x = ctx.saved_tensors[0]
        with torch_stream(x):
            g = F.backward(ctx.reserve, to_compute("dy", dy), to_compute("dh_n", dh_n),
                           to_compute("dc_n", dc_n))
            # a reserve feeds one backward: free it now, but only once that backward succeeded
            # (a failed one leaves it for a retry)
            ctx.reserve = None
            keep = (True, ctx.has_h0, ctx.has_c0, True, True, ctx.has_bias, ctx.has_bias)
            dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh = (
                from_compute(v, ctx.family) if wanted else None for v, wanted in zip(g, keep))
        return None, None, None, None, None, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh


class _RNNBase(nn.Module):
    cell = ""
    mode = ""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 backend="auto"):
        super().__init__()
        for name, v, low in (("input_size", input_size, 1), ("hidden_size", hidden_size, 1),
                             ("num_layers", num_layers, 1)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int; got {type(v).__name__}")
            if v < low:
                raise ValueError(f"{name} must be >= {low}; got {v}")
        # any real number, as torch.nn (np.float32(0.25) included); NaN fails the range test
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1]; got {dropout!r}")
        if proj_size != 0:
            raise ValueError(f"proj_size must be 0 (projections are not supported by gpurnn); "
                             f"got {proj_size!r}")
        if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")
        resolved_dtype = torch.get_default_dtype() if dtype is None else dtype
        if resolved_dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {_DTYPES} (gpurnn's kernels; 16-bit storage "
                            f"computes in float32); got {dtype!r}")
        if dropout > 0 and num_layers == 1:
            # torch.nn warns the same way; keep the message so filters written for torch apply
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bias, self.batch_first = bool(bias), bool(batch_first)
        self.dropout, self.bidirectional = float(dropout), bool(bidirectional)
        self.proj_size = 0
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        G, H, D = GATES[self.cell], self.hidden_size, self.num_directions
        self._flat_weights_names = []
        # torch's registration order (layer, direction, w_ih, w_hh, b_ih, b_hh): with the same
        # seed, reset_parameters then draws exactly torch.nn's initial weights.
        for layer in range(self.num_layers):
            in_size = self.input_size if layer == 0 else H * D
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                shapes = [(f"weight_ih{sfx}", (G * H, in_size)), (f"weight_hh{sfx}", (G * H, H))]
                if self.bias:
                    shapes += [(f"bias_ih{sfx}", (G * H,)), (f"bias_hh{sfx}", (G * H,))]
                for name, shape in shapes:
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name)
        self.reset_parameters()
        weight = getattr(self, self._flat_weights_names[0])
        if resolve(self.backend, {"weight": weight}) == "cpu":
            from .backends import cpu
            cpu.load(str(weight.dtype))      # the fast path's compiled code: now, not in a forward

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @property
    def all_weights(self):
        D = self.num_directions
        per = 4 if self.bias else 2
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[i * per:(i + 1) * per]]
                for i in range(self.num_layers * D)]

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                           ("bidirectional", False), ("backend", "auto")):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)!r}"
        return s

    # ---- forward ---------------------------------------------------------------------------
    def _check_state(self, name, s, expected, x):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(s).__name__}")
        if tuple(s.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(s.shape)}; expected (L*D, B, H) = {expected}")
        if s.dtype != x.dtype or s.device != x.device:
            raise TypeError(f"{name} is {s.dtype} on {s.device}; expected {x.dtype} on {x.device} "
                            f"(those of the input)")

    def forward(self, input, hx=None):
        """torch.nn semantics: returns (output, (h_n, c_n)) for LSTM, (output, h_n) otherwise;
        output is a PackedSequence when input is one."""
        is_lstm = self.cell == "lstm"
        packed = isinstance(input, PackedSequence)
        lengths = None
        unbatched = False
        if packed:
            sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
            x, lengths_t = pad_packed_sequence(input, batch_first=False)   # original batch order
            lengths = lengths_t.numpy()
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"input must be a tensor or a PackedSequence; got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"input must have 3 dimensions ({'(B, T, I)' if self.batch_first else '(T, B, I)'}) "
                                 f"or 2 (T, I) unbatched; got shape {tuple(input.shape)}")
            unbatched = input.dim() == 2
            if unbatched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[2] != self.input_size:
            raise ValueError(f"input has {x.shape[2]} features; expected input_size = {self.input_size}")
        weight = getattr(self, self._flat_weights_names[0])
        cast = _autocast_dtype(x)
        if (x.dtype != weight.dtype and cast is None) or x.device != weight.device:
            raise TypeError(f"input is {x.dtype} on {x.device}; expected {weight.dtype} on "
                            f"{weight.device} (the module's parameters)")

        def run_as(t):          # what the layers compute on: the autocast dtype inside autocast
            return t if t is None or cast is None else t.to(cast)
        B = x.shape[1]
        L, D, H = self.num_layers, self.num_directions, self.hidden_size
        h0_all = c0_all = None
        if hx is not None:
            if is_lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"hx for LSTM must be a tuple (h_0, c_0); got {type(hx).__name__}")
                h0_all, c0_all = hx
            else:
                h0_all = hx
            states = [("h_0" if is_lstm else "hx", h0_all)] + ([("c_0", c0_all)] if is_lstm else [])
            for name, s in states:
                if unbatched and isinstance(s, torch.Tensor) and s.dim() == 2:
                    s = s.unsqueeze(1)
                self._check_state(name, s, (L * D, B, H), x)
            if unbatched:
                h0_all = h0_all.unsqueeze(1)
                c0_all = c0_all.unsqueeze(1) if is_lstm else None

        x = run_as(x).contiguous()
        # cuDNN's rule: keep a reserve only for a training forward that autograd will go back through
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in self.parameters()) or any(
            s is not None and s.requires_grad for s in (h0_all, c0_all)))
        keep_reserve = self.training and needs_grad
        layer_input = x
        h_n, c_n = [], []
        for layer in range(L):
            outs = []
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                idx = layer * D + d
                res = _Layer.apply(
                    self.cell, bool(d), self.backend, lengths, keep_reserve, layer_input,
                    None if h0_all is None else run_as(h0_all[idx]),
                    None if c0_all is None else run_as(c0_all[idx]),
                    run_as(getattr(self, f"weight_ih{sfx}")), run_as(getattr(self, f"weight_hh{sfx}")),
                    run_as(getattr(self, f"bias_ih{sfx}")) if self.bias else None,
                    run_as(getattr(self, f"bias_hh{sfx}")) if self.bias else None)
                outs.append(res[0])
                h_n.append(res[1])
                if is_lstm:
                    c_n.append(res[2])
            out = outs[0] if D == 1 else torch.cat(outs, dim=2)
            if self.training and self.dropout > 0 and layer < L - 1:
                out = nn.functional.dropout(out, p=self.dropout, training=True)
            layer_input = out
        y = layer_input
        h_n = torch.stack(h_n)
        c_n = torch.stack(c_n) if is_lstm else None

        if packed:
            # Re-pack in the input's own sorted order, so batch_sizes/sorted_indices match it.
            if sorted_indices is not None:
                y = y.index_select(1, sorted_indices)
                lengths_sorted = lengths_t.index_select(0, sorted_indices.cpu())
            else:
                lengths_sorted = lengths_t
            data = pack_padded_sequence(y, lengths_sorted, enforce_sorted=True).data
            output = PackedSequence(data, input.batch_sizes, sorted_indices, unsorted_indices)
        elif unbatched:
            output = y.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if is_lstm else None
        else:
            output = y.transpose(0, 1) if self.batch_first else y
        return (output, (h_n, c_n)) if is_lstm else (output, h_n)


class LSTM(_RNNBase):
    """torch.nn.LSTM on gpurnn (gate order i, f, g, o)."""
    cell = "lstm"
    mode = "LSTM"


class GRU(_RNNBase):
    """torch.nn.GRU on gpurnn (gate order r, z, n; b_hn inside the reset product)."""
    cell = "gru"
    mode = "GRU"

    def __init__(self, *args, **kwargs):
        if kwargs.get("proj_size", 0) != 0:
            raise ValueError(f"proj_size is only for LSTM; got proj_size={kwargs['proj_size']!r} for GRU")
        super().__init__(*args, **kwargs)


class RNN(_RNNBase):
    """torch.nn.RNN on gpurnn, nonlinearity 'tanh' or 'relu'."""
    mode = "RNN"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 backend="auto"):
        self.cell = rnn_cell(nonlinearity)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend)
        self.nonlinearity = nonlinearity
