"""Finite-difference checks of every gradient of the NumPy backend, in float64.

Objective: L = sum(y * Ry) + sum(h_n * Rh) (+ sum(c_n * Rc) for LSTM) with fixed random R's,
so the analytic gradient is backward(reserve, Ry, Rh, Rc). Every element of every input is
perturbed (central differences), which is why the sizes are tiny.
"""
import numpy as np
import pytest

import gpurnn
import gpurnn.functional as F
from gpurnn.cells import CELLS, GATES
from gpurnn.testing import FD_TOL, rel_err

EPS = 1e-6
NORM_TOL = FD_TOL        # ||analytic - numeric|| / ||numeric|| (observed worst ~3e-9)
ELEM_RTOL = 1e-5         # per element: |a - n| <= ELEM_ATOL + ELEM_RTOL * |n|
ELEM_ATOL = 1e-8
RELU_MARGIN = 1e-3       # no relu pre-activation closer than this to its kink

T, B, I, H = 4, 3, 3, 3
LENGTHS = {
    "all-T": None,
    "unsorted-T-short-zero": [2, T, 0],
    "unsorted-T-short": [T, 1, 3],
}


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    # these checks are of the reference itself; the fast paths are checked against it
    monkeypatch.setenv("GPURNN_BACKEND", "numpy")


def _run(cell, arrays, lengths, reverse, training=True):
    """One forward through the cell's public functional wrapper; returns (y, h_n, c_n, reserve)."""
    x, w_ih, w_hh, b_ih, b_hh, h0, c0 = (arrays[k] for k in ("x", "w_ih", "w_hh", "b_ih", "b_hh", "h0", "c0"))
    if cell == "lstm":
        return F.lstm_forward(x, w_ih, w_hh, b_ih, b_hh, h0=h0, c0=c0, lengths=lengths,
                              reverse=reverse, training=training)
    if cell == "gru":
        y, h_n, res = F.gru_forward(x, w_ih, w_hh, b_ih, b_hh, h0=h0, lengths=lengths,
                                    reverse=reverse, training=training)
    else:
        y, h_n, res = F.rnn_forward(x, w_ih, w_hh, b_ih, b_hh, h0=h0, lengths=lengths,
                                    reverse=reverse, training=training,
                                    nonlinearity=cell.split("_")[1])
    return y, h_n, None, res


def _backward(cell, reserve, ry, rh, rc):
    if cell == "lstm":
        return F.lstm_backward(reserve, ry, rh, rc)
    if cell == "gru":
        return F.gru_backward(reserve, ry, rh)
    return F.rnn_backward(reserve, ry, rh)


def _relu_preactivations(arrays, reserve, lengths):
    """Pre-activations of the active steps, recomputed from the reserve's boundary states."""
    x, w_ih, w_hh = arrays["x"], arrays["w_ih"], arrays["w_hh"]
    bias = 0.0 if arrays["b_ih"] is None else arrays["b_ih"] + arrays["b_hh"]
    rev = 1 if reserve.reverse else 0
    out = []
    for t in range(x.shape[0]):
        pre = x[t] @ w_ih.T + reserve.h[t + rev] @ w_hh.T + bias
        active = np.ones(x.shape[1], bool) if lengths is None else np.asarray(lengths) > t
        out.append(pre[active].ravel())
    return np.concatenate(out)


def _draw(cell, bias, lengths, reverse, seed):
    """Random inputs; for relu, re-drawn until no active pre-activation sits near the kink."""
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    for _ in range(50):
        arrays = {
            "x": rng.standard_normal((T, B, I)),
            "w_ih": rng.uniform(-0.8, 0.8, (G * H, I)),
            "w_hh": rng.uniform(-0.8, 0.8, (G * H, H)),
            "b_ih": rng.uniform(-0.5, 0.5, G * H) if bias else None,
            "b_hh": rng.uniform(-0.5, 0.5, G * H) if bias else None,
            "h0": rng.standard_normal((B, H)) * 0.5,
            "c0": rng.standard_normal((B, H)) * 0.5 if cell == "lstm" else None,
        }
        if cell != "rnn_relu":
            return arrays, rng
        *_, res = _run(cell, arrays, lengths, reverse)
        pre = _relu_preactivations(arrays, res, lengths)
        if np.abs(pre).min() > RELU_MARGIN and (pre > 0).sum() >= pre.size // 4:
            return arrays, rng
    raise AssertionError("could not draw relu data away from the kink")


