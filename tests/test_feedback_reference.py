"""The NumPy reference of the gated-feedback RNN (gpurnn/backends/numpy_feedback.py, the contract
of gpurnn/feedback.py) and FeedbackStack, checked against what they must agree with:
  - float64 central finite differences of every gradient (every parameter, x, h0, c0) of every
    GF cell, L = 1, 2, 3, with lengths (a full-length and a 0-length row) and dropout masks;
  - the forward against the paper's formulas written out one sequence, step and gate at a time;
  - the reduction: only U^{j->j} on, weight_gx = weight_gh = 0 and beta = 50 (every gate 1) is
    the plain stacked cell of gpurnn.stack.Stack (outputs and gradients, to 1e-12);
  - NaN in padded steps, read-only arguments, backward twice on one saved tuple, the saved
    layout, float32 against float64, bad arguments named in the error;
  - FeedbackStack: Stack's interface, forward/backward the reference's, saved_specs and
    saved_from round trips, the backends that run it.
Objective of the gradient checks: sum(dy*y) + sum(dh*h_n) + sum(dc*c_n) with random dy, dh, dc,
so the analytic gradient is feedback_backward(..., dy, dh, dc).
"""
import numpy as np
import pytest

from gpurnn.backends.numpy_feedback import feedback_backward, feedback_forward
from gpurnn.feedback import CELLS, FeedbackStack, param_shapes, plain_cell, saved_specs
from gpurnn.stack import Run, Stack
from gpurnn.testing import FD_TOL, GRAD_TOL, TOL, rel_err

T, B, I, H = 4, 3, 3, 4
EPS = 1e-6
P_DROP = 0.25
# (num_layers, lengths, masks, bias): lengths with a full-length and a 0-length row, unsorted
RUNS = {
    "L1": (1, None, False, True),
    "L2-lengths-masks": (2, [T, 0, 2], True, True),
    "L3-lengths-masks": (3, [T, 0, 2], True, True),
    "L3-lengths-masks-nobias": (3, [1, T, 0], True, False),
}
STATES = ("y", "h_n", "c_n")


def _lengths(lengths):
    return None if lengths is None else np.asarray(lengths, np.int64)


def _names(cell, L, bias=True, I=I):
    return [f"{n}_l{k}" for k in range(L) for n, _ in param_shapes(cell, I, H, L, bias, k)]


def _draw(rng, cell, L, bias=True, masks=True, dtype=np.float64, scale=0.8):
    """Parameters, inputs (x, h0, c0, masks) and the objective's weights of one case."""
    params = {f"{n}_l{k}": rng.uniform(-scale, scale, s).astype(dtype)
              for k in range(L) for n, s in param_shapes(cell, I, H, L, bias, k)}
    lstm = cell == "gf_lstm"
    d = {"x": rng.standard_normal((T, B, I)), "h0": rng.standard_normal((L, B, H)),
         "c0": rng.standard_normal((L, B, H)) if lstm else None,
         "dy": rng.standard_normal((T, B, H)), "dh": rng.standard_normal((L, B, H)),
         "dc": rng.standard_normal((L, B, H)) if lstm else None}
    d = {k: None if v is None else v.astype(dtype) for k, v in d.items()}
    d["masks"] = None
    if masks and L > 1:
        d["masks"] = [((rng.random((T, B, H)) >= P_DROP) / (1 - P_DROP)).astype(dtype)
                      for _ in range(L - 1)]
    return params, d


def _forward(cell, params, d, lengths, need_saved=True):
    return feedback_forward(cell, d["x"], params, d["h0"], d["c0"], lengths, d["masks"],
                            need_saved)


def _backward(cell, params, d, saved, lengths):
    return feedback_backward(cell, d["x"], params, saved, lengths, d["masks"], d["dy"], d["dh"],
                             d["dc"])


def _results(cell, params, d, lengths):
    """{name: array}: y, h_n, c_n and every gradient (by parameter name, dx, dh0, dc0)."""
    y, h_n, c_n, saved = _forward(cell, params, d, lengths)
    dx, dh0, dc0, grads = _backward(cell, params, d, saved, lengths)
    out = {"y": y, "h_n": h_n, "dx": dx, "dh0": dh0, **grads}
    if c_n is not None:
        out.update(c_n=c_n, dc0=dc0)
    else:
        assert dc0 is None
    return out


