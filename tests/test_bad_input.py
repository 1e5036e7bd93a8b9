"""Misuse gets a clear error (type + message naming the argument, expected and actual);
documented edge behaviour (NaN/Inf propagate, non-contiguous inputs, torch state dicts) holds."""
import re

import numpy as np
import pytest

import gpurnn
import gpurnn.functional as F
from gpurnn.cells import GATES

T, B, I, H = 4, 3, 2, 4


def msg(*parts):
    """A regex matching the given literal fragments in order."""
    return ".*".join(re.escape(p) for p in parts)


def make(cell="lstm", dtype=np.float32, bias=True, seed=0, t=T, b=B):
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    a = {
        "x": rng.standard_normal((t, b, I)).astype(dtype),
        "w_ih": rng.uniform(-0.5, 0.5, (G * H, I)).astype(dtype),
        "w_hh": rng.uniform(-0.5, 0.5, (G * H, H)).astype(dtype),
        "b_ih": rng.uniform(-0.5, 0.5, G * H).astype(dtype) if bias else None,
        "b_hh": rng.uniform(-0.5, 0.5, G * H).astype(dtype) if bias else None,
        "h0": rng.standard_normal((b, H)).astype(dtype),
        "c0": rng.standard_normal((b, H)).astype(dtype) if cell == "lstm" else None,
    }
    return a


def fwd(cell="lstm", **overrides):
    """F.forward with valid defaults, any argument overridden."""
    args = make(cell)
    args.update(overrides)
    return F.forward(cell, **args)


class FakeDeviceArray:
    """Just enough of a device array for type dispatch: it exposes __cuda_array_interface__."""

    def __init__(self, shape, dtype=np.float32):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3}


# ---- functional forward: shapes, ranks, dtypes ---------------------------------------------

@pytest.mark.parametrize("shape", [(T, B), (T, B, I, 1), (T * B * I,)], ids=["rank2", "rank4", "rank1"])
def test_x_rank(shape):
    x = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=msg("x must have 3 dimensions (T, B, I); got shape", str(shape))):
        fwd(x=x)


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool", "complex64"])
def test_x_dtype(dtype):
    x = np.ones((T, B, I), dtype)
    with pytest.raises(TypeError, match=msg(f"x has dtype {dtype}; expected one of ('float32', "
                                            f"'float64', 'float16', 'bfloat16')")):
        fwd(x=x)


@pytest.mark.parametrize("name", ["w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0"])
@pytest.mark.parametrize("x_dtype,other", [(np.float32, np.float64), (np.float64, np.float32),
                                           (np.float32, np.float16), (np.float32, np.int32)],
                         ids=["x32-other64", "x64-other32", "x32-other16", "x32-otherint"])
def test_mixed_dtypes(name, x_dtype, other):
    args = make("lstm", dtype=x_dtype)
    args[name] = args[name].astype(other)
    with pytest.raises(TypeError, match=msg(f"{name} has dtype {np.dtype(other)}; expected "
                                            f"{np.dtype(x_dtype)} (the dtype of x)")):
        F.forward("lstm", **args)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("shape", [(5 * H, H), (4 * H, H - 1), (8,), (0, 0), (H, H, H)],
                         ids=["G5", "not-G-times-H", "rank1", "empty", "rank3"])
def test_w_hh_shape(cell, shape):
    G = GATES[cell]
    with pytest.raises(ValueError, match=msg(f"w_hh has shape {shape}; expected (G*H, H) with G = {G} for {cell}")):
        fwd(cell, w_hh=np.zeros(shape, np.float32))


@pytest.mark.parametrize("shape", [(16, I + 1), (12, I), (16,), (16, I, 1)],
                         ids=["wrong-I", "wrong-GH", "rank1", "rank3"])
def test_w_ih_shape(shape):
    with pytest.raises(ValueError, match=msg(f"w_ih has shape {shape}; expected (G*H, I) = {(16, I)}")):
        fwd(w_ih=np.zeros(shape, np.float32))


@pytest.mark.parametrize("name", ["b_ih", "b_hh"])
@pytest.mark.parametrize("shape", [(15,), (4, 4), (16, 1)], ids=["short", "2d", "column"])
def test_bias_shape(name, shape):
    with pytest.raises(ValueError, match=msg(f"{name} has shape {shape}; expected (G*H,) = (16,)")):
        fwd(**{name: np.zeros(shape, np.float32)})


@pytest.mark.parametrize("missing", ["b_ih", "b_hh"])
def test_one_bias_without_the_other(missing):
    with pytest.raises(ValueError, match=msg("b_ih and b_hh must both be given or both be None")):
        fwd(**{missing: None})


@pytest.mark.parametrize("name", ["h0", "c0"])
@pytest.mark.parametrize("shape", [(B + 1, H), (B, H + 1), (1, B, H), (B * H,)],
                         ids=["wrong-B", "wrong-H", "layer-shaped", "flat"])
def test_state_shape(name, shape):
    with pytest.raises(ValueError, match=msg(f"{name} has shape {shape}; expected (B, H) = {(B, H)}")):
        fwd(**{name: np.zeros(shape, np.float32)})


@pytest.mark.parametrize("cell", ["gru", "rnn_tanh", "rnn_relu"])
def test_c0_for_a_cell_without_cell_state(cell):
    with pytest.raises(ValueError, match=msg(f"c0 is only for LSTM; got a c0 for {cell}")):
        fwd(cell, c0=np.zeros((B, H), np.float32))


