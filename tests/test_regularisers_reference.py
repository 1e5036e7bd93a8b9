"""The NumPy reference of the regularisers (zoneout, variational recurrent dropout: the `noise`
dict of gpurnn/layernorm.py) in the four kernel cells (gpurnn/backends/numpy.py) and of the
LayerNormLSTM (gpurnn/backends/numpy_layernorm.py), checked against what they must agree with:
  - float64 central finite differences of every gradient (every parameter, the six layernorm_*
    vectors, x, h0, c0) with fixed masks, with lengths (a full-length and a 0-length row) and
    reverse, for zoneout and recurrent dropout apart and together (and p-filled masks);
  - an independent plain-NumPy loop written here from the contract's formulas (forward);
  - the reductions: no noise and p = 0 masks are the plain cell bit for bit, all-one zoneout
    keeps the state, evaluation's p-filled masks are the expectation p*prev + (1-p)*new, and one
    LayerNormLSTM step with gamma = 1, beta = 0 by hand;
  - NaN in padded steps (x and masks), read-only arguments, backward twice on one saved,
    options and noise keys, the cpu backend's fallback to the reference, 16-bit storage.
Objective of the gradient checks: L = sum(dy*y) + sum(dh*h_n) + sum(dc*c_n) with random dy, dh,
dc, so the analytic gradient is the backward of (dy, dh, dc).
"""
import dataclasses

import numpy as np
import pytest

from gpurnn.backends import Reserve
from gpurnn.backends import cpu as cpu_backend
from gpurnn.backends import numpy as ref
from gpurnn.layernorm import EPS as LN_EPS
from gpurnn.layernorm import LayerNormLSTMLayer
from gpurnn.testing import FD_TOL, rel_err

T, B, I, H = 4, 3, 3, 4
STEP = 1e-6
LN = "layernorm_lstm"
CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
P_DROP, P_H, P_C = 0.3, 0.4, 0.6
# (lengths, reverse, bias): lengths with a full-length and a 0-length row, unsorted
RUNS = {
    "all-T": (None, False, True),
    "lengths": ([T, 0, 2], False, True),
    "lengths-reverse": ([T, 0, 2], True, True),
    "lengths-reverse-nobias": ([1, T, 0], True, False),
}
NOISE = ["zoneout", "recurrent", "both", "eval"]
STATE_GRADS = ("dx", "dh0", "dc0")


def _lengths(lengths):
    return None if lengths is None else np.asarray(lengths, np.int64)


def _has_c(cell):
    return cell in ("lstm", LN)


def _param_shapes(cell, bias):
    if cell == LN:
        return LayerNormLSTMLayer().param_shapes(I, H, bias)
    G = GATES[cell]
    shapes = [("weight_ih", (G * H, I)), ("weight_hh", (G * H, H))]
    return shapes + ([("bias_ih", (G * H,)), ("bias_hh", (G * H,))] if bias else [])


def _draw(rng, cell, bias=True, dtype=np.float64):
    """Parameters, inputs and the objective's weights of one case (LN weights around 1)."""
    params = {}
    for name, shape in _param_shapes(cell, bias):
        if name.startswith("layernorm_") and name.endswith("_weight"):
            params[name] = rng.uniform(0.5, 1.5, shape)
        elif name.startswith("layernorm_"):
            params[name] = rng.uniform(-0.5, 0.5, shape)
        else:
            params[name] = rng.uniform(-0.8, 0.8, shape)
    data = {"x": rng.standard_normal((T, B, I)), "h0": rng.standard_normal((B, H)),
            "dy": rng.standard_normal((T, B, H)), "dh": rng.standard_normal((B, H))}
    if _has_c(cell):
        data.update(c0=rng.standard_normal((B, H)), dc=rng.standard_normal((B, H)))
    return ({k: v.astype(dtype) for k, v in params.items()},
            {k: v.astype(dtype) for k, v in data.items()})