def _loss(cell, params, d, lengths):
    y, h_n, c_n, _ = _forward(cell, params, d, lengths, need_saved=False)
    total = (d["dy"] * y).sum() + (d["dh"] * h_n).sum()
    if c_n is not None:
        total += (d["dc"] * c_n).sum()
    return float(total)


def _numeric(cell, params, d, lengths, arr):
    """Central differences of the objective with respect to every element of `arr` (one of the
    arrays in params or d, perturbed in place and restored)."""
    out = np.empty_like(arr)
    for idx in np.ndindex(arr.shape):
        keep = arr[idx]
        arr[idx] = keep + EPS
        up = _loss(cell, params, d, lengths)
        arr[idx] = keep - EPS
        down = _loss(cell, params, d, lengths)
        arr[idx] = keep
        out[idx] = (up - down) / (2 * EPS)
    return out


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("cell", CELLS)
def test_every_gradient_matches_finite_differences(rng, cell, run):
    L, lengths, masks, bias = RUNS[run]
    lengths = _lengths(lengths)
    params, d = _draw(rng, cell, L, bias, masks)
    got = _results(cell, params, d, lengths)
    names = _names(cell, L, bias)
    assert [k for k in got if k not in STATES + ("dx", "dh0", "dc0")] == names
    checked = {n: params[n] for n in names}
    checked.update(dx=d["x"], dh0=d["h0"])
    if cell == "gf_lstm":
        checked["dc0"] = d["c0"]
    for what, arr in checked.items():
        numeric = _numeric(cell, params, d, lengths, arr)
        assert got[what].shape == arr.shape and got[what].dtype == arr.dtype, what
        err = rel_err(got[what], numeric)
        assert err <= FD_TOL, f"{cell} {run}: {what} off finite differences by {err:.2e}"
        # every gradient is checked against something that is not all zero (dx of the padded
        # rows and of the dropped units are, by construction)
        assert np.abs(numeric).max() > 1e-3, f"{cell} {run}: {what} is vacuous"


@pytest.mark.parametrize("cell", CELLS)
def test_a_zero_length_row_passes_its_states_through(rng, cell):
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, 3)
    r = _results(cell, params, d, lengths)
    assert np.array_equal(r["y"][:, 1], np.zeros((T, H))) and not r["y"][2:, 2].any()
    assert np.array_equal(r["h_n"][:, 1], d["h0"][:, 1])
    assert np.array_equal(r["dh0"][:, 1], d["dh"][:, 1])
    if cell == "gf_lstm":
        assert np.array_equal(r["c_n"][:, 1], d["c0"][:, 1])
        assert np.array_equal(r["dc0"][:, 1], d["dc"][:, 1])
    assert not r["dx"][:, 1].any() and not r["dx"][2:, 2].any()
    assert r["dx"][:, 0].any() and r["dx"][:2, 2].all()


# ---- the forward, written out as the paper's formulas ------------------------------------------
def _sig(a):
    return 1 / (1 + np.exp(-a))


def _naive_forward(cell, params, d, lengths, L):
    """y, h_n, c_n one sequence, one step, one layer and one gate pair at a time, every gate
    and sum spelled out (gpurnn/feedback.py's formulas), nothing shared with the reference."""
    x, masks = d["x"], d["masks"]
    h = [[d["h0"][j, b].copy() for j in range(L)] for b in range(B)]
    c = [[d["c0"][j, b].copy() for j in range(L)] for b in range(B)] if cell == "gf_lstm" else None
    y = np.zeros((T, B, H))
    p = lambda n, j: params[f"{n}_l{j}"]  # noqa: E731
    for b in range(B):
        for t in range(T if lengths is None else lengths[b]):
            prev = [v.copy() for v in h[b]]
            h_star = np.concatenate(prev)
            below = x[t, b]
            for j in range(L):
                if j > 0 and masks is not None:
                    below = below * masks[j - 1][t, b]
                fb = np.zeros(H)
                for i in range(L):
                    g = _sig(p("weight_gx", j)[i] @ below + p("weight_gh", j)[i] @ h_star
                             + p("bias_g", j)[i])
                    fb += g * (p("weight_fb", j)[:, i * H:(i + 1) * H] @ prev[i])
                W, bi, bh = p("weight_ih", j), p("bias_ih", j), p("bias_hh", j)
                rows = lambda a, q: a[q * H:(q + 1) * H]  # noqa: E731
                pre = lambda q: rows(W, q) @ below + rows(bi, q)  # noqa: E731
                if cell == "gf_rnn_tanh":
                    new = np.tanh(pre(0) + bh + fb)
                elif cell == "gf_rnn_relu":
                    new = np.maximum(pre(0) + bh + fb, 0)
                elif cell == "gf_gru":
                    U = p("weight_hh", j)
                    r = _sig(pre(0) + rows(bh, 0) + rows(U, 0) @ prev[j])
                    z = _sig(pre(1) + rows(bh, 1) + rows(U, 1) @ prev[j])
                    n = np.tanh(pre(2) + r * (fb + rows(bh, 2)))
                    new = (1 - z) * n + z * prev[j]
                else:
                    U = p("weight_hh", j)                           # rows i, f, o
                    i_ = _sig(pre(0) + rows(bh, 0) + rows(U, 0) @ prev[j])
                    f_ = _sig(pre(1) + rows(bh, 1) + rows(U, 1) @ prev[j])
                    g_ = np.tanh(pre(2) + rows(bh, 2) + fb)
                    o_ = _sig(pre(3) + rows(bh, 3) + rows(U, 2) @ prev[j])
                    c[b][j] = f_ * c[b][j] + i_ * g_
                    new = o_ * np.tanh(c[b][j])
                h[b][j] = new
                below = new
            y[t, b] = h[b][L - 1]
    h_n = np.array([[h[b][j] for b in range(B)] for j in range(L)])
    c_n = None if c is None else np.array([[c[b][j] for b in range(B)] for j in range(L)])
    return y, h_n, c_n