def test_x_and_h0_batch_mismatch_is_reported_on_h0():
    with pytest.raises(ValueError, match=msg("h0 has shape (3, 4); expected (B, H) = (2, 4)")):
        fwd(x=np.zeros((T, 2, I), np.float32))


# ---- lengths ----------------------------------------------------------------------------

@pytest.mark.parametrize("lengths,dtype", [([1.0, 2.0, 3.0], "float64"), ([True, True, False], "bool"),
                                           (np.array([1, 2, 3], np.float32), "float32"),
                                           (["1", "2", "3"], "<U1")],
                         ids=["float", "bool", "float32", "str"])
def test_lengths_dtype(lengths, dtype):
    with pytest.raises(TypeError, match=msg(f"lengths must hold integers; got dtype {dtype}")):
        fwd(lengths=lengths)


@pytest.mark.parametrize("lengths,shape", [([1, 2], (2,)), ([1, 2, 3, 3], (4,)), ([[1, 2, 3]], (1, 3)), (3, ())],
                         ids=["short", "long", "2d", "scalar"])
def test_lengths_shape(lengths, shape):
    with pytest.raises(ValueError, match=msg(f"lengths has shape {shape}; expected (B,) = ({B},)")):
        fwd(lengths=lengths)


@pytest.mark.parametrize("lengths,lo,hi", [([1, T + 1, 2], 1, T + 1), ([-1, 2, 3], -1, 3), ([0, 0, 99], 0, 99)],
                         ids=["above-T", "negative", "far-above"])
def test_lengths_range(lengths, lo, hi):
    with pytest.raises(ValueError, match=msg(f"lengths must lie in [0, T] = [0, {T}]; got min {lo}, max {hi}")):
        fwd(lengths=np.array(lengths, np.int32))


# ---- names: cell, backend, nonlinearity ---------------------------------------------------

@pytest.mark.parametrize("cell", ["LSTM", "rnn", "peephole", ""])
def test_unknown_cell(cell):
    with pytest.raises(ValueError, match=msg("cell must be one of", "got", repr(cell))):
        F.forward(cell, **make("lstm"))


@pytest.mark.parametrize("backend", ["gpu", "torch", "CUDA", ""])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=msg("backend must be one of", "got", repr(backend))):
        fwd(backend=backend)


def test_unknown_backend_from_environment(monkeypatch):
    monkeypatch.setenv("GPURNN_BACKEND", "tpu")
    with pytest.raises(ValueError, match=msg("backend must be one of", "got 'tpu'")):
        fwd()


def test_cuda_backend_with_numpy_arrays():
    with pytest.raises(TypeError, match=msg("backend 'cuda' takes device arrays", "got host arrays")):
        fwd(backend="cuda")


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "Tanh", None])
def test_unknown_nonlinearity(nonlinearity):
    a = make("rnn_tanh")
    del a["c0"]
    with pytest.raises(ValueError, match=msg("nonlinearity must be 'tanh' or 'relu'; got", repr(nonlinearity))):
        F.rnn_forward(**a, nonlinearity=nonlinearity)
    with pytest.raises(ValueError, match=msg("nonlinearity must be 'tanh' or 'relu'; got", repr(nonlinearity))):
        gpurnn.RNN(I, H, nonlinearity=nonlinearity)


def test_backend_options_type():
    with pytest.raises(TypeError, match=msg("backend_options must be a dict or None; got list")):
        fwd(backend_options=["fast"])


# ---- empty sizes (documented ValueError) ----------------------------------------------------

@pytest.mark.parametrize("t,b", [(0, B), (T, 0), (0, 0)], ids=["T0", "B0", "T0-B0"])
def test_empty_time_or_batch(t, b):
    args = make("lstm", t=max(t, 1), b=max(b, 1))
    args["x"] = np.zeros((t, b, I), np.float32)
    args["h0"] = args["c0"] = None
    with pytest.raises(ValueError, match=msg(f"x has shape {(t, b, I)}; expected at least one step and one sequence")):
        F.forward("lstm", **args)
    m = gpurnn.GRU(I, H)
    with pytest.raises(ValueError, match=msg("expected at least one step and one sequence")):
        m(np.zeros((t, b, I), np.float32))


# ---- functional backward ------------------------------------------------------------------

def test_functional_backward_twice():
    y, h_n, c_n, res = fwd()
    F.backward(res, np.ones_like(y))
    with pytest.raises(RuntimeError, match=msg("reserve was already used by a backward")):
        F.backward(res, np.ones_like(y))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_functional_backward_after_inference_forward(cell):
    y, h_n, c_n, res = fwd(cell, training=False)
    assert res is None
    with pytest.raises(TypeError, match=msg("reserve must be the Reserve a training forward returned; got NoneType",
                                            "training=False")):
        F.backward(res, np.ones_like(y))


@pytest.mark.parametrize("name,shape,what", [("dy", (T, B, H + 1), "(T, B, H)"), ("dy", (B, T, H), "(T, B, H)"),
                                             ("dy", (T, B), "(T, B, H)"), ("dh_n", (1, B, H), "(B, H)"),
                                             ("dh_n", (B, H - 1), "(B, H)"), ("dc_n", (H, B), "(B, H)")],
                         ids=["dy-H", "dy-batch-first", "dy-rank2", "dh_n-rank3", "dh_n-H", "dc_n-transposed"])