def _noise(rng, cell, kind, dtype=np.float64):
    """Fixed masks: zoneout 0/1 (Bernoulli), recurrent 0 or 1/(1-p), 'eval' zoneout filled with
    p; a few entries forced so that every mask holds both of its values."""
    out = {}
    if kind in ("zoneout", "both"):
        out["zoneout_h"] = (rng.random((T, B, H)) < P_H).astype(dtype)
        if _has_c(cell):
            out["zoneout_c"] = (rng.random((T, B, H)) < P_C).astype(dtype)
        for z in out.values():
            z[0, 0, 0], z[0, 0, 1] = 0, 1
    if kind == "eval":
        out["zoneout_h"] = np.full((T, B, H), P_H, dtype)
        if _has_c(cell):
            out["zoneout_c"] = np.full((T, B, H), P_C, dtype)
    if kind in ("recurrent", "both"):
        m = (rng.random((B, H)) >= P_DROP) / (1 - P_DROP)
        m[0, 0], m[1, 1] = 0, 1 / (1 - P_DROP)
        out["recurrent"] = m.astype(dtype)
    return out


def _p0_noise(cell, dtype=np.float64):
    """The masks of p = 0: zoneout all zeros, recurrent all ones."""
    out = {"zoneout_h": np.zeros((T, B, H), dtype), "recurrent": np.ones((B, H), dtype)}
    if _has_c(cell):
        out["zoneout_c"] = np.zeros((T, B, H), dtype)
    return out


def _forward(cell, params, d, lengths, reverse, noise, need_saved=True, backend=ref, **kw):
    if cell == LN:
        return backend.layernorm_forward(d["x"], params, d["h0"], d["c0"], lengths, reverse,
                                         need_saved, noise=noise, **kw)
    return backend.forward(cell, d["x"], params["weight_ih"], params["weight_hh"],
                           params.get("bias_ih"), params.get("bias_hh"), d["h0"], d.get("c0"),
                           lengths, reverse, need_saved, noise=noise, **kw)


def _backward(cell, params, d, saved, lengths, reverse, noise, backend=ref, **kw):
    """(dx, dh0, dc0, {param name: gradient})."""
    if cell == LN:
        return backend.layernorm_backward(d["x"], params, saved, lengths, reverse, d["dy"],
                                          d["dh"], d["dc"], noise=noise, **kw)
    g = backend.backward(saved, d["dy"], d["dh"], d.get("dc"), **kw)
    grads = {"weight_ih": g.dw_ih, "weight_hh": g.dw_hh}
    if g.db_ih is not None:
        grads.update(bias_ih=g.db_ih, bias_hh=g.db_hh)
    return g.dx, g.dh0, g.dc0, grads


def _results(cell, params, d, lengths, reverse, noise, backend=ref):
    """{name: array}: y, h_n, c_n and every gradient (by parameter name, dx, dh0, dc0)."""
    y, h_n, c_n, saved = _forward(cell, params, d, lengths, reverse, noise, backend=backend)
    dx, dh0, dc0, grads = _backward(cell, params, d, saved, lengths, reverse, noise,
                                    backend=backend)
    out = {"y": y, "h_n": h_n, "dx": dx, "dh0": dh0, **grads}
    if _has_c(cell):
        out.update(c_n=c_n, dc0=dc0)
    return out


def _loss(cell, params, d, lengths, reverse, noise):
    y, h_n, c_n, _ = _forward(cell, params, d, lengths, reverse, noise, need_saved=False)
    loss = (d["dy"] * y).sum() + (d["dh"] * h_n).sum()
    if _has_c(cell):
        loss += (d["dc"] * c_n).sum()
    return float(loss)


def _numeric(cell, params, d, lengths, reverse, noise, arr):
    """Central differences of the objective with respect to every element of `arr` (one of the
    arrays in params or d, perturbed in place and restored)."""
    out = np.empty_like(arr)
    for idx in np.ndindex(arr.shape):
        keep = arr[idx]
        arr[idx] = keep + STEP
        up = _loss(cell, params, d, lengths, reverse, noise)
        arr[idx] = keep - STEP
        down = _loss(cell, params, d, lengths, reverse, noise)
        arr[idx] = keep
        out[idx] = (up - down) / (2 * STEP)
    return out