@pytest.mark.parametrize("L", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_the_forward_is_the_papers_formulas(rng, cell, L):
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, L)
    y, h_n, c_n, _ = _forward(cell, params, d, lengths)
    want = _naive_forward(cell, params, d, lengths, L)
    for what, got, expected in zip(STATES, (y, h_n, c_n), want):
        if expected is None:
            assert got is None
            continue
        err = rel_err(got, expected)
        assert err <= 1e-12, f"{cell} L={L}: {what} differs from the formulas by {err:.2e}"


# ---- the reduction to the plain stacked cell ----------------------------------------------------
def _reduced(params, cell, L):
    """GF parameters made the plain cell: off-diagonal U^{i->j} and the gate weights zero, every
    beta 50 (sigma(50) = 1 - 2e-22, 1 in float64)."""
    out = dict(params)
    for j in range(L):
        fb = np.zeros_like(params[f"weight_fb_l{j}"])
        fb[:, j * H:(j + 1) * H] = params[f"weight_fb_l{j}"][:, j * H:(j + 1) * H]
        out[f"weight_fb_l{j}"] = fb
        out[f"weight_gx_l{j}"] = np.zeros_like(params[f"weight_gx_l{j}"])
        out[f"weight_gh_l{j}"] = np.zeros_like(params[f"weight_gh_l{j}"])
        out[f"bias_g_l{j}"] = np.full_like(params[f"bias_g_l{j}"], 50.0)
    return out


def _own_u(params, j):
    return params[f"weight_fb_l{j}"][:, j * H:(j + 1) * H]


def _plain_hh(cell, w_hh, u):
    """The plain cell's weight_hh rows (torch order) from the GF weight_hh and U^{j->j} (the
    candidate's rows); the same assembly maps the GF gradients onto the plain cell's."""
    if cell in ("gf_rnn_tanh", "gf_rnn_relu"):
        return u
    if cell == "gf_gru":
        return np.concatenate([w_hh, u])                       # r, z | n
    return np.concatenate([w_hh[:2 * H], u, w_hh[2 * H:]])     # i, f | g | o


def _plain_params(cell, gf, L):
    out = {}
    for j in range(L):
        s = f"_l{j}"
        out["weight_ih" + s] = gf["weight_ih" + s]
        out["weight_hh" + s] = _plain_hh(cell, gf.get("weight_hh" + s), _own_u(gf, j))
        out["bias_ih" + s], out["bias_hh" + s] = gf["bias_ih" + s], gf["bias_hh" + s]
    return out