def test_backward_grad_shapes(name, shape, what):
    *_, res = fwd()
    expected = (T, B, H) if name == "dy" else (B, H)
    with pytest.raises(ValueError, match=msg(f"{name} has shape {shape}; expected {what} = {expected}")):
        F.backward(res, **{name: np.zeros(shape, np.float32)})
    # a rejected call does not use up the reserve
    grads = F.backward(res, np.ones((T, B, H), np.float32))
    assert np.isfinite(grads.dx).all() and np.abs(grads.dx).sum() > 0


@pytest.mark.parametrize("name", ["dy", "dh_n", "dc_n"])
def test_backward_grad_dtype(name):
    *_, res = fwd()
    shape = (T, B, H) if name == "dy" else (B, H)
    with pytest.raises(TypeError, match=msg(f"{name} has dtype float64; expected float32")):
        F.backward(res, **{name: np.zeros(shape, np.float64)})


def test_dc_n_for_gru():
    *_, res = fwd("gru")
    with pytest.raises(ValueError, match=msg("dc_n is only for LSTM; got a dc_n for gru")):
        F.backward(res, dc_n=np.zeros((B, H), np.float32))


def test_backward_with_something_else_than_a_reserve():
    y, h_n, c_n, res = fwd()
    with pytest.raises(TypeError, match=msg("reserve must be the Reserve a training forward returned; got tuple")):
        F.backward((y, h_n), np.ones_like(y))


# ---- host / device mixing -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["w_ih", "w_hh", "b_ih", "h0", "c0"])
def test_functional_forward_mixing_host_and_device(name):
    a = make("lstm")
    fake = FakeDeviceArray(a[name].shape)
    with pytest.raises(TypeError, match=msg("must all be host arrays (NumPy, torch CPU) or all device", "got a mix",
                                            "FakeDeviceArray")):
        fwd(**{name: fake})


@pytest.mark.parametrize("name", ["dy", "dh_n"])
def test_functional_backward_with_device_grad_on_host_reserve(name):
    *_, res = fwd()
    shape = (T, B, H) if name == "dy" else (B, H)
    # a host reserve of the default backend ('cpu' where Numba is there, as here)
    with pytest.raises(TypeError, match=msg("backend 'cpu' takes host arrays (NumPy, torch CPU); got device arrays")):
        F.backward(res, **{name: FakeDeviceArray(shape)})


def test_layer_forward_mixing_host_and_device():
    m = gpurnn.GRU(I, H)
    x = np.zeros((T, B, I), np.float32)
    with pytest.raises(TypeError, match=msg("got a mix", "FakeDeviceArray")):
        m(x, FakeDeviceArray((1, B, H)))
    lstm = gpurnn.LSTM(I, H)
    with pytest.raises(TypeError, match=msg("got a mix", "FakeDeviceArray")):
        lstm(x, (np.zeros((1, B, H), np.float32), FakeDeviceArray((1, B, H))))


# ---- layer constructor ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,text", [
    (dict(hidden_size=0), ValueError, "hidden_size must be >= 1; got 0"),
    (dict(hidden_size=-3), ValueError, "hidden_size must be >= 1; got -3"),
    (dict(input_size=0), ValueError, "input_size must be >= 1; got 0"),
    (dict(num_layers=0), ValueError, "num_layers must be >= 1; got 0"),
    (dict(num_layers="x"), TypeError, "num_layers must be an int; got str"),
    (dict(num_layers=2.0), TypeError, "num_layers must be an int; got float"),
    (dict(hidden_size=True), TypeError, "hidden_size must be an int; got bool"),
    (dict(dropout=1.5), ValueError, "dropout must be a number in [0, 1]; got 1.5"),
    (dict(dropout=-0.1), ValueError, "dropout must be a number in [0, 1]; got -0.1"),
    (dict(dropout=float("nan")), ValueError, "dropout must be a number in [0, 1]; got nan"),
    (dict(dropout="0.5"), ValueError, "dropout must be a number in [0, 1]; got '0.5'"),
    (dict(dropout=True), ValueError, "dropout must be a number in [0, 1]; got True"),
    (dict(dtype="int32"), TypeError, "dtype must be one of ('float32', 'float64', 'float16', "
                                     "'bfloat16'); got int32"),
    (dict(dtype=np.int8), TypeError, "dtype must be one of ('float32', 'float64', 'float16', "
                                     "'bfloat16'); got int8"),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("cls", [gpurnn.LSTM, gpurnn.GRU, gpurnn.RNN], ids=["LSTM", "GRU", "RNN"])
def test_layer_constructor(cls, kwargs, exc, text):
    args = dict(input_size=I, hidden_size=H)
    args.update(kwargs)
    with pytest.raises(exc, match=msg(text)):
        cls(**args)


# ---- load_state_dict ------------------------------------------------------------------------

def test_load_state_dict_missing_key():
    m = gpurnn.LSTM(I, H, num_layers=2)
    sd = m.state_dict()
    del sd["bias_hh_l1"]
    with pytest.raises(ValueError, match=msg("state_dict keys do not match: missing ['bias_hh_l1'], unexpected []")):
        m.load_state_dict(sd)


def test_load_state_dict_unexpected_key():
    m = gpurnn.GRU(I, H)
    sd = m.state_dict()
    sd["weight_ih_l0_reverse"] = sd["weight_ih_l0"]
    with pytest.raises(ValueError, match=msg("missing [], unexpected ['weight_ih_l0_reverse']")):
        m.load_state_dict(sd)