def _objective(cell, arrays, lengths, reverse, ry, rh, rc):
    y, h_n, c_n, _ = _run(cell, arrays, lengths, reverse, training=False)
    total = np.sum(y * ry) + np.sum(h_n * rh)
    if c_n is not None:
        total += np.sum(c_n * rc)
    return total


def _central_difference(target, objective):
    """d objective() / d target, element by element (target is perturbed in place, restored)."""
    grad = np.zeros_like(target)
    for idx in np.ndindex(target.shape):
        keep = target[idx]
        target[idx] = keep + EPS
        plus = objective()
        target[idx] = keep - EPS
        minus = objective()
        target[idx] = keep
        grad[idx] = (plus - minus) / (2 * EPS)
    return grad


def _numeric_grad(cell, arrays, name, lengths, reverse, ry, rh, rc):
    return _central_difference(arrays[name],
                               lambda: _objective(cell, arrays, lengths, reverse, ry, rh, rc))


def _assert_grad_close(analytic, numeric, what):
    assert analytic is not None, f"{what}: analytic gradient is None"
    assert analytic.shape == numeric.shape, f"{what}: shape {analytic.shape} vs {numeric.shape}"
    assert analytic.dtype == np.float64, f"{what}: dtype {analytic.dtype}"
    assert np.isfinite(analytic).all() and np.isfinite(numeric).all(), f"{what}: non-finite values"
    err = rel_err(analytic, numeric)
    assert err <= NORM_TOL, f"{what}: norm-relative error {err:.3e} > {NORM_TOL:.0e}"
    bad = np.abs(analytic - numeric) > ELEM_ATOL + ELEM_RTOL * np.abs(numeric)
    assert not bad.any(), (f"{what}: {bad.sum()} elements off, worst at "
                           f"{np.unravel_index(np.argmax(np.abs(analytic - numeric)), bad.shape)}")


GRAD_OF = {"x": "dx", "h0": "dh0", "c0": "dc0", "w_ih": "dw_ih", "w_hh": "dw_hh",
           "b_ih": "db_ih", "b_hh": "db_hh"}


@pytest.mark.parametrize("lengths_id", list(LENGTHS))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", CELLS)
def test_functional_gradients_match_finite_differences(cell, bias, reverse, lengths_id):
    lengths = LENGTHS[lengths_id]
    seed = 1000 * CELLS.index(cell) + 100 * bias + 10 * reverse + list(LENGTHS).index(lengths_id)
    arrays, rng = _draw(cell, bias, lengths, reverse, seed)
    ry = rng.standard_normal((T, B, H))
    rh = rng.standard_normal((B, H))
    rc = rng.standard_normal((B, H)) if cell == "lstm" else None

    y, h_n, c_n, reserve = _run(cell, arrays, lengths, reverse)
    grads = _backward(cell, reserve, ry, rh, rc)

    if not bias:
        assert grads.db_ih is None and grads.db_hh is None
    if cell != "lstm":
        assert grads.dc0 is None
    if lengths is not None:
        # padded steps output zeros, so nothing flows back into their inputs
        for b, n in enumerate(lengths):
            assert np.all(y[n:, b] == 0)
            assert np.all(grads.dx[n:, b] == 0)
    for name, gname in GRAD_OF.items():
        if arrays[name] is None:
            continue
        numeric = _numeric_grad(cell, arrays, name, lengths, reverse, ry, rh, rc)
        _assert_grad_close(getattr(grads, gname), numeric, f"{cell} {gname}")