@pytest.mark.parametrize("L", [2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_only_own_feedback_with_open_gates_is_the_plain_stacked_cell(rng, cell, L):
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, L)
    gf = _reduced(params, cell, L)
    got = _results(cell, gf, d, lengths)
    fbgate = _forward(cell, gf, d, lengths)[3][-1]
    assert np.array_equal(fbgate, np.ones_like(fbgate))          # the gates are exactly open

    stack = Stack(plain_cell(cell), I, H, L, True, P_DROP)
    run = Run(backend="numpy", xp=np, lengths=lengths)
    y, h_n, c_n, saved = stack.forward(run, d["x"], _plain_params(cell, gf, L), d["h0"], d["c0"],
                                       d["masks"])
    dx, dh0, dc0, grads = stack.backward(run, saved, _plain_params(cell, gf, L), d["dy"], d["dh"],
                                         d["dc"])
    expected = {"y": y, "h_n": h_n, "dx": dx, "dh0": dh0}
    if cell == "gf_lstm":
        expected.update(c_n=c_n, dc0=dc0)
    for j in range(L):
        s = f"_l{j}"
        for n in ("weight_ih", "bias_ih", "bias_hh"):
            expected[n + s] = grads[n + s]
        # the plain cell's dW_hh: the GF dW_hh rows and, in the candidate's rows, dU^{j->j}
        got[f"weight_hh{s} (plain)"] = _plain_hh(cell, got.get("weight_hh" + s),
                                                 _own_u(got, j))
        expected[f"weight_hh{s} (plain)"] = grads["weight_hh" + s]
    for what, want in expected.items():
        err = rel_err(got[what], want)
        assert err <= 1e-12, f"{cell} L={L}: {what} differs from the plain {plain_cell(cell)} " \
                             f"stack by {err:.2e}"

    # not vacuous: one off-diagonal U, or a half-open gate, changes the outputs
    other = dict(gf)
    other["weight_fb_l0"] = gf["weight_fb_l0"].copy()
    other["weight_fb_l0"][:, H:2 * H] = params["weight_fb_l0"][:, H:2 * H]
    half = dict(gf, bias_g_l1=np.zeros_like(gf["bias_g_l1"]))
    for changed in (other, half):
        assert rel_err(_forward(cell, changed, d, lengths)[0], got["y"]) > 1e-3


# ---- padding, aliasing, layout, precision ---------------------------------------------------
def _with_padding(d, lengths, value):
    """d with x and dy set to `value` on the padded steps (t >= lengths[b])."""
    pad = np.arange(T)[:, None] >= lengths[None, :]
    out = dict(d)
    for k in ("x", "dy"):
        out[k] = d[k].copy()
        out[k][pad] = value
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_nan_in_padded_steps_changes_nothing(rng, cell, dtype):
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, 3, dtype=dtype)
    clean = _results(cell, params, _with_padding(d, lengths, 0), lengths)
    dirty = _results(cell, params, _with_padding(d, lengths, np.nan), lengths)
    for what in clean:
        assert np.isfinite(clean[what]).all(), what
        assert np.array_equal(dirty[what], clean[what]), f"{what} changed by NaN padding"


def _arrays_of(d):
    return [v for k, v in d.items() if k != "masks" and v is not None] + list(d["masks"] or [])


def _read_only(arrays):
    for a in arrays:
        a.setflags(write=False)