def test_load_state_dict_non_strict_ignores_extra_and_missing():
    m = gpurnn.GRU(I, H, seed=1)
    before = m.state_dict()
    new = np.full((3 * H, I), 0.25, np.float32)
    m.load_state_dict({"weight_ih_l0": new, "something_else": np.zeros(3)}, strict=False)
    after = m.state_dict()
    np.testing.assert_array_equal(after["weight_ih_l0"], new)
    for key in ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        np.testing.assert_array_equal(after[key], before[key])


@pytest.mark.parametrize("shape", [(4 * H, I + 1), (4 * H,), (I, 4 * H)], ids=["wrong-I", "rank1", "transposed"])
def test_load_state_dict_wrong_shape_leaves_parameters_unchanged(shape):
    m = gpurnn.LSTM(I, H, seed=2)
    before = m.state_dict()
    sd = m.state_dict()
    sd["bias_ih_l0"] = np.zeros(4 * H, np.float32)           # a valid entry before the bad one
    sd["weight_hh_l0"] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=msg(f"state_dict['weight_hh_l0'] has shape {shape}; "
                                             f"expected {(4 * H, H)}")):
        m.load_state_dict(sd)
    for key, value in m.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_load_state_dict_integer_dtype():
    m = gpurnn.RNN(I, H)
    sd = m.state_dict()
    sd["weight_ih_l0"] = np.zeros((H, I), np.int64)
    with pytest.raises(TypeError, match=msg("state_dict['weight_ih_l0'] has dtype int64; expected a float dtype")):
        m.load_state_dict(sd)


def test_load_state_dict_unconvertible_value():
    m = gpurnn.RNN(I, H)
    sd = m.state_dict()
    sd["bias_ih_l0"] = {"not": "an array"}
    with pytest.raises((TypeError, ValueError), match=msg("state_dict['bias_ih_l0']")):
        m.load_state_dict(sd)


# ---- layer forward / backward misuse --------------------------------------------------------------

@pytest.mark.parametrize("shape", [(T, B), (T, B, I, 1)], ids=["rank2", "rank4"])
def test_layer_x_rank(shape):
    m = gpurnn.LSTM(I, H)
    with pytest.raises(ValueError, match=msg("x must have 3 dimensions ((T, B, I)); got shape", str(shape))):
        m(np.zeros(shape, np.float32))
    m_bf = gpurnn.LSTM(I, H, batch_first=True)
    with pytest.raises(ValueError, match=msg("x must have 3 dimensions ((B, T, I))")):
        m_bf(np.zeros(shape, np.float32))


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32"])
def test_layer_x_dtype(dtype):
    m = gpurnn.GRU(I, H)
    with pytest.raises(TypeError, match=msg(f"x has dtype {dtype}; expected float32 (the module's dtype)")):
        m(np.zeros((T, B, I), dtype))


def test_layer_x_features():
    m = gpurnn.GRU(I, H)
    with pytest.raises(ValueError, match=msg(f"x has {I + 1} features; expected input_size = {I}")):
        m(np.zeros((T, B, I + 1), np.float32))


@pytest.mark.parametrize("shape", [(1, B, H), (2, B + 1, H), (2, B, H + 1), (B, H)],
                         ids=["missing-direction", "wrong-B", "wrong-H", "rank2"])
def test_layer_hx_shape(shape):
    m = gpurnn.GRU(I, H, bidirectional=True)
    with pytest.raises(ValueError, match=msg(f"hx has shape {shape}; expected (L*D, B, H) = {(2, B, H)}")):
        m(np.zeros((T, B, I), np.float32), np.zeros(shape, np.float32))


@pytest.mark.parametrize("which", ["h0", "c0"])
def test_layer_lstm_state_shape(which):
    m = gpurnn.LSTM(I, H, num_layers=2)
    good, bad = np.zeros((2, B, H), np.float32), np.zeros((1, B, H), np.float32)
    hx = (bad, good) if which == "h0" else (good, bad)
    with pytest.raises(ValueError, match=msg(f"{which} has shape (1, {B}, {H}); expected (L*D, B, H) = (2, {B}, {H})")):
        m(np.zeros((T, B, I), np.float32), hx)


def test_layer_lstm_hx_must_be_a_pair():
    m = gpurnn.LSTM(I, H)
    with pytest.raises(TypeError, match=msg("hx for LSTM must be a tuple (h0, c0)")):
        m(np.zeros((T, B, I), np.float32), np.zeros((1, B, H), np.float32))


def test_layer_hx_dtype():
    m = gpurnn.GRU(I, H)
    with pytest.raises(TypeError, match=msg("hx has dtype float64; expected float32")):
        m(np.zeros((T, B, I), np.float32), np.zeros((1, B, H), np.float64))


@pytest.mark.parametrize("cls", [gpurnn.GRU, gpurnn.RNN], ids=["GRU", "RNN"])
def test_layer_tuple_hx_for_gru_rnn(cls):
    m = cls(I, H)
    h = np.zeros((1, B, H), np.float32)
    with pytest.raises(TypeError, match=msg("hx")):
        m(np.zeros((T, B, I), np.float32), (h, h))


