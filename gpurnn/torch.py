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
simulator on CPU tensors). `proj_size` is torch's; `peephole=` and `coupled=` on LSTM and the
MLSTM module are the cells of gpurnn.variants.

The stack is gpurnn.stack's, the same core as gpurnn.LSTM's; the whole stack (every layer and
direction, dropout between layers) is one autograd node, the custom operator
`torch.ops.gpurnn.stack_forward` (gpurnn.torchops) with its registered backward. So
`torch.compile(model, fullgraph=True)` compiles a model using these modules without a graph
break (torch.nn's RNN modules graph-break), and autograd and DistributedDataParallel handle
the rest unchanged. Dropout masks come from torch's generator, drawn as
torch.nn.functional.dropout draws them.

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
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import torchops  # noqa: F401  (registers torch.ops.gpurnn.*)
from .arrays import resolve
from .backends import BACKENDS
from .cells import rnn_cell
from .stack import draw_noise, make_stack
from .variants import lstm_form as _lstm_form

__all__ = ["LSTM", "GRU", "RNN", "MLSTM", "LayerNormLSTM", "GFLSTM", "GFGRU", "GFRNN"]


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


class RNNBase(nn.Module):
    """The torch skin over gpurnn.stack.Stack. Subclasses name the cell (`cell`) and torch's
    `mode`."""
    cell = ""
    mode = ""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 backend="auto", *, zoneout=None, recurrent_dropout=0.0):
        super().__init__()
        stack = make_stack(self.cell, input_size, hidden_size, num_layers, bias, dropout,
                           bidirectional, zoneout, recurrent_dropout)
        if proj_size != 0 and stack.state_width != proj_size:
            raise ValueError(f"proj_size is only for LSTM (gpurnn.torch.LSTM); got "
                             f"proj_size={proj_size!r} for {type(self).__name__}")
        if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")
        resolved_dtype = torch.get_default_dtype() if dtype is None else dtype
        if resolved_dtype not in _DTYPES:
            raise TypeError(f"dtype must be one of {_DTYPES} (gpurnn's kernels; 16-bit storage "
                            f"computes in float32); got {dtype!r}")
        allowed = getattr(stack.layer, "dtypes", None)
        if allowed is not None and str(resolved_dtype).removeprefix("torch.") not in allowed:
            raise TypeError(f"dtype must be one of {allowed} for {self.cell}; got {resolved_dtype}")
        if dropout > 0 and num_layers == 1:
            # torch.nn warns the same way; keep the message so filters written for torch apply
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}")
        self._stack = stack
        self.input_size, self.hidden_size, self.num_layers = stack.input_size, stack.hidden_size, stack.num_layers
        self.bias, self.batch_first = stack.bias, bool(batch_first)
        self.dropout, self.bidirectional = stack.dropout, stack.bidirectional
        self.proj_size = proj_size
        # as given: (p_h, p_c) for the LSTMs, p_h for GRU and RNN
        self.zoneout = (stack.zoneout if stack.zoneout is None or len(stack.zoneout) == 2
                        else stack.zoneout[0])
        self.recurrent_dropout = stack.recurrent_dropout
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        # torch's registration order (layer, direction, w_ih, w_hh, b_ih, b_hh): with the same
        # seed, reset_parameters then draws exactly torch.nn's initial weights.
        self._flat_weights_names = []
        for name, shape in stack.param_shapes():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
            self._flat_weights_names.append(name)
        self.reset_parameters()
        weight = getattr(self, self._flat_weights_names[0])
        if resolve(self.backend, {"weight": weight}) == "cpu":
            from .backends import cpu
            cpu.load(str(weight.dtype))      # the fast path's compiled code: now, not in a forward

    @property
    def num_directions(self):
        return self._stack.directions

    def reset_parameters(self):
        bound = self._stack.layer.init_bound(self.hidden_size)
        initial = getattr(self._stack.layer, "initial_value", lambda name, shape, dtype: None)
        for name, weight in self.named_parameters():
            nn.init.uniform_(weight, -bound, bound)      # every draw, as torch's order
            fixed = initial(name.rsplit("_l", 1)[0], tuple(weight.shape), "float64")
            if fixed is not None:
                with torch.no_grad():
                    weight.copy_(torch.from_numpy(fixed))

    @property
    def all_weights(self):
        per = len(self._flat_weights_names) // (self.num_layers * self.num_directions)
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[i * per:(i + 1) * per]]
                for i in range(self.num_layers * self.num_directions)]

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                           ("bidirectional", False), ("proj_size", 0), ("peephole", False),
                           ("coupled", False), ("zoneout", None), ("recurrent_dropout", 0.0),
                           ("backend", "auto")):
            if getattr(self, k, default) != default:
                s += f", {k}={getattr(self, k)!r}"
        return s

    # ---- forward ---------------------------------------------------------------------------
    def _check_state(self, name, s, expected, x):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(s).__name__}")
        if tuple(s.shape) != expected:
            form = "(L*D, B, H)" if expected[2] == self.hidden_size else "(L*D, B, proj_size)"
            raise ValueError(f"{name} has shape {tuple(s.shape)}; expected {form} = {expected}")
        if s.dtype != x.dtype or s.device != x.device:
            raise TypeError(f"{name} is {s.dtype} on {s.device}; expected {x.dtype} on {x.device} "
                            f"(those of the input)")

    def _masks(self, x):
        """Dropout masks for a training forward, drawn from torch's generator exactly as
        torch.nn.functional.dropout draws its noise (so seeds reproduce torch's composition)."""
        if not self.training:
            return []
        return [nn.functional.dropout(x.new_ones(shape), p=self.dropout, training=True)
                for shape in self._stack.mask_shapes(x.shape[0], x.shape[1])]

    def _noise(self, x):
        """Zoneout / recurrent-dropout masks (gpurnn.layernorm) drawn from torch's (CPU)
        generator, in the compute dtype on x's device; (flat list, keys)."""
        specs = self._stack.noise_specs(x.shape[0], x.shape[1], self.training)
        if specs is None:
            return [], ""
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        drawn = draw_noise(specs, lambda shape: torch.rand(shape, dtype=torch.float64),
                           lambda shape, p: torch.full(shape, p, dtype=torch.float64),
                           lambda a: a.to(device=x.device, dtype=compute))
        keys = list(drawn[0])
        return [d[k] for d in drawn for k in keys], ",".join(keys)

    def forward(self, input, hx=None):
        """torch.nn semantics: returns (output, (h_n, c_n)) for LSTM, (output, h_n) otherwise;
        output is a PackedSequence when input is one."""
        has_c = self._stack.layer.cell.has_cell_state
        packed = isinstance(input, PackedSequence)
        lengths = None
        unbatched = False
        if packed:
            sorted_indices, unsorted_indices = input.sorted_indices, input.unsorted_indices
            x, lengths = pad_packed_sequence(input, batch_first=False)   # original batch order
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
        weights = [getattr(self, n) for n in self._flat_weights_names]
        cast = _autocast_dtype(x)
        if (x.dtype != weights[0].dtype and cast is None) or x.device != weights[0].device:
            raise TypeError(f"input is {x.dtype} on {x.device}; expected {weights[0].dtype} on "
                            f"{weights[0].device} (the module's parameters)")

        def run_as(t):          # what the layers compute on: the autocast dtype inside autocast
            return t if t is None or cast is None else t.to(cast)
        B = x.shape[1]
        h0 = c0 = None
        if hx is not None:
            if has_c:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"hx for {self.mode} must be a tuple (h_0, c_0); got "
                                    f"{type(hx).__name__}")
                h0, c0 = hx
            else:
                h0 = hx
            states = [("h_0" if has_c else "hx", h0, "h")] + ([("c_0", c0, "c")] if has_c else [])
            for name, s, state in states:
                if unbatched and isinstance(s, torch.Tensor) and s.dim() == 2:
                    s = s.unsqueeze(1)
                self._check_state(name, s, self._stack.state_shape(B, state), x)
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if has_c else None

        x = run_as(x).contiguous()
        # cuDNN's rule: keep a reserve only for a training forward that autograd will go back through
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(
            w.requires_grad for w in weights) or any(
            s is not None and s.requires_grad for s in (h0, c0)))
        backend = resolve(self.backend, {"input": x})
        noise, noise_keys = self._noise(x)
        outs = torch.ops.gpurnn.stack_forward(
            x, None if h0 is None else run_as(h0).contiguous(),
            None if c0 is None else run_as(c0).contiguous(), lengths,
            [run_as(w) for w in weights], self._masks(x), noise, noise_keys, self.cell, self.input_size,
            self.hidden_size, self.num_layers,
            self.bias, self.bidirectional, backend, self.training and needs_grad)
        y, h_n = outs[0], outs[1]
        c_n = outs[2] if has_c else None

        if packed:
            # Re-pack in the input's own sorted order, so batch_sizes/sorted_indices match it.
            if sorted_indices is not None:
                y = y.index_select(1, sorted_indices)
                lengths_sorted = lengths.index_select(0, sorted_indices.cpu())
            else:
                lengths_sorted = lengths
            data = pack_padded_sequence(y, lengths_sorted, enforce_sorted=True).data
            output = PackedSequence(data, input.batch_sizes, sorted_indices, unsorted_indices)
        elif unbatched:
            output = y.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if has_c else None
        else:
            output = y.transpose(0, 1) if self.batch_first else y
        return (output, (h_n, c_n)) if has_c else (output, h_n)