@pytest.mark.parametrize("cell", CELLS)
def test_arguments_and_saved_are_never_written(rng, cell):
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, 3)
    _read_only(list(params.values()) + _arrays_of(d) + [lengths])
    y, h_n, c_n, saved = _forward(cell, params, d, lengths)
    kept = [s.copy() for s in saved]
    _read_only(saved)
    first = _backward(cell, params, d, saved, lengths)
    again = _backward(cell, params, d, saved, lengths)
    for s, k in zip(saved, kept):
        assert np.array_equal(s, k)
    flat = lambda r: [a for a in r[:3] if a is not None] + list(r[3].values())  # noqa: E731
    assert list(first[3]) == list(again[3])
    for a, b in zip(flat(first), flat(again)):
        assert np.array_equal(a, b)
    # every result is an array of its own: no view of an argument, of saved or of another
    results = [a for a in (y, h_n, c_n) if a is not None] + flat(first)
    given = list(params.values()) + _arrays_of(d) + list(saved)
    for k, a in enumerate(results):
        for other in results[k + 1:] + given:
            assert not np.shares_memory(a, other)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_saved_layout_and_dtypes_follow_the_contract(rng, cell, dtype):
    L = 3
    params, d = _draw(rng, cell, L, dtype=dtype)
    y, h_n, c_n, saved = _forward(cell, params, d, None)
    specs = saved_specs(cell, T, B, L, H, dtype)
    assert [n for n, _, _ in specs] == {"gf_rnn_tanh": ["h", "fbgate"],
                                        "gf_rnn_relu": ["h", "fbgate"],
                                        "gf_gru": ["h", "gates", "fbgate"],
                                        "gf_lstm": ["h", "c", "gates", "fbgate"]}[cell]
    assert len(saved) == len(specs)
    for arr, (what, shape, dt) in zip(saved, specs):
        assert arr.shape == shape and arr.dtype == dt, what
    h4 = saved[0].reshape(T + 1, B, L, H)
    assert np.array_equal(h4[0], d["h0"].transpose(1, 0, 2))
    assert np.array_equal(y, h4[1:, :, L - 1]) and np.array_equal(h_n, h4[T].transpose(1, 0, 2))
    fbgate = saved[-1]
    assert ((fbgate > 0) & (fbgate < 1)).all()
    if cell == "gf_lstm":
        c4 = saved[1].reshape(T + 1, B, L, H)
        assert np.array_equal(c_n, c4[T].transpose(1, 0, 2))
        assert c_n.dtype == dtype
    else:
        assert c_n is None
    # the layer-0 gate from layer 1 (0-based) at step 0 and sequence 0, recomputed
    hp = saved[0][0, 0]
    s = params["weight_gx_l0"][1] @ d["x"][0, 0] + params["weight_gh_l0"][1] @ hp + \
        params["bias_g_l0"][1]
    assert abs(fbgate[0, 0, 0 * L + 1] - 1 / (1 + np.exp(-s))) <= 50 * np.finfo(dtype).eps
    y2, h_n2, c_n2, none = _forward(cell, params, d, None, need_saved=False)
    assert none is None
    assert np.array_equal(y, y2) and np.array_equal(h_n, h_n2)
    assert (c_n is None and c_n2 is None) or np.array_equal(c_n, c_n2)
    dx, dh0, dc0, grads = _backward(cell, params, d, saved, None)
    assert y.dtype == h_n.dtype == dx.dtype == dh0.dtype == dtype
    assert all(g.dtype == dtype and g.shape == params[k].shape for k, g in grads.items())


@pytest.mark.parametrize("cell", CELLS)
def test_float32_is_close_to_float64(rng, cell):
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, 3, scale=0.5)
    exact = _results(cell, params, d, lengths)
    f32 = lambda v: None if v is None else v.astype(np.float32)  # noqa: E731
    d32 = {k: ([f32(m) for m in v] if k == "masks" else f32(v)) for k, v in d.items()}
    single = _results(cell, {k: f32(v) for k, v in params.items()}, d32, lengths)
    for what in exact:
        tol = TOL["float32"] if what in STATES else GRAD_TOL["float32"]
        assert single[what].dtype == np.float32
        assert rel_err(single[what], exact[what]) <= tol, what


# ---- bad arguments --------------------------------------------------------------------------
def _bad_forward_cases():
    """(label, how to spoil (cell, params, d, lengths), exception, message)."""
    def set_d(key, value):
        def spoil(c, p, d, n):
            d[key] = value(d) if callable(value) else value
        return spoil

    def set_p(key, value):
        def spoil(c, p, d, n):
            if value is None:
                del p[key]
            else:
                p[key] = value(p[key]) if callable(value) else value
        return spoil
    return [
        ("cell", lambda c, p, d, n: "gru", ValueError, "cell must be one of"),
        ("x-list", set_d("x", lambda d: d["x"].tolist()), TypeError, "x must be a NumPy"),
        ("x-2d", set_d("x", lambda d: d["x"][0]), ValueError, "x has shape"),
        ("x-int", set_d("x", lambda d: d["x"].astype(np.int64)), TypeError, "x has dtype"),
        ("x-half", set_d("x", lambda d: d["x"].astype(np.float16)), TypeError, "x has dtype"),
        ("x-features", set_d("x", lambda d: d["x"][:, :, :2].copy()), ValueError,
         r"params\['weight_ih_l0'\] has shape"),
        ("param-missing", set_p("weight_gh_l1", None), ValueError, "missing.*weight_gh_l1"),
        ("param-unexpected", set_p("weight_hr_l0", np.zeros((H, H))), ValueError,
         "unexpected.*weight_hr_l0"),
        ("param-shape", set_p("weight_fb_l1", lambda w: w[:, :-1]), ValueError,
         r"params\['weight_fb_l1'\] has shape"),
        ("param-dtype", set_p("weight_ih_l0", lambda w: w.astype(np.float32)), TypeError,
         r"params\['weight_ih_l0'\] has dtype"),
        ("params-empty", lambda c, p, d, n: p.clear(), ValueError, "weight_fb_l0"),
        ("h0-shape", set_d("h0", lambda d: d["h0"][0]), ValueError, "h0 has shape"),
        ("h0-dtype", set_d("h0", lambda d: d["h0"].astype(np.float32)), TypeError,
         "h0 has dtype"),
        ("lengths-range", lambda c, p, d, n: n.__setitem__(0, T + 1), ValueError, "lengths"),
        ("masks-count", set_d("masks", lambda d: d["masks"][:1]), ValueError, "masks must be"),
        ("masks-shape", set_d("masks", lambda d: [m[:, :, :2] for m in d["masks"]]),
         ValueError, r"masks\[0\] has shape"),
    ]