def test_layer_lstm_hx_with_none_member():
    m = gpurnn.LSTM(I, H)
    with pytest.raises(TypeError, match=msg("c0")):
        m(np.zeros((T, B, I), np.float32), (np.zeros((1, B, H), np.float32), None))


def test_layer_lengths_are_validated():
    m = gpurnn.LSTM(I, H, bidirectional=True)
    with pytest.raises(ValueError, match=msg(f"lengths must lie in [0, T] = [0, {T}]")):
        m(np.zeros((T, B, I), np.float32), lengths=[1, 2, T + 1])
    with pytest.raises(TypeError, match=msg("lengths must hold integers; got dtype float64")):
        m(np.zeros((T, B, I), np.float32), lengths=[1.0, 2.0, 3.0])


def test_layer_backward_without_forward():
    m = gpurnn.LSTM(I, H)
    with pytest.raises(RuntimeError, match=msg("backward needs a forward in training mode first")):
        m.backward(np.zeros((T, B, H), np.float32))


def test_layer_backward_after_eval_forward():
    m = gpurnn.GRU(I, H)
    x = np.zeros((T, B, I), np.float32)
    m(x)                          # a training forward ...
    m.eval()
    y, _ = m(x)                   # ... superseded by an inference one
    with pytest.raises(RuntimeError, match=msg("backward needs a forward in training mode first")):
        m.backward(np.ones_like(y))


def test_layer_backward_twice():
    m = gpurnn.RNN(I, H, num_layers=2)
    y, _ = m(np.ones((T, B, I), np.float32))
    m.backward(np.ones_like(y))
    with pytest.raises(RuntimeError, match=msg("backward needs a forward in training mode first")):
        m.backward(np.ones_like(y))


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
def test_layer_backward_dy_shape(batch_first):
    m = gpurnn.GRU(I, H, bidirectional=True, batch_first=batch_first)
    x = np.ones((B, T, I) if batch_first else (T, B, I), np.float32)
    y, _ = m(x)
    want = (B, T, 2 * H) if batch_first else (T, B, 2 * H)
    bad = (T, B, H)
    with pytest.raises(ValueError, match=msg(f"dy has shape {bad}; expected the shape of y = {want}")):
        m.backward(np.zeros(bad, np.float32))
    dx, _ = m.backward(np.ones_like(y))           # the rejected call kept the forward's state
    assert dx.shape == x.shape and np.isfinite(dx).all()


def test_layer_backward_dhx_shape_names_the_gradient():
    m = gpurnn.LSTM(I, H)
    y, (h_n, c_n) = m(np.ones((T, B, I), np.float32))
    with pytest.raises(ValueError, match=r"\bd(h|hx|h_n|h0)\b.*has shape \(2, 3, 4\)"):
        m.backward(np.ones_like(y), (np.zeros((2, B, H), np.float32), np.zeros_like(c_n)))


def test_layer_backward_dhx_wrong_shape_is_rejected():
    m = gpurnn.GRU(I, H)
    y, h_n = m(np.ones((T, B, I), np.float32))
    with pytest.raises(ValueError, match=msg(f"has shape (2, {B}, {H}); expected (L*D, B, H) = (1, {B}, {H})")):
        m.backward(np.ones_like(y), np.zeros((2, B, H), np.float32))


# ---- NaN / Inf propagate, never raise ------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_nan_in_one_sequence_stays_in_that_row(cell, reverse):
    args = make(cell, dtype=np.float64, seed=5)
    clean_y, clean_h, clean_c, clean_res = F.forward(cell, **args, reverse=reverse)
    bad_b, bad_t = 1, 1
    args["x"] = args["x"].copy()
    args["x"][bad_t, bad_b, 0] = np.nan
    y, h_n, c_n, res = F.forward(cell, **args, reverse=reverse)

    others = [b for b in range(B) if b != bad_b]
    np.testing.assert_array_equal(y[:, others], clean_y[:, others])
    np.testing.assert_array_equal(h_n[others], clean_h[others])
    # in row bad_b: steps before the NaN (in the direction of travel) are untouched, the rest NaN
    before = slice(bad_t + 1, None) if reverse else slice(0, bad_t)
    after = slice(0, bad_t + 1) if reverse else slice(bad_t, None)
    np.testing.assert_array_equal(y[before, bad_b], clean_y[before, bad_b])
    assert np.isnan(y[after, bad_b]).all()
    assert np.isnan(h_n[bad_b]).all()
    if cell == "lstm":
        np.testing.assert_array_equal(c_n[others], clean_c[others])
        assert np.isnan(c_n[bad_b]).all()

    rng = np.random.default_rng(6)
    dy, dh = rng.standard_normal(y.shape), rng.standard_normal(h_n.shape)
    dc = rng.standard_normal(h_n.shape) if cell == "lstm" else None
    clean = F.backward(clean_res, dy, dh, dc)
    grads = F.backward(res, dy, dh, dc)
    # rows are independent: the other sequences' input/state gradients are unaffected
    np.testing.assert_allclose(grads.dx[:, others], clean.dx[:, others], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grads.dh0[others], clean.dh0[others], rtol=1e-12, atol=1e-14)
    if cell != "rnn_relu":      # relu's backward gate (h > 0) is False for h = NaN and stops it
        assert np.isnan(grads.dh0[bad_b]).any()
    assert np.isnan(grads.dw_ih).any()            # dw_ih sums x over rows, and x holds the NaN


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("where", ["x", "w_ih", "w_hh", "h0", "b_ih"])
def test_nan_inputs_propagate_and_do_not_raise(cell, where):
    # warnings are errors in this suite, so this also checks that nothing warns
    args = make(cell, dtype=np.float32, seed=8)
    args[where] = args[where].copy()
    args[where].flat[0] = np.nan
    y, h_n, c_n, res = F.forward(cell, **args, lengths=[T, 1, 2])
    assert np.isnan(y).any() and np.isnan(h_n).any()
    grads = F.backward(res, np.ones_like(y), np.ones_like(h_n), None if c_n is None else np.ones_like(c_n))
    assert grads.dx.shape == args["x"].shape and grads.dw_hh.shape == args["w_hh"].shape


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("where", ["x", "w_ih", "w_hh", "h0", "b_ih"])
@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["inf", "-inf"])
def test_inf_inputs_forward_does_not_raise(cell, where, value):
    args = make(cell, dtype=np.float32, seed=8)
    args[where] = args[where].copy()
    args[where].flat[0] = value
    y, h_n, c_n, _ = F.forward(cell, **args, lengths=[T, 1, 2], training=False)
    assert y.shape == (T, B, H) and h_n.shape == (B, H)
    if where in ("x", "h0"):            # only sequence 0 sees the Inf; the others are untouched
        clean_y, clean_h, _, _ = F.forward(cell, **make(cell, dtype=np.float32, seed=8),
                                           lengths=[T, 1, 2], training=False)
        np.testing.assert_array_equal(y[:, 1:], clean_y[:, 1:])
        np.testing.assert_array_equal(h_n[1:], clean_h[1:])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["inf", "-inf"])