class LSTM(RNNBase):
    """torch.nn.LSTM on gpurnn (gate order i, f, g, o), `proj_size` included, plus the cells of
    gpurnn.variants: `peephole=True` (weight_ch_l{k} = [w_ci; w_cf; w_co]) and `coupled=True`
    (CIFG: gates i, g, o, f = 1 - i; with peephole weight_ch = [w_ci; w_co]). The variants run
    in float32 and float64."""
    cell = "lstm"
    mode = "LSTM"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 backend="auto", *, peephole=False, coupled=False, zoneout=None,
                 recurrent_dropout=0.0):
        form = _lstm_form(hidden_size, proj_size, peephole=bool(peephole), coupled=bool(coupled))
        self.cell = form.name
        self.peephole, self.coupled = form.peephole, form.coupled
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, form.proj_size, device, dtype, backend, zoneout=zoneout,
                         recurrent_dropout=recurrent_dropout)


class LayerNormLSTM(RNNBase):
    """The layer-normalised LSTM (gpurnn.layernorm) as a torch module: torch.nn.LSTM's
    parameters plus layernorm_{x,h,c}_{weight,bias}_l{k}; zoneout= and recurrent_dropout=."""
    cell = "layernorm_lstm"
    mode = "LSTM"


class GFLSTM(RNNBase):
    """The gated-feedback LSTM (gpurnn.feedback) as a torch module; unidirectional; returns the
    top layer's output and (h_n, c_n) of every layer."""
    cell = "gf_lstm"
    mode = "LSTM"