def _check_every_gradient(rng, cell, run, noise):
    lengths, reverse, bias = RUNS[run]
    lengths = _lengths(lengths)
    params, d = _draw(rng, cell, bias)
    noise = noise(rng) if callable(noise) else noise
    got = _results(cell, params, d, lengths, reverse, noise)
    names = [n for n, _ in _param_shapes(cell, bias)]
    assert sorted(k for k in got if k not in ("y", "h_n", "c_n") + STATE_GRADS) == sorted(names)
    checked = {n: params[n] for n in names}
    checked.update(dx=d["x"], dh0=d["h0"])
    if _has_c(cell):
        checked["dc0"] = d["c0"]
    for what, arr in checked.items():
        numeric = _numeric(cell, params, d, lengths, reverse, noise, arr)
        assert got[what].shape == arr.shape and got[what].dtype == arr.dtype, what
        err = rel_err(got[what], numeric)
        assert err <= FD_TOL, f"{cell} {run}: {what} off finite differences by {err:.2e}"


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("kind", NOISE)
@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_gradient_matches_finite_differences(rng, cell, kind, run):
    _check_every_gradient(rng, cell, run, lambda r: _noise(r, cell, kind))


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("kind", ["none"] + NOISE)
def test_every_layernorm_gradient_matches_finite_differences(rng, kind, run):
    _check_every_gradient(rng, LN, run, None if kind == "none" else (lambda r: _noise(r, LN, kind)))


# ---- an independent loop, written from the contract's formulas ---------------------------------

def _sigmoid(a):
    return 1 / (1 + np.exp(-a))


def _layer_norm(v, g, b):
    mean = v.mean(axis=-1, keepdims=True)
    var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
    return g * (v - mean) / np.sqrt(var + LN_EPS) + b


def _expected(cell, params, d, lengths, reverse, noise):
    """(y, h_n, c_n) by the contract: h~, c~ the cell's own new values, then zoneout, lengths."""
    x, h = d["x"], d["h0"].copy()
    c = d["c0"].copy() if _has_c(cell) else None
    mask = noise.get("recurrent", np.ones((B, H)))
    b_ih, b_hh = params.get("bias_ih", 0), params.get("bias_hh", 0)
    y = np.zeros((T, B, H))
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        gx = x[t] @ params["weight_ih"].T
        gh = (h * mask) @ params["weight_hh"].T
        if cell in ("lstm", LN):
            if cell == LN:
                a = (_layer_norm(gx, params["layernorm_x_weight"], params["layernorm_x_bias"])
                     + _layer_norm(gh, params["layernorm_h_weight"], params["layernorm_h_bias"])
                     + b_ih + b_hh)
            else:
                a = gx + gh + b_ih + b_hh
            i, f, g, o = (a[:, q * H: (q + 1) * H] for q in range(4))
            c_new = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            c_out = c_new
            if cell == LN:
                c_out = _layer_norm(c_new, params["layernorm_c_weight"],
                                    params["layernorm_c_bias"])
            h_new = _sigmoid(o) * np.tanh(c_out)
        elif cell == "gru":
            gx, gh = gx + b_ih, gh + b_hh
            r = _sigmoid(gx[:, :H] + gh[:, :H])
            z = _sigmoid(gx[:, H: 2 * H] + gh[:, H: 2 * H])
            n = np.tanh(gx[:, 2 * H:] + r * gh[:, 2 * H:])
            h_new = (1 - z) * n + z * h
        else:
            a = gx + gh + b_ih + b_hh
            h_new = np.tanh(a) if cell == "rnn_tanh" else np.maximum(a, 0)
        if "zoneout_h" in noise:
            h_new = noise["zoneout_h"][t] * h + (1 - noise["zoneout_h"][t]) * h_new
        if "zoneout_c" in noise:
            c_new = noise["zoneout_c"][t] * c + (1 - noise["zoneout_c"][t]) * c_new
        active = np.ones((B, 1), bool) if lengths is None else (t < lengths)[:, None]
        h = np.where(active, h_new, h)
        if c is not None:
            c = np.where(active, c_new, c)
        y[t] = np.where(active, h, 0)
    return y, h, c


@pytest.mark.parametrize("run", ["all-T", "lengths", "lengths-reverse-nobias"])
@pytest.mark.parametrize("kind", NOISE)
@pytest.mark.parametrize("cell", CELLS + [LN])
def test_forward_matches_an_independent_loop(rng, cell, kind, run):
    """Eval's p-filled masks here are the expectation p*prev + (1-p)*new of zoneout."""
    lengths, reverse, bias = RUNS[run]
    lengths = _lengths(lengths)
    params, d = _draw(rng, cell, bias)
    noise = _noise(rng, cell, kind)
    y, h_n, c_n, _ = _forward(cell, params, d, lengths, reverse, noise)
    want = _expected(cell, params, d, lengths, reverse, noise)
    for what, got, expected in zip(("y", "h_n", "c_n"), (y, h_n, c_n), want):
        if expected is None:
            assert got is None
            continue
        err = rel_err(got, expected)
        assert err <= 1e-12, f"{cell} {kind} {run}: {what} off the contract by {err:.2e}"