def test_inf_inputs_backward_does_not_warn(cell, value):
    args = make(cell, dtype=np.float32, seed=8)
    args["x"] = args["x"].copy()
    args["x"][0, 0, 0] = value
    y, h_n, c_n, res = F.forward(cell, **args)
    grads = F.backward(res, np.ones_like(y), np.ones_like(h_n), None if c_n is None else np.ones_like(c_n))
    assert grads.dx.shape == args["x"].shape


def test_layer_nan_forward_backward_do_not_raise():
    m = gpurnn.LSTM(I, H, num_layers=2, bidirectional=True, dropout=0.5, seed=0)
    x = np.ones((T, B, I), np.float32)
    x[0, 0, 0] = np.nan
    y, (h_n, c_n) = m(x)
    assert np.isnan(y[:, 0]).any() and np.isfinite(y[:, 1:]).all()
    dx, (dh0, dc0) = m.backward(np.ones_like(y), (np.ones_like(h_n), np.ones_like(c_n)))
    assert np.isfinite(dx[:, 1:]).all()


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("backend", ["numpy", "sim"])
def test_nan_in_padding_is_ignored(cell, backend):
    args = make(cell, dtype=np.float64, seed=9)
    lengths = [T, 1, 2]
    clean_y, clean_h, _, clean_res = F.forward(cell, **args, lengths=lengths, backend=backend)
    args["x"] = args["x"].copy()
    args["x"][2, 1] = np.nan                    # padding of sequence 1 (length 1) and ...
    args["x"][2, 2] = np.nan                    # ... of sequence 2 (length 2)
    y, h_n, _, res = F.forward(cell, **args, lengths=lengths, backend=backend)
    np.testing.assert_array_equal(y, clean_y)
    np.testing.assert_array_equal(h_n, clean_h)
    dy = np.ones_like(y)
    clean, grads = F.backward(clean_res, dy), F.backward(res, dy)
    for name in ("dx", "dh0", "dw_hh", "db_ih", "db_hh", "dw_ih"):
        np.testing.assert_array_equal(getattr(grads, name), getattr(clean, name), err_msg=name)


# ---- non-contiguous inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_relu"])
def test_non_contiguous_inputs_match_contiguous_copies(cell, reverse):
    rng = np.random.default_rng(10)
    G = GATES[cell]
    x_big = rng.standard_normal((T, 2 * B, I))
    x = x_big[:, ::2]                                        # strided batch
    w_ih = np.asfortranarray(rng.uniform(-0.5, 0.5, (G * H, I)))
    w_hh = rng.uniform(-0.5, 0.5, (H, G * H)).T              # a transposed (Fortran-order) view
    b_big = rng.uniform(-0.5, 0.5, 2 * G * H)
    b_ih, b_hh = b_big[::2], b_big[1::2]
    h0 = rng.standard_normal((H, B)).T
    c0 = rng.standard_normal((H, B)).T if cell == "lstm" else None
    dy = rng.standard_normal((T, 2 * B, H))[:, ::2]
    dh = rng.standard_normal((H, B)).T
    assert not (x.flags.c_contiguous or w_ih.flags.c_contiguous or w_hh.flags.c_contiguous
                or b_ih.flags.c_contiguous or h0.flags.c_contiguous or dy.flags.c_contiguous)
    lengths = np.array([2, T, 1, 0, 3, 3], np.int64)[::2]  # a strided lengths view too

    views = F.forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse)
    copies = F.forward(cell, *(None if a is None else np.ascontiguousarray(a)
                               for a in (x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths)), reverse)
    for a, b in zip(views[:3], copies[:3]):
        if b is not None:
            np.testing.assert_array_equal(a, b)
    dc = dh if cell == "lstm" else None
    g_view = F.backward(views[3], dy, dh, dc)
    g_copy = F.backward(copies[3], np.ascontiguousarray(dy), np.ascontiguousarray(dh),
                        None if dc is None else np.ascontiguousarray(dc))
    for name, a in g_copy._asdict().items():
        if a is not None:
            np.testing.assert_array_equal(getattr(g_view, name), a, err_msg=name)