@pytest.mark.parametrize("label,spoil,exc,match", _bad_forward_cases(),
                         ids=[c[0] for c in _bad_forward_cases()])
def test_bad_forward_arguments_are_named(rng, label, spoil, exc, match):
    cell = "gf_lstm"
    params, d = _draw(rng, cell, 3)
    lengths = np.array([T, 0, 2], np.int64)
    spoil(cell, params, d, lengths)
    cell = "gru" if label == "cell" else cell
    with pytest.raises(exc, match=match):
        _forward(cell, params, d, lengths)


def test_bad_forward_arguments_specific_to_a_cell(rng):
    params, d = _draw(rng, "gf_gru", 2)
    d["c0"] = d["h0"].copy()
    with pytest.raises(ValueError, match="c0 must be None for gf_gru"):
        _forward("gf_gru", params, d, None)
    params, d = _draw(rng, "gf_gru", 2)
    with pytest.raises(TypeError, match="lengths must be"):
        _forward("gf_gru", params, d, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="params must be a dict"):
        feedback_forward("gf_gru", d["x"], list(params.values()), d["h0"], None, None,
                         d["masks"], True)


@pytest.mark.parametrize("what,spoil,exc,match", [
    ("dy", lambda d, s: d.__setitem__("dy", d["dy"][:-1]), ValueError, "dy has shape"),
    ("dy-dtype", lambda d, s: d.__setitem__("dy", d["dy"].astype(np.float32)), TypeError,
     "dy has dtype"),
    ("dh_n", lambda d, s: d.__setitem__("dh", d["dh"][:2]), ValueError, "dh_n has shape"),
    ("dc_n", lambda d, s: d.__setitem__("dc", d["dc"][:, :2]), ValueError, "dc_n has shape"),
    ("saved-short", lambda d, s: s.pop(), ValueError, "saved must be the tuple"),
    ("saved-shape", lambda d, s: s.__setitem__(0, s[0][:-1]), ValueError, "saved h has shape"),
    ("saved-dtype", lambda d, s: s.__setitem__(2, s[2].astype(np.float32)), TypeError,
     "saved gates has dtype"),
])
def test_bad_backward_arguments_are_named(rng, what, spoil, exc, match):
    cell = "gf_lstm"
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, 3)
    saved = list(_forward(cell, params, d, lengths)[3])
    spoil(d, saved)
    with pytest.raises(exc, match=match):
        _backward(cell, params, d, saved, lengths)


def test_options_are_refused_naming_the_keys(rng):
    params, d = _draw(rng, "gf_rnn_tanh", 2)
    saved = _forward("gf_rnn_tanh", params, d, None)[3]
    for options in ({"threads": 2}, {"path": "fused"}):
        key = sorted(options)[0]
        with pytest.raises(ValueError, match=key):
            feedback_forward("gf_rnn_tanh", d["x"], params, d["h0"], None, None, d["masks"],
                             True, options=options)
        with pytest.raises(ValueError, match=key):
            feedback_backward("gf_rnn_tanh", d["x"], params, saved, None, d["masks"], d["dy"],
                              d["dh"], None, options=options)
    with pytest.raises(TypeError, match="dict"):
        feedback_forward("gf_rnn_tanh", d["x"], params, d["h0"], None, None, d["masks"], True,
                         options=["threads"])
    for ok in (None, {}):
        feedback_forward("gf_rnn_tanh", d["x"], params, d["h0"], None, None, d["masks"], False,
                         options=ok)