# ---- reductions -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("cell", CELLS + [LN])
def test_p0_masks_and_no_noise_are_the_plain_cell_bit_for_bit(rng, cell, run, dtype):
    lengths, reverse, bias = RUNS[run]
    lengths = _lengths(lengths)
    params, d = _draw(rng, cell, bias, dtype)
    plain = _results(cell, params, d, lengths, reverse, None)
    for noise in ({}, _p0_noise(cell, dtype), {"recurrent": np.ones((B, H), dtype)},
                  {"zoneout_h": np.zeros((T, B, H), dtype)}):
        got = _results(cell, params, d, lengths, reverse, noise)
        assert sorted(got) == sorted(plain)
        for what in plain:
            assert got[what].dtype == plain[what].dtype, what
            assert np.array_equal(got[what], plain[what]), f"{cell} {run} {sorted(noise)}: {what}"
    # the saved arrays too (the kernel cells' Reserve, the LayerNormLSTM's tuple)
    plain_saved = _forward(cell, params, d, lengths, reverse, None)[3]
    saved = _forward(cell, params, d, lengths, reverse, _p0_noise(cell, dtype))[3]
    if cell != LN:
        plain_saved = (plain_saved.h, plain_saved.c, plain_saved.gates)
        saved = (saved.h, saved.c, saved.gates)
    for mine, theirs in zip(saved, plain_saved):
        assert (mine is None and theirs is None) or np.array_equal(mine, theirs)


@pytest.mark.parametrize("cell", CELLS + [LN])
def test_nontrivial_masks_change_the_results(rng, cell):
    """The reductions above are not vacuous: masks are read, forward and backward."""
    params, d = _draw(rng, cell)
    plain = _results(cell, params, d, None, False, None)
    for kind in NOISE:
        got = _results(cell, params, d, None, False, _noise(rng, cell, kind))
        for what in ("y", "dx", "weight_hh", "dh0"):
            assert not np.allclose(got[what], plain[what]), f"{kind}: {what}"


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", CELLS + [LN])
def test_all_one_zoneout_keeps_the_state(rng, cell, reverse):
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell)
    noise = {"zoneout_h": np.ones((T, B, H)), "recurrent": _noise(rng, cell, "recurrent")["recurrent"]}
    if _has_c(cell):
        noise["zoneout_c"] = np.ones((T, B, H))
    r = _results(cell, params, d, lengths, reverse, noise)
    assert np.array_equal(r["h_n"], d["h0"])
    active = (np.arange(T)[:, None] < lengths[None, :])[..., None]
    assert np.array_equal(r["y"], np.where(active, d["h0"], 0.0))
    # nothing reaches the cell: no gradient for x or any parameter, the states' pass through
    assert not r["dx"].any()
    for name, _ in _param_shapes(cell, True):
        assert not r[name].any(), name
    assert rel_err(r["dh0"], d["dh"] + (d["dy"] * active).sum(axis=0)) <= 1e-14
    if _has_c(cell):
        assert np.array_equal(r["c_n"], d["c0"]) and np.array_equal(r["dc0"], d["dc"])