def test_layer_non_contiguous_inputs_and_fortran_state_dict():
    rng = np.random.default_rng(11)
    m = gpurnn.LSTM(I, H, num_layers=2, bidirectional=True, dtype="float64", seed=4)
    ref = gpurnn.LSTM(I, H, num_layers=2, bidirectional=True, dtype="float64", seed=4)
    m.load_state_dict({k: np.asfortranarray(v) for k, v in m.state_dict().items()})
    x = rng.standard_normal((T, 2 * B, I))[:, ::2]
    h0 = rng.standard_normal((4, B, 2 * H))[:, :, ::2]
    c0 = rng.standard_normal((4, B, 2 * H))[:, :, 1::2]
    y, (h_n, c_n) = m(x, (h0, c0))
    y_ref, (h_ref, c_ref) = ref(np.ascontiguousarray(x), (np.ascontiguousarray(h0), np.ascontiguousarray(c0)))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(h_n, h_ref)
    np.testing.assert_array_equal(c_n, c_ref)
    dy = rng.standard_normal((T, 2 * B, 2 * H))[:, ::2]
    dx, _ = m.backward(dy)
    dx_ref, _ = ref.backward(np.ascontiguousarray(dy))
    np.testing.assert_array_equal(dx, dx_ref)


# ---- torch state dicts load directly --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_torch_state_dict_loads(kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    tm = getattr(torch.nn, kind)(I, H, num_layers=2, bidirectional=True)
    m = getattr(gpurnn, kind)(I, H, num_layers=2, bidirectional=True)
    sd = tm.state_dict()
    m.load_state_dict(sd)
    mine = m.state_dict()
    assert list(mine) == list(sd)
    for key, value in sd.items():
        np.testing.assert_array_equal(mine[key], value.numpy(), err_msg=key)
    # and the loaded module computes what torch computes
    x = np.random.default_rng(12).standard_normal((T, B, I)).astype(np.float32)
    with torch.no_grad():
        y_t, _ = tm(torch.from_numpy(x))
    m.eval()
    y, _ = m(x)
    np.testing.assert_allclose(y, y_t.numpy(), rtol=1e-5, atol=1e-6)


def test_torch_parameters_with_requires_grad_load():
    torch = pytest.importorskip("torch")
    tm = torch.nn.GRU(I, H)
    m = gpurnn.GRU(I, H)
    m.load_state_dict(dict(tm.named_parameters()))
    np.testing.assert_array_equal(m.state_dict()["weight_hh_l0"], tm.weight_hh_l0.detach().numpy())


def test_sim_needs_the_numba_cuda_package(monkeypatch):
    # plain numba still ships its own deprecated numba.cuda, which lacks what the kernels use:
    # without the numba-cuda package the simulator is reported unavailable, with the fix
    import importlib.util
    from gpurnn.backends import availability
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba_cuda" else real(name, *a))
    ok, why = availability("sim")
    assert not ok and "pip install 'gpurnn[sim]'" in why
    ok, why = availability("cuda")
    assert not ok


# ---- constructors check everything at construction ---------------------------------------------