def test_none_states_are_zeros(rng):
    params, d = _draw(rng, "gf_lstm", 2)
    zeros = dict(d, h0=np.zeros_like(d["h0"]), c0=np.zeros_like(d["c0"]))
    nones = dict(d, h0=None, c0=None)
    y0 = _forward("gf_lstm", params, zeros, None)
    y1 = _forward("gf_lstm", params, nones, None)
    for a, b in zip(y0[:3], y1[:3]):
        assert np.array_equal(a, b)
    g0 = feedback_backward("gf_lstm", d["x"], params, y0[3], None, d["masks"], d["dy"],
                           np.zeros_like(d["dh"]), np.zeros_like(d["dc"]))
    g1 = feedback_backward("gf_lstm", d["x"], params, y0[3], None, d["masks"], d["dy"], None, None)
    for a, b in zip(g0[:3] + tuple(g0[3].values()), g1[:3] + tuple(g1[3].values())):
        assert np.array_equal(a, b)


# ---- FeedbackStack ---------------------------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_the_stack_has_stacks_interface(cell):
    st = FeedbackStack(cell, I, H, 3, dropout=0.5)
    lstm = cell == "gf_lstm"
    assert (st.cell, st.input_size, st.hidden_size, st.num_layers, st.bias, st.dropout,
            st.bidirectional, st.directions, st.state_width, st.zoneout,
            st.recurrent_dropout) == (cell, I, H, 3, True, 0.5, False, 1, H, None, 0.0)
    assert st.states == (("h", "c") if lstm else ("h",))
    assert st.layer.cell.has_cell_state == lstm and st.layer.cell.name == cell
    assert st.layer.init_bound(16) == 0.25
    assert st.state_shape(5) == st.state_shape(5, "c") == (3, 5, H)
    assert st.mask_shapes(T, 5) == [(T, 5, H)] * 2
    assert FeedbackStack(cell, I, H, 3).mask_shapes(T, 5) == []
    assert st.noise_specs(T, 5, True) is None
    G = {"gf_rnn_tanh": 1, "gf_rnn_relu": 1, "gf_gru": 3, "gf_lstm": 4}[cell]
    hh = {"gf_rnn_tanh": [], "gf_rnn_relu": [], "gf_gru": [("weight_hh", (2 * H, H))],
          "gf_lstm": [("weight_hh", (3 * H, H))]}[cell]
    expected = []
    for k in range(3):
        in_k = I if k == 0 else H
        expected += [(n + f"_l{k}", s) for n, s in
                     [("weight_ih", (G * H, in_k))] + hh +
                     [("bias_ih", (G * H,)), ("bias_hh", (G * H,)), ("weight_fb", (H, 3 * H)),
                      ("weight_gx", (3, in_k)), ("weight_gh", (3, 3 * H)), ("bias_g", (3,))]]
    assert st.param_shapes() == expected
    nobias = FeedbackStack(cell, I, H, 2, bias=False).param_shapes()
    assert not any("bias" in n for n, _ in nobias) and len(nobias) == 2 * (5 + len(hh) - 1)


def test_the_stack_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="reverse direction has no per-layer recurrence"):
        FeedbackStack("gf_lstm", I, H, 2, bidirectional=True)
    with pytest.raises(ValueError, match="cell must be one of"):
        FeedbackStack("lstm", I, H)
    with pytest.raises(ValueError, match="hidden_size must be >= 1"):
        FeedbackStack("gf_gru", I, 0)
    with pytest.raises(TypeError, match="num_layers must be an int"):
        FeedbackStack("gf_gru", I, H, 2.0)
    for p in (1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="dropout must be a number in"):
            FeedbackStack("gf_gru", I, H, 2, dropout=p)
    with pytest.raises(ValueError, match="zoneout and recurrent_dropout are not supported"):
        FeedbackStack("gf_lstm", I, H, 2, zoneout=(0.1, 0.1))
    with pytest.raises(ValueError, match="zoneout and recurrent_dropout are not supported"):
        FeedbackStack("gf_gru", I, H, 2, recurrent_dropout=0.1)


