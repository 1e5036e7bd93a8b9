"""Single layer, single direction forward/backward pairs — the validating public boundary.

    y, h_n, c_n, reserve = lstm_forward(x, w_ih, w_hh, b_ih, b_hh, h0=None, c0=None, ...)
    grads = lstm_backward(reserve, dy, dh_n, dc_n)
    y, h_n, reserve = gru_forward(...) ; grads = gru_backward(reserve, dy, dh_n)
    y, h_n, reserve = rnn_forward(..., nonlinearity="tanh") ; grads = rnn_backward(reserve, dy, dh_n)

Shapes (time-major): x (T, B, I); w_ih (G*H, I); w_hh (G*H, H); b_ih, b_hh (G*H,) or None
(bias=False: both None); h0, c0 (B, H) or None (zeros); lengths (B,) integers in [0, T] or None.
G = 4 (LSTM, gates i, f, g, o), 3 (GRU, r, z, n), 1 (RNN). Steps t >= lengths[b] output zeros
and keep the state; h_n is each sequence's state after its own last step; reverse=True runs
each sequence from its own last step back to t = 0 (torch PackedSequence semantics).

`grads` is a `gpurnn.backends.Grads` named tuple (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh);
dc0 is None except for LSTM, db_* None without bias. A reserve feeds exactly one backward.

Arrays: NumPy in -> NumPy out (backend 'numpy', or 'sim' to run the CUDA kernels in Numba's
simulator); CuPy / __cuda_array_interface__ in -> the 'cuda' backend. dtype float32, float64,
float16 or bfloat16 (ml_dtypes; 16-bit storage computes in float32), the same for every array. Non-contiguous inputs are copied to C order. T = 0 or B = 0 is a
ValueError (an empty sequence batch has no meaningful state to return). NaN/Inf in inputs
propagate to outputs (never an error, never a crash).
"""
from __future__ import annotations

import numpy as np

from .arrays import _cupy, kind_of, to_compute
from .backends import Grads, get_backend, is_device_array, resolve
from .cells import CELLS, GATES, rnn_cell
from .kernels.dtypes import STORAGE

__all__ = ["forward", "backward", "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
           "rnn_forward", "rnn_backward", "Grads"]

_FLOAT_DTYPES = STORAGE       # float32, float64 and 16-bit storage (fp32 compute)


def _shape(a):
    return tuple(int(s) for s in a.shape)


def _as_array(name, a, device):
    """`a` as the C-contiguous NumPy (host) or CuPy (device) array the backends compute on;
    zero copy where the layout allows (conversion rules: gpurnn.interop)."""
    if (kind_of(a, name) == "device") != device:
        raise TypeError(f"{name} must be a {'device' if device else 'host'} array like x; got "
                        f"a {'host' if device else 'device'} {type(a).__name__}")
    a = to_compute(name, a)
    if device:
        return a if a.flags.c_contiguous else _cupy(name).ascontiguousarray(a)
    return np.ascontiguousarray(a)


def _check_dtype(name, a, dtype):
    if str(a.dtype) != dtype:
        raise TypeError(f"{name} has dtype {a.dtype}; expected {dtype} (the dtype of x)")


def _check_shape(name, a, expected, what):
    if _shape(a) != expected:
        raise ValueError(f"{name} has shape {_shape(a)}; expected {what} = {expected}")


def _or_zeros(name, a, shape, what, dtype, device, xp):
    """An optional state or gradient argument: zeros when None, else checked and converted."""
    if a is None:
        return xp.zeros(shape, dtype)
    a = _as_array(name, a, device)
    _check_shape(name, a, shape, what)
    _check_dtype(name, a, dtype)
    return a


def _lengths(lengths, T, B):
    if lengths is None:
        return None
    if hasattr(lengths, "get") and is_device_array(lengths):
        lengths = lengths.get()
    elif hasattr(lengths, "detach"):
        lengths = lengths.detach().cpu().numpy()
    arr = np.asarray(lengths)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"lengths must hold integers; got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths has shape {arr.shape}; expected (B,) = ({B},)")
    if arr.size and (arr.min() < 0 or arr.max() > T):
        raise ValueError(f"lengths must lie in [0, T] = [0, {T}]; got min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int64)


def _check_backend_options(options):
    # each backend checks its own keys, before it computes anything
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"backend_options must be a dict or None; got {type(options).__name__}")


def forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, lengths=None,
            reverse=False, training=True, backend="auto", backend_options=None):
    """Generic form: returns (y, h_n, c_n, reserve); c_n is None except for LSTM and reserve
    is None unless training."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
    name = resolve(backend, {"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh,
                             "h0": h0, "c0": c0})
    device = name == "cuda"
    x = _as_array("x", x, device)
    if x.ndim != 3:
        raise ValueError(f"x must have 3 dimensions (T, B, I); got shape {_shape(x)}")
    dtype = str(x.dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected one of {_FLOAT_DTYPES}")
    T, B, I = _shape(x)
    if T == 0 or B == 0:
        raise ValueError(f"x has shape {_shape(x)}; expected at least one step and one sequence")
    G = GATES[cell]
    w_ih, w_hh = _as_array("w_ih", w_ih, device), _as_array("w_hh", w_hh, device)
    if w_hh.ndim != 2 or w_hh.shape[1] == 0 or w_hh.shape[0] != G * w_hh.shape[1]:
        raise ValueError(f"w_hh has shape {_shape(w_hh)}; expected (G*H, H) with G = {G} for {cell}")
    H = int(w_hh.shape[1])
    _check_shape("w_ih", w_ih, (G * H, I), "(G*H, I)")
    _check_dtype("w_ih", w_ih, dtype)
    _check_dtype("w_hh", w_hh, dtype)
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be given or both be None (bias=False)")
    if b_ih is not None:
        b_ih, b_hh = _as_array("b_ih", b_ih, device), _as_array("b_hh", b_hh, device)
        for bname, b in (("b_ih", b_ih), ("b_hh", b_hh)):
            _check_shape(bname, b, (G * H,), "(G*H,)")
            _check_dtype(bname, b, dtype)
    xp = _cupy("x") if device else np
    h0 = _or_zeros("h0", h0, (B, H), "(B, H)", dtype, device, xp)
    if cell == "lstm":
        c0 = _or_zeros("c0", c0, (B, H), "(B, H)", dtype, device, xp)
    elif c0 is not None:
        raise ValueError(f"c0 is only for LSTM; got a c0 for {cell}")
    lengths = _lengths(lengths, T, B)
    _check_backend_options(backend_options)
    mod = get_backend(name)
    return mod.forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, bool(reverse),
                       bool(training), options=backend_options)


def backward(reserve, dy=None, dh_n=None, dc_n=None, backend_options=None):
    """Gradients of one forward's outputs, from its reserve (used once)."""
    from .backends import Reserve
    if not isinstance(reserve, Reserve):
        raise TypeError(f"reserve must be the Reserve a training forward returned; got "
                        f"{type(reserve).__name__} (was the forward run with training=False?)")
    if reserve.consumed:
        raise RuntimeError("this reserve was already used by a backward; run forward again "
                           "(a reserve feeds exactly one backward)")
    device = reserve.backend == "cuda"
    T, B, I, H = reserve.shape
    dtype = str(reserve.storage if reserve.storage is not None else reserve.x.dtype)
    xp = _cupy("x") if device else np
    # mixing host and device arrays is an error
    resolve(reserve.backend, {"dy": dy, "dh_n": dh_n, "dc_n": dc_n})
    _check_backend_options(backend_options)
    dy = _or_zeros("dy", dy, (T, B, H), "(T, B, H)", dtype, device, xp)
    dh_n = _or_zeros("dh_n", dh_n, (B, H), "(B, H)", dtype, device, xp)
    if reserve.cell == "lstm":
        dc_n = _or_zeros("dc_n", dc_n, (B, H), "(B, H)", dtype, device, xp)
    elif dc_n is not None:
        raise ValueError(f"dc_n is only for LSTM; got a dc_n for {reserve.cell}")
    # The reserve is used up only by a backward that succeeded: one whose backend_options the
    # backend rejects (or that fails for any other reason) leaves it for the retry. Backends
    # never write into a reserve, so a failed attempt leaves nothing behind in it.
    grads = get_backend(reserve.backend).backward(reserve, dy, dh_n, dc_n, options=backend_options)
    reserve.consumed = True
    return grads


def lstm_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, lengths=None,
                 reverse=False, training=True, backend="auto", backend_options=None):
    """LSTM layer, one direction. Returns (y (T,B,H), h_n (B,H), c_n (B,H), reserve)."""
    return forward("lstm", x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, training,
                   backend, backend_options)


def lstm_backward(reserve, dy=None, dh_n=None, dc_n=None, backend_options=None):
    """Grads(dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh) of an lstm_forward."""
    return backward(reserve, dy, dh_n, dc_n, backend_options)


def gru_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, lengths=None, reverse=False,
                training=True, backend="auto", backend_options=None):
    """GRU layer, one direction. Returns (y (T,B,H), h_n (B,H), reserve)."""
    y, h_n, _, reserve = forward("gru", x, w_ih, w_hh, b_ih, b_hh, h0, None, lengths, reverse,
                                 training, backend, backend_options)
    return y, h_n, reserve


def gru_backward(reserve, dy=None, dh_n=None, backend_options=None):
    """Grads(dx, dh0, None, dw_ih, dw_hh, db_ih, db_hh) of a gru_forward."""
    return backward(reserve, dy, dh_n, None, backend_options)


def rnn_forward(x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, lengths=None, reverse=False,
                training=True, nonlinearity="tanh", backend="auto", backend_options=None):
    """Elman RNN layer (tanh or relu), one direction. Returns (y (T,B,H), h_n (B,H), reserve)."""
    y, h_n, _, reserve = forward(rnn_cell(nonlinearity), x, w_ih, w_hh, b_ih, b_hh, h0, None,
                                 lengths, reverse, training, backend, backend_options)
    return y, h_n, reserve


def rnn_backward(reserve, dy=None, dh_n=None, backend_options=None):
    """Grads(dx, dh0, None, dw_ih, dw_hh, db_ih, db_hh) of an rnn_forward."""
    return backward(reserve, dy, dh_n, None, backend_options)