@pytest.mark.parametrize("kwargs,exc,text", [
    (dict(backend="bogus"), ValueError, "backend must be one of ('auto', 'numpy'"),
    (dict(backend=None), ValueError, "backend must be one of"),
    (dict(dtype="bogus"), TypeError, "dtype must be one of ('float32', 'float64', 'float16', "
                                     "'bfloat16'); got 'bogus'"),
    (dict(dtype=object()), TypeError, "dtype must be one of ('float32', 'float64', 'float16', "
                                      "'bfloat16'); got <object"),
    (dict(seed=-1), ValueError, "seed must be a non-negative int; got -1"),
    (dict(seed=1.5), TypeError, "seed must be None, a non-negative int or a numpy.random Generator"),
    (dict(seed="abc"), TypeError, "seed must be None, a non-negative int or a numpy.random Generator"),
    (dict(seed=True), TypeError, "got bool True"),
    (dict(dropout=1j), ValueError, "dropout must be a number in [0, 1]; got 1j"),
    (dict(dropout=np.float32(1.5)), ValueError, "dropout must be a number in [0, 1]; got np.float32(1.5)"),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("cls", [gpurnn.LSTM, gpurnn.GRU, gpurnn.RNN], ids=["LSTM", "GRU", "RNN"])
def test_layer_constructor_checks_everything(cls, kwargs, exc, text):
    with pytest.raises(exc, match=msg(text)):
        cls(I, H, num_layers=2, **kwargs)


@pytest.mark.parametrize("dropout", [np.float32(0.25), np.float64(0.25), 0.25, np.int64(0), 1],
                         ids=["np.float32", "np.float64", "float", "np.int64", "int"])
def test_dropout_accepts_any_real_number(dropout):
    m = gpurnn.LSTM(I, H, num_layers=2, dropout=dropout, seed=0)
    assert m.dropout == float(dropout)
    y, _ = m(np.ones((T, B, I), np.float32))
    assert np.isfinite(y).all()


@pytest.mark.parametrize("seed", [None, 0, np.int64(3), np.random.SeedSequence(4), np.random.PCG64(5)],
                         ids=["None", "0", "np.int64", "SeedSequence", "BitGenerator"])
def test_seeds_numpy_accepts(seed):
    m = gpurnn.GRU(I, H, seed=seed)
    assert m.state_dict()["weight_hh_l0"].shape == (3 * H, H)


def test_torch_module_constructor_checks_everything():
    torch = pytest.importorskip("torch")
    import gpurnn.torch as gt
    with pytest.raises(ValueError, match=msg("backend must be one of ('auto', 'numpy'", "got 'bogus'")):
        gt.LSTM(I, H, backend="bogus")
    with pytest.raises(TypeError, match=msg("dtype must be one of", "torch.int32")):
        gt.GRU(I, H, dtype=torch.int32)
    with pytest.raises(ValueError, match=msg("dropout must be a number in [0, 1]; got 1j")):
        gt.RNN(I, H, num_layers=2, dropout=1j)
    # np.float32 dropout: torch.nn takes it, so does gpurnn.torch
    torch.nn.LSTM(I, H, num_layers=2, dropout=np.float32(0.25))
    assert gt.LSTM(I, H, num_layers=2, dropout=np.float32(0.25)).dropout == 0.25


# ---- the messages of issue 16 -------------------------------------------------------------------

def test_layer_x_as_a_nested_list():
    m = gpurnn.GRU(I, H, seed=0)
    m.eval()
    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(np.float32)
    y_list, _ = m(x.tolist())                      # read in the module's dtype
    y, _ = m(x)
    np.testing.assert_array_equal(y_list, y)
    with pytest.raises(ValueError, match=msg("x must have 3 dimensions ((T, B, I)); got shape (2, 3)")):
        m([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    with pytest.raises(TypeError, match=msg("x must be an array or a nested list of numbers; got a list")):
        m([[[1.0, 2.0]], [[1.0]]])                  # ragged
    with pytest.raises(TypeError, match=msg("x must be an array or a nested list of numbers; got a str")):
        m("abc")


def test_layer_torch_tensor_state_with_torch_input():
    torch = pytest.importorskip("torch")
    m = gpurnn.LSTM(I, H, seed=0)
    x = torch.randn(T, B, I)
    h0, c0 = torch.randn(1, B, H), torch.randn(1, B, H)
    y, (h_n, c_n) = m(x, (h0, c0))
    y_np, (h_np, c_np) = m(x.numpy(), (h0.numpy(), c0.numpy()))
    np.testing.assert_array_equal(y, y_np)
    np.testing.assert_array_equal(h_n, h_np)
    with pytest.raises(TypeError, match=msg("c0 has dtype float64; expected float32 (the module's dtype)")):
        m(x, (h0, c0.double()))
    gru = gpurnn.GRU(I, H)
    with pytest.raises(TypeError, match=msg("hx has dtype float64; expected float32 (the module's dtype)")):
        gru(x, torch.zeros(1, B, H, dtype=torch.float64))


def test_layer_backward_none():
    m = gpurnn.LSTM(I, H, bidirectional=True)
    y, _ = m(np.ones((T, B, I), np.float32))
    with pytest.raises(TypeError, match=msg(f"dy must be an array of the shape of y = {(T, B, 2 * H)}; got None")):
        m.backward(None)
    dx, _ = m.backward(np.ones_like(y))            # the rejected call kept the forward
    assert dx.shape == (T, B, I)


def test_layer_backward_device_dy_on_a_host_module():
    m = gpurnn.GRU(I, H)
    y, _ = m(np.ones((T, B, I), np.float32))
    with pytest.raises(TypeError, match=msg("dy is a device array but the module's parameters are on "
                                            "cpu; call module.to('cuda') first")):
        m.backward(FakeDeviceArray(y.shape))


@pytest.mark.parametrize("fn", ["step_traffic", "step_floor_seconds", "traffic_saving"])
@pytest.mark.parametrize("bad", ["p", None, 3], ids=["str", "None", "int"])
def test_plan_functions_take_a_plan(fn, bad):
    with pytest.raises(TypeError, match=msg("plan must be a gpurnn.planning.Plan (what gpurnn.plan(...) returns); "
                                            f"got {type(bad).__name__}")):
        getattr(gpurnn.planning, fn)(bad)


@pytest.mark.parametrize("name", ["w_hh", "h0", "b_hh"])
def test_functional_mixing_names_each_argument(name):
    a = make("lstm")
    a[name] = FakeDeviceArray(a[name].shape)
    with pytest.raises(TypeError) as exc:
        F.forward("lstm", **a)
    text = str(exc.value)
    assert f"{name} (device {__name__}.FakeDeviceArray)" in text, text
    assert "x (host numpy.ndarray)" in text and "w_ih (host numpy.ndarray)" in text, text


def test_functional_cuda_backend_names_the_host_arrays():
    with pytest.raises(TypeError, match=msg("backend 'cuda' takes device arrays", "got host arrays: x (host numpy.ndarray)")):
        fwd(backend="cuda")


def test_numpy_backend_refuses_kernel_options():
    with pytest.raises(ValueError, match=msg("backend_options has keys ['blocks', 'path']; the numpy backend takes none")):
        fwd(backend="numpy", backend_options={"path": "persistent", "blocks": 100000})
    y, h_n, c_n, res = fwd(backend="numpy", backend_options={})
    assert res is not None