@pytest.mark.parametrize("cell", CELLS)
def test_the_stack_runs_the_reference(rng, cell):
    L = 3
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, L)
    st = FeedbackStack(cell, I, H, L, dropout=P_DROP)
    run = Run(backend="numpy", xp=np, lengths=lengths)
    y, h_n, c_n, saved = st.forward(run, d["x"], params, d["h0"], d["c0"], d["masks"])
    assert saved.inputs[0] is d["x"]
    dx, dh0, dc0, grads = st.backward(run, saved, params, d["dy"], d["dh"], d["dc"])
    expected = _results(cell, params, d, lengths)
    got = {"y": y, "h_n": h_n, "dx": dx, "dh0": dh0, **grads}
    if cell == "gf_lstm":
        got.update(c_n=c_n, dc0=dc0)
    else:
        assert c_n is None and dc0 is None
    assert sorted(got) == sorted(expected)
    for what in expected:
        assert np.array_equal(got[what], expected[what]), what
    # what crosses a framework boundary: saved_specs describes arrays(); saved_from rebuilds
    arrays = saved.arrays()
    specs = st.saved_specs(run, T, B, np.float64)
    assert [(a.shape, a.dtype) for a in arrays] == specs
    rebuilt = st.saved_from(d["x"], [a.copy() for a in arrays], d["masks"])
    again = st.backward(run, rebuilt, params, d["dy"], d["dh"], d["dc"])
    for a, b in zip((dx, dh0, *grads.values()), (again[0], again[1], *again[3].values())):
        assert np.array_equal(a, b)
    # evaluation: no saved, the same outputs, and no masks means no dropout
    y_eval, _, _, none = st.forward(Run(backend="numpy", xp=np, lengths=lengths,
                                        need_saved=False), d["x"], params, d["h0"], d["c0"],
                                    d["masks"])
    assert none is None and np.array_equal(y_eval, y)
    unmasked = st.forward(run, d["x"], params, d["h0"], d["c0"], None)[0]
    assert rel_err(unmasked, y) > 1e-3
    assert np.array_equal(unmasked, _forward(cell, params, dict(d, masks=None), lengths)[0])


def test_the_stack_checks_its_arguments(rng):
    cell, L = "gf_lstm", 2
    params, d = _draw(rng, cell, L)
    st = FeedbackStack(cell, I, H, L)
    run = Run(backend="numpy", xp=np)
    with pytest.raises(ValueError, match=r"x has shape .* expected \(T, B, input_size\)"):
        st.forward(run, d["x"][:, :, :2], params)
    with pytest.raises(ValueError, match="at least one step"):
        st.forward(run, d["x"][:0], params)
    with pytest.raises(TypeError, match="x has dtype"):
        st.forward(run, d["x"].astype(np.float16), params)
    with pytest.raises(ValueError, match=r"h0 has shape .* expected \(L, B, H\)"):
        st.forward(run, d["x"], params, d["h0"][:1])
    with pytest.raises(TypeError, match="c0 has dtype"):
        st.forward(run, d["x"], params, d["h0"], d["c0"].astype(np.float32))
    with pytest.raises(ValueError, match="missing.*weight_gx_l1"):
        st.forward(run, d["x"], {k: v for k, v in params.items() if k != "weight_gx_l1"})
    saved = st.forward(run, d["x"], params)[3]
    with pytest.raises(ValueError, match="dy has shape"):
        st.backward(run, saved, params, d["dy"][:, :, :2])
    with pytest.raises(TypeError, match="dy has dtype"):
        st.backward(run, saved, params, d["dy"].astype(np.float32))
    with pytest.raises(ValueError, match="dc_n has shape"):
        st.backward(run, saved, params, d["dy"], d["dh"], d["dc"][:, :1])
    with pytest.raises(ValueError, match="not supported"):
        st.saved_from(d["x"], saved.arrays(), None, noise=[{"recurrent": np.ones((B, H))}])


def test_the_stack_names_the_backends_that_run_it(rng):
    params, d = _draw(rng, "gf_gru", 2)
    st = FeedbackStack("gf_gru", I, H, 2)
    with pytest.raises(ValueError, match=r"run on the backends \('numpy', 'cpu', 'sim', 'cuda'\)"):
        st.forward(Run(backend="tpu", xp=np), d["x"], params)
    with pytest.raises(ValueError, match="threads"):
        st.forward(Run(backend="numpy", xp=np, options={"threads": 2}), d["x"], params)


def test_the_cpu_backend_runs_the_reference(rng):
    pytest.importorskip("numba", reason="the cpu backend's option check imports its kernels")
    cell, L = "gf_lstm", 3
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, cell, L)
    st = FeedbackStack(cell, I, H, L)
    results = []
    for backend, options in (("numpy", None), ("cpu", {"threads": 1})):
        run = Run(backend=backend, xp=np, options=options, lengths=lengths)
        y, h_n, c_n, saved = st.forward(run, d["x"], params, d["h0"], d["c0"], d["masks"])
        dx, dh0, dc0, grads = st.backward(run, saved, params, d["dy"], d["dh"], d["dc"])
        results.append([y, h_n, c_n, dx, dh0, dc0, *grads.values()])
    for a, b in zip(*results):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="bogus"):
        st.forward(Run(backend="cpu", xp=np, options={"bogus": 1}), d["x"], params)