def test_layernorm_step_with_unit_gamma_and_zero_beta_by_hand(rng):
    params, d = _draw(rng, LN)
    for name in params:
        if name.startswith("layernorm_"):
            params[name] = np.full_like(params[name], 1.0 if name.endswith("_weight") else 0.0)
    x0, h0, c0 = d["x"][0], d["h0"], d["c0"]

    def norm(v):
        return (v - v.mean(axis=1, keepdims=True)) / np.sqrt(v.var(axis=1, keepdims=True) + 1e-5)
    px, ph = x0 @ params["weight_ih"].T, h0 @ params["weight_hh"].T
    pre = norm(px) + norm(ph) + params["bias_ih"] + params["bias_hh"]
    i, f, g, o = (pre[:, q * H: (q + 1) * H] for q in range(4))
    i, f, g, o = 1 / (1 + np.exp(-i)), 1 / (1 + np.exp(-f)), np.tanh(g), 1 / (1 + np.exp(-o))
    c1 = f * c0 + i * g
    h1 = o * np.tanh(norm(c1))
    y, h_n, c_n, saved = _forward(LN, params, d, None, False, None)
    h, c, gates, xhat, hhat, stats = saved
    assert [a.shape for a in saved] == [(T + 1, B, H), (T + 1, B, H), (T, B, 4 * H),
                                        (T, B, 4 * H), (T, B, 4 * H), (T, B, 6)]
    for what, got, want in [("gates", gates[0], np.concatenate([i, f, g, o], axis=1)),
                            ("c", c[1], c1), ("h", h[1], h1), ("y", y[0], h1),
                            ("xhat", xhat[0], norm(px)), ("hhat", hhat[0], norm(ph)),
                            ("h0", h[0], h0), ("c0", c[0], c0)]:
        assert rel_err(got, want) <= 1e-13, what
    want_stats = np.stack([px.mean(1), 1 / np.sqrt(px.var(1) + 1e-5), ph.mean(1),
                           1 / np.sqrt(ph.var(1) + 1e-5), c1.mean(1),
                           1 / np.sqrt(c1.var(1) + 1e-5)], axis=1)
    assert rel_err(stats[0], want_stats) <= 1e-13


def test_layernorm_statistics_are_the_two_pass_ones(rng):
    """A projection with a large common offset: E[v^2] - E[v]^2 would lose the variance in
    float32, the two-pass statistics keep it (against float64)."""
    params, d = _draw(rng, LN)
    d["x"][..., 0] += 1000.0
    params["weight_ih"][:, 0] = 1.0 + 1e-3 * params["weight_ih"][:, 0]
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    d32 = {k: v.astype(np.float32) for k, v in d.items()}
    s64 = _forward(LN, params, d, None, False, None)[3]
    s32 = _forward(LN, p32, d32, None, False, None)[3]
    # rstd_x of rows whose spread is ~1e-3 * 1000 ~ 1 next to an offset of 1000
    assert rel_err(s32[5][..., 1], s64[5][..., 1]) <= 1e-3
    assert rel_err(s32[3], s64[3]) <= 1e-3


# ---- padding, read-only arguments, re-running backward -----------------------------------------

# the plain cells without noise: tests/test_numpy_gradcheck.py and tests/test_bad_input.py
PADDING_CASES = [(c, k) for c in CELLS + [LN] for k in ("both", "eval")] + [(LN, "none")]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell,kind", PADDING_CASES)
def test_nan_in_padded_steps_changes_nothing(rng, cell, kind, reverse):
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell)
    noise = None if kind == "none" else _noise(rng, cell, kind)
    padded = np.arange(T)[:, None] >= lengths[None, :]          # (T, B)
    d["x"][padded] = 0.0
    clean = _results(cell, params, d, lengths, reverse, noise)
    d["x"][padded] = np.nan
    if noise is not None:       # whatever the masks hold at padded steps is not read either
        noise = {k: v.copy() for k, v in noise.items()}
        for k in ("zoneout_h", "zoneout_c"):
            if k in noise:
                noise[k][padded] = np.nan
    got = _results(cell, params, d, lengths, reverse, noise)
    for what in clean:
        assert np.isfinite(got[what]).all(), what
        assert np.array_equal(got[what], clean[what]), what


def _readonly(tree):
    for a in tree.values():
        a.flags.writeable = False


@pytest.mark.parametrize("cell", CELLS + [LN])
def test_backward_twice_on_one_saved_and_nothing_written(rng, cell):
    lengths, reverse = np.array([T, 0, 2], np.int64), True
    params, d = _draw(rng, cell)
    noise = _noise(rng, cell, "both")
    for tree in (params, d, noise):
        _readonly(tree)
    lengths.flags.writeable = False
    y, h_n, c_n, saved = _forward(cell, params, d, lengths, reverse, noise)
    arrays = tuple(saved) if cell == LN else (saved.h, saved.c, saved.gates)
    before = [None if a is None else a.copy() for a in arrays]
    masks = {k: v.copy() for k, v in noise.items()}
    first = _backward(cell, params, d, saved, lengths, reverse, noise)
    second = _backward(cell, params, d, saved, lengths, reverse, noise)
    for a, b in zip(first[:3], second[:3]):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert sorted(first[3]) == sorted(second[3])
    for name in first[3]:
        assert np.array_equal(first[3][name], second[3][name]), name
    for a, b in zip(arrays, before):
        assert (a is None and b is None) or np.array_equal(a, b)
    for k in masks:
        assert np.array_equal(noise[k], masks[k])
    if cell != LN:
        assert saved.noise is noise