def test_gradcheck_detects_a_wrong_gradient():
    # the check itself must be able to fail: a gradient off by 1e-4 relative is rejected
    arrays, rng = _draw("gru", True, None, False, seed=7)
    ry, rh = rng.standard_normal((T, B, H)), rng.standard_normal((B, H))
    *_, reserve = _run("gru", arrays, None, False)
    grads = _backward("gru", reserve, ry, rh, None)
    numeric = _numeric_grad("gru", arrays, "w_hh", None, False, ry, rh, None)
    _assert_grad_close(grads.dw_hh, numeric, "gru dw_hh")
    with pytest.raises(AssertionError, match="norm-relative error"):
        _assert_grad_close(grads.dw_hh * (1 + 1e-4), numeric, "perturbed")


# ---- layer level: 2 layers, bidirectional, dropout held fixed -----------------------------

LT, LB, LI, LH = 3, 2, 2, 2
DROPOUT_SEED = 12345


def _layer_forward(m, x, hx, lengths):
    m._rng = np.random.default_rng(DROPOUT_SEED)     # the same dropout masks every evaluation
    return m(x, hx, lengths)


def _layer_objective(m, x, hx, lengths, ry, rh, rc):
    y, state = _layer_forward(m, x, hx, lengths)
    if isinstance(m, gpurnn.LSTM):
        h_n, c_n = state
        return np.sum(y * ry) + np.sum(h_n * rh) + np.sum(c_n * rc)
    return np.sum(y * ry) + np.sum(state * rh)


def _layer_numeric(m, target, x, hx, lengths, ry, rh, rc):
    return _central_difference(target, lambda: _layer_objective(m, x, hx, lengths, ry, rh, rc))


@pytest.mark.parametrize("lengths", [None, [1, LT]], ids=["all-T", "lengths-1-T"])
@pytest.mark.parametrize("cls", [gpurnn.LSTM, gpurnn.GRU], ids=["LSTM", "GRU"])
def test_layer_gradients_with_dropout_match_finite_differences(cls, lengths):
    rng = np.random.default_rng(77)
    m = cls(LI, LH, num_layers=2, bidirectional=True, dropout=0.4, dtype="float64", seed=3)
    m.train()
    x = rng.standard_normal((LT, LB, LI))
    h0 = rng.standard_normal((4, LB, LH)) * 0.5
    is_lstm = cls is gpurnn.LSTM
    c0 = rng.standard_normal((4, LB, LH)) * 0.5 if is_lstm else None
    hx = (h0, c0) if is_lstm else h0
    ry = rng.standard_normal((LT, LB, 2 * LH))
    rh = rng.standard_normal((4, LB, LH))
    rc = rng.standard_normal((4, LB, LH)) if is_lstm else None

    _layer_forward(m, x, hx, lengths)
    mask = m._saved[1].masks[0]
    assert mask is not None and (mask == 0).any() and (mask > 0).any(), \
        "the fixed dropout mask should drop some but not all units"
    m.zero_grad()
    dx, dstate = m.backward(ry, (rh, rc) if is_lstm else rh)
    dh0 = dstate[0] if is_lstm else dstate

    _assert_grad_close(dx, _layer_numeric(m, x, x, hx, lengths, ry, rh, rc), "layer dx")
    _assert_grad_close(dh0, _layer_numeric(m, h0, x, hx, lengths, ry, rh, rc), "layer dh0")
    if is_lstm:
        _assert_grad_close(dstate[1], _layer_numeric(m, c0, x, hx, lengths, ry, rh, rc), "layer dc0")
    params = dict(zip(m.state_dict(), m.parameters()))     # live arrays, in key order
    assert set(params) == set(m.grads)
    for key, p in params.items():
        _assert_grad_close(m.grads[key], _layer_numeric(m, p, x, hx, lengths, ry, rh, rc), key)
