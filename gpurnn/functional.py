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

Arrays (the rules: gpurnn.arrays): results come back in the family that went in (NumPy,
CuPy, torch); host arrays go to the 'cpu' backend by default ('numpy' the reference, 'sim' the
CUDA kernels in gpurnn's simulator), device arrays to 'cuda'. The gradients come back in the
family of the first of dy, dh_n, dc_n given (else NumPy, or CuPy for a 'cuda' reserve).
`backend_options` are checked for the chosen backend before anything runs: an unknown key, a
bad value or a key that backend does not use is a ValueError. dtype float32, float64,
float16 or bfloat16 (ml_dtypes; 16-bit storage computes in float32), the same for every array. Non-contiguous inputs are copied to C order. T = 0 or B = 0 is a
ValueError (an empty sequence batch has no meaningful state to return). NaN/Inf in inputs
propagate to outputs (never an error, never a crash).
"""
from __future__ import annotations

from .arrays import Call, check_dtype, check_shape, lengths_array, shape_of
from .backends import Grads, Reserve, check_options, get_backend
from .cells import CELLS, GATES, rnn_cell
from .kernels.dtypes import STORAGE

__all__ = ["forward", "backward", "lstm_forward", "lstm_backward", "gru_forward", "gru_backward",
           "rnn_forward", "rnn_backward", "Grads"]


def _or_zeros(call, name, shape, what, dtype):
    """An optional state or gradient argument: zeros when None, else checked."""
    a = call[name]
    if a is None:
        return call.xp.zeros(shape, dtype)
    check_shape(name, a, shape, what)
    check_dtype(name, a, dtype)
    return a


def forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, lengths=None,
            reverse=False, training=True, backend="auto", backend_options=None):
    """Generic form: returns (y, h_n, c_n, reserve); c_n is None except for LSTM and reserve
    is None unless training."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
    call = Call({"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "h0": h0,
                 "c0": c0}, backend)
    x = call["x"]
    if x.ndim != 3:
        raise ValueError(f"x must have 3 dimensions (T, B, I); got shape {shape_of(x)}")
    dtype = str(x.dtype)
    if dtype not in STORAGE:
        raise TypeError(f"x has dtype {x.dtype}; expected one of {STORAGE}")
    T, B, I = shape_of(x)
    if T == 0 or B == 0:
        raise ValueError(f"x has shape {shape_of(x)}; expected at least one step and one sequence")
    G = GATES[cell]
    w_ih, w_hh = call["w_ih"], call["w_hh"]
    if w_hh.ndim != 2 or w_hh.shape[1] == 0 or w_hh.shape[0] != G * w_hh.shape[1]:
        raise ValueError(f"w_hh has shape {shape_of(w_hh)}; expected (G*H, H) with G = {G} for {cell}")
    H = int(w_hh.shape[1])
    check_shape("w_ih", w_ih, (G * H, I), "(G*H, I)")
    check_dtype("w_ih", w_ih, dtype)
    check_dtype("w_hh", w_hh, dtype)
    if (b_ih is None) != (b_hh is None):
        raise ValueError("b_ih and b_hh must both be given or both be None (bias=False)")
    b_ih, b_hh = call["b_ih"], call["b_hh"]
    if b_ih is not None:
        for bname, b in (("b_ih", b_ih), ("b_hh", b_hh)):
            check_shape(bname, b, (G * H,), "(G*H,)")
            check_dtype(bname, b, dtype)
    h0 = _or_zeros(call, "h0", (B, H), "(B, H)", dtype)
    if cell == "lstm":
        c0 = _or_zeros(call, "c0", (B, H), "(B, H)", dtype)
    elif c0 is not None:
        raise ValueError(f"c0 is only for LSTM; got a c0 for {cell}")
    lengths = lengths_array(lengths, T, B)
    options = check_options(call.backend, backend_options)
    y, h_n, c_n, reserve = get_backend(call.backend).forward(
        cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, bool(reverse), bool(training),
        options=options)
    return call.back(y), call.back(h_n), call.back(c_n), reserve


def backward(reserve, dy=None, dh_n=None, dc_n=None, backend_options=None):
    """Gradients of one forward's outputs, from its reserve (used once)."""
    if not isinstance(reserve, Reserve):
        raise TypeError(f"reserve must be the Reserve a training forward returned; got "
                        f"{type(reserve).__name__} (was the forward run with training=False?)")
    if reserve.consumed:
        raise RuntimeError("this reserve was already used by a backward; run forward again "
                           "(a reserve feeds exactly one backward)")
    T, B, I, H = reserve.shape
    dtype = str(reserve.storage if reserve.storage is not None else reserve.x.dtype)
    # mixing host and device arrays, or arrays of another kind than the forward's, is an error
    call = Call({"dy": dy, "dh_n": dh_n, "dc_n": dc_n}, reserve.backend)
    options = check_options(reserve.backend, backend_options)
    dy = _or_zeros(call, "dy", (T, B, H), "(T, B, H)", dtype)
    dh_n = _or_zeros(call, "dh_n", (B, H), "(B, H)", dtype)
    if reserve.cell == "lstm":
        dc_n = _or_zeros(call, "dc_n", (B, H), "(B, H)", dtype)
    elif dc_n is not None:
        raise ValueError(f"dc_n is only for LSTM; got a dc_n for {reserve.cell}")
    # The reserve is used up only by a backward that succeeded: one that fails for any reason
    # leaves it for the retry. Backends never write into a reserve, so a failed attempt leaves
    # nothing behind in it.
    grads = get_backend(reserve.backend).backward(reserve, dy, dh_n, dc_n, options=options)
    reserve.consumed = True
    return Grads(*(call.back(g) for g in grads))


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