class GFGRU(RNNBase):
    """The gated-feedback GRU (gpurnn.feedback) as a torch module."""
    cell = "gf_gru"
    mode = "GRU"


class GFRNN(RNNBase):
    """The gated-feedback Elman RNN (gpurnn.feedback), nonlinearity 'tanh' or 'relu'."""
    mode = "RNN"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 backend="auto"):
        self.cell = "gf_" + rnn_cell(nonlinearity)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend)
        self.nonlinearity = nonlinearity


class MLSTM(RNNBase):
    """The multiplicative LSTM (Krause et al. 2016; gpurnn.variants) as a torch module:
    torch.nn.LSTM's parameters plus weight_mx_l{k} (H, I) and weight_mh_l{k} (H, H)."""
    cell = "mlstm"
    mode = "LSTM"


class GRU(RNNBase):
    """torch.nn.GRU on gpurnn (gate order r, z, n; b_hn inside the reset product)."""
    cell = "gru"
    mode = "GRU"

    def __init__(self, *args, **kwargs):
        if kwargs.get("proj_size", 0) != 0:
            raise ValueError(f"proj_size is only for LSTM; got proj_size={kwargs['proj_size']!r} for GRU")
        super().__init__(*args, **kwargs)


class RNN(RNNBase):
    """torch.nn.RNN on gpurnn, nonlinearity 'tanh' or 'relu'."""
    mode = "RNN"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 backend="auto", *, zoneout=None, recurrent_dropout=0.0):
        self.cell = rnn_cell(nonlinearity)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend, zoneout=zoneout,
                         recurrent_dropout=recurrent_dropout)
        self.nonlinearity = nonlinearity