# ---- options, noise keys, the cpu backend, 16-bit storage --------------------------------------

@pytest.mark.parametrize("cell", CELLS + [LN])
def test_bad_options_and_noise_keys_are_value_errors(rng, cell):
    params, d = _draw(rng, cell)
    noise = _noise(rng, cell, "both")
    saved = _forward(cell, params, d, None, False, noise)[3]
    with pytest.raises(ValueError, match="threads"):
        _forward(cell, params, d, None, False, noise, options={"threads": 2})
    with pytest.raises(ValueError, match="threads"):
        _backward(cell, params, d, saved, None, False, noise, options={"threads": 2})
    with pytest.raises(ValueError, match="nope"):
        _forward(cell, params, d, None, False, noise, backend=cpu_backend, options={"nope": 1})
    if cell == LN:
        with pytest.raises(ValueError, match="nope"):
            _backward(cell, params, d, saved, None, False, noise, backend=cpu_backend,
                      options={"nope": 1})
    with pytest.raises(ValueError, match="zoneout_x"):
        _forward(cell, params, d, None, False, {"zoneout_x": noise.get("zoneout_h")})
    if not _has_c(cell):
        with pytest.raises(ValueError, match="zoneout_c"):
            _forward(cell, params, d, None, False, {"zoneout_c": np.zeros((T, B, H))})
    bad = {**noise, "zoneout_x": noise["zoneout_h"]}
    with pytest.raises(ValueError, match="zoneout_x"):
        if cell == LN:
            _backward(cell, params, d, saved, None, False, bad)
        else:               # backward reads the noise the Reserve carries
            _backward(cell, params, d, dataclasses.replace(saved, noise=bad), None, False, None)
    # {} is no options, as everywhere
    assert _forward(cell, params, d, None, False, noise, options={})[3] is not None


@pytest.mark.parametrize("cell", CELLS + [LN])
def test_the_cpu_backend_runs_the_reference_with_noise(rng, cell):
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, dtype=np.float32)
    noise = _noise(rng, cell, "both", np.float32)
    expected = _results(cell, params, d, lengths, True, noise)
    got = _results(cell, params, d, lengths, True, noise, backend=cpu_backend)
    for what in expected:
        assert np.array_equal(got[what], expected[what]), what
    if cell == LN:
        return
    # the stack rebuilds the Reserve from the saved arrays (backend 'cpu', no launch): the
    # noise it carries sends backward to the reference as well
    res = _forward(cell, params, d, lengths, True, noise)[3]
    rebuilt = Reserve(cell=cell, backend="cpu", reverse=True, x=d["x"], w_ih=params["weight_ih"],
                      w_hh=params["weight_hh"], has_bias=True, lengths=lengths, h=res.h, c=res.c,
                      gates=res.gates, noise=noise)
    g = cpu_backend.backward(rebuilt, d["dy"], d["dh"], d.get("dc"), options={"threads": 1})
    assert np.array_equal(g.dx, expected["dx"]) and np.array_equal(g.dw_hh, expected["weight_hh"])


@pytest.mark.parametrize("cell", CELLS)
def test_16_bit_storage_computes_in_float32_with_float32_masks(rng, cell):
    params, d = _draw(rng, cell, dtype=np.float16)
    noise = _noise(rng, cell, "both", np.float32)
    wide = ({k: v.astype(np.float32) for k, v in params.items()},
            {k: v.astype(np.float32) for k, v in d.items()})
    y, h_n, c_n, res = _forward(cell, params, d, None, True, noise)
    y32, h32, c32, res32 = _forward(cell, *wide, None, True, noise)
    assert y.dtype == np.float16 and res.h.dtype == np.float32 and res.noise is noise
    assert np.array_equal(y, y32.astype(np.float16)) and np.array_equal(h_n, h32.astype(np.float16))
    g, g32 = ref.backward(res, d["dy"], d["dh"], d.get("dc")), ref.backward(
        res32, *(None if a is None else a.astype(np.float32) for a in (d["dy"], d["dh"], d.get("dc"))))
    assert g.dx.dtype == np.float16 and np.array_equal(g.dx, g32.dx.astype(np.float16))
    assert np.array_equal(g.dw_hh, g32.dw_hh.astype(np.float16))
