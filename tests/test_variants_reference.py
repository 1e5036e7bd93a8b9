"""The NumPy reference of the LSTM family (gpurnn/backends/numpy_lstm.py, the contract of
gpurnn/variants.py), checked against what it must agree with:
  - float64 central finite differences of every gradient (every parameter, x, h0, c0) of every
    form, with lengths (a full-length and a 0-length row) and reverse;
  - LSTMForm() against the plain cell of gpurnn.backends.numpy (to 1e-12);
  - zero peepholes against the form without them (bit for bit);
  - CIFG against a plain LSTM whose forget gate is made 1 - i by its weights;
  - NaN in padded steps, read-only arguments, backward twice on one saved tuple, options.
Objective of the gradient checks: L = sum(dy*y) + sum(dh*h_n) + sum(dc*c_n) with random dy, dh,
dc, so the analytic gradient is lstm_backward(..., dy, dh, dc).
"""
import numpy as np
import pytest

from gpurnn.backends import cpu as cpu_backend
from gpurnn.backends import numpy as ref
from gpurnn.testing import FD_TOL, GRAD_TOL, TOL, rel_err
from gpurnn.variants import LSTMForm, form_of

T, B, I, H, P = 4, 3, 3, 4, 2
EPS = 1e-6
FORMS = ["lstm", "lstm_peephole", "cifg", "cifg_peephole", "mlstm", f"lstm_proj{P}",
         f"lstm_peephole_proj{P}", f"cifg_proj{P}", f"cifg_peephole_proj{P}"]
# (lengths, reverse, bias): lengths with a full-length and a 0-length row, unsorted
RUNS = {
    "all-T": (None, False, True),
    "lengths": ([T, 0, 2], False, True),
    "lengths-reverse": ([T, 0, 2], True, True),
    "lengths-reverse-nobias": ([1, T, 0], True, False),
}
FORWARD_GRADS = {"dx": "dx", "dh0": "dh0", "dc0": "dc0", "weight_ih": "dw_ih",
                 "weight_hh": "dw_hh", "bias_ih": "db_ih", "bias_hh": "db_hh"}


def _lengths(lengths):
    return None if lengths is None else np.asarray(lengths, np.int64)


def _draw(rng, form, bias=True, dtype=np.float64, T=T, B=B, I=I, H=H, scale=0.8):
    """Parameters, inputs and the objective's weights of one case."""
    R = form.state_size(H)
    params = {name: rng.uniform(-scale, scale, shape).astype(dtype)
              for name, shape in form.param_shapes(I, H, bias)}
    data = {"x": rng.standard_normal((T, B, I)), "h0": rng.standard_normal((B, R)),
            "c0": rng.standard_normal((B, H)), "dy": rng.standard_normal((T, B, R)),
            "dh": rng.standard_normal((B, R)), "dc": rng.standard_normal((B, H))}
    return params, {k: v.astype(dtype) for k, v in data.items()}


def _forward(form, params, d, lengths, reverse, need_saved=True, backend=ref):
    return backend.lstm_forward(form, d["x"], params, d["h0"], d["c0"], lengths, reverse,
                                need_saved)


def _backward(form, params, d, saved, lengths, reverse, backend=ref):
    return backend.lstm_backward(form, d["x"], params, saved, lengths, reverse, d["dy"], d["dh"],
                                 d["dc"])


def _results(form, params, d, lengths, reverse, backend=ref):
    """{name: array}: y, h_n, c_n and every gradient (by parameter name, dx, dh0, dc0)."""
    y, h_n, c_n, saved = _forward(form, params, d, lengths, reverse, backend=backend)
    dx, dh0, dc0, grads = _backward(form, params, d, saved, lengths, reverse, backend=backend)
    return {"y": y, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0, **grads}


def _loss(form, params, d, lengths, reverse):
    y, h_n, c_n, _ = _forward(form, params, d, lengths, reverse, need_saved=False)
    return float((d["dy"] * y).sum() + (d["dh"] * h_n).sum() + (d["dc"] * c_n).sum())


def _numeric(form, params, d, lengths, reverse, arr):
    """Central differences of the objective with respect to every element of `arr` (one of the
    arrays in params or d, perturbed in place and restored)."""
    out = np.empty_like(arr)
    for idx in np.ndindex(arr.shape):
        keep = arr[idx]
        arr[idx] = keep + EPS
        up = _loss(form, params, d, lengths, reverse)
        arr[idx] = keep - EPS
        down = _loss(form, params, d, lengths, reverse)
        arr[idx] = keep
        out[idx] = (up - down) / (2 * EPS)
    return out


@pytest.mark.parametrize("run", list(RUNS))
@pytest.mark.parametrize("name", FORMS)
def test_every_gradient_matches_finite_differences(rng, name, run):
    form = form_of(name)
    lengths, reverse, bias = RUNS[run]
    lengths = _lengths(lengths)
    params, d = _draw(rng, form, bias)
    got = _results(form, params, d, lengths, reverse)
    expected_names = [n for n, _ in form.param_shapes(I, H, bias)]
    assert sorted(k for k in got if k not in ("y", "h_n", "c_n", "dx", "dh0", "dc0")) == \
        sorted(expected_names)
    checked = {n: params[n] for n in expected_names}
    checked.update(dx=d["x"], dh0=d["h0"], dc0=d["c0"])
    for what, arr in checked.items():
        numeric = _numeric(form, params, d, lengths, reverse, arr)
        assert got[what].shape == arr.shape and got[what].dtype == arr.dtype, what
        err = rel_err(got[what], numeric)
        assert err <= FD_TOL, f"{name} {run}: {what} off finite differences by {err:.2e}"


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", FORMS)
def test_gradients_at_one_step_and_one_sequence(rng, name, reverse):
    # T = 1, B = 1 and sizes that are not those of the cases above (I 2, H 5)
    form = form_of(name)
    params, d = _draw(rng, form, T=1, B=1, I=2, H=5)
    lengths = np.array([1], np.int64)
    got = _results(form, params, d, lengths, reverse)
    checked = {**params, "dx": d["x"], "dh0": d["h0"], "dc0": d["c0"]}
    for what, arr in checked.items():
        err = rel_err(got[what], _numeric(form, params, d, lengths, reverse, arr))
        assert err <= FD_TOL, f"{name}: {what} off finite differences by {err:.2e}"


@pytest.mark.parametrize("name", FORMS)
def test_a_zero_length_row_passes_its_states_through(rng, name):
    form = form_of(name)
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, form)
    for reverse in (False, True):
        r = _results(form, params, d, lengths, reverse)
        assert np.array_equal(r["y"][:, 1], np.zeros_like(r["y"][:, 1]))
        assert np.array_equal(r["y"][2:, 2], np.zeros_like(r["y"][2:, 2]))
        assert np.array_equal(r["h_n"][1], d["h0"][1]) and np.array_equal(r["c_n"][1], d["c0"][1])
        assert np.array_equal(r["dh0"][1], d["dh"][1]) and np.array_equal(r["dc0"][1], d["dc"][1])
        assert not r["dx"][:, 1].any() and not r["dx"][2:, 2].any()


def _plain_reference(params, d, lengths, reverse):
    bias = "bias_ih" in params
    y, h_n, c_n, reserve = ref.forward("lstm", d["x"], params["weight_ih"], params["weight_hh"],
                                       params.get("bias_ih"), params.get("bias_hh"), d["h0"],
                                       d["c0"], lengths, reverse, True)
    g = ref.backward(reserve, d["dy"], d["dh"], d["dc"])
    out = {"y": y, "h_n": h_n, "c_n": c_n}
    out.update({k: getattr(g, v) for k, v in FORWARD_GRADS.items() if bias or "bias" not in k})
    return out, reserve


@pytest.mark.parametrize("run", list(RUNS))
def test_the_plain_form_is_the_plain_cell(rng, run):
    lengths, reverse, bias = RUNS[run]
    lengths = _lengths(lengths)
    form = LSTMForm()
    params, d = _draw(rng, form, bias)
    got = _results(form, params, d, lengths, reverse)
    expected, reserve = _plain_reference(params, d, lengths, reverse)
    assert sorted(got) == sorted(expected)
    for what in expected:
        err = rel_err(got[what], expected[what])
        assert err <= 1e-12, f"{run}: {what} differs from backends.numpy 'lstm' by {err:.2e}"
    saved = _forward(form, params, d, lengths, reverse)[3]
    for mine, theirs in zip(saved, (reserve.h, reserve.c, reserve.gates)):
        assert rel_err(mine, theirs) <= 1e-12


PEEPHOLE_PAIRS = [("lstm_peephole", "lstm"), ("cifg_peephole", "cifg"),
                  (f"lstm_peephole_proj{P}", f"lstm_proj{P}"),
                  (f"cifg_peephole_proj{P}", f"cifg_proj{P}")]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("run", ["all-T", "lengths-reverse"])
@pytest.mark.parametrize("with_peephole,without", PEEPHOLE_PAIRS)
def test_zero_peepholes_are_the_form_without_them_bit_for_bit(rng, with_peephole, without, run,
                                                             dtype):
    lengths, reverse, bias = RUNS[run]
    lengths = _lengths(lengths)
    form = form_of(with_peephole)
    params, d = _draw(rng, form, bias, dtype)
    params["weight_ch"] = np.zeros_like(params["weight_ch"])
    got = _results(form, params, d, lengths, reverse)
    plain_params = {k: v for k, v in params.items() if k != "weight_ch"}
    expected = _results(form_of(without), plain_params, d, lengths, reverse)
    assert sorted(got) == sorted([*expected, "weight_ch"])
    for what in expected:
        assert np.array_equal(got[what], expected[what]), f"{what} differs"
    # the peephole gradient itself is not zero: the check above is not vacuous
    assert np.abs(got["weight_ch"]).max() > 0


def _forced_plain(params, H):
    """Plain-LSTM parameters whose forget gate is 1 - i: W_f = -W_i, b_f = -b_i (ih and hh), so
    a_f = -a_i and sigma(a_f) = 1 - sigma(a_i); g and o copied. Coupled gates are [i, g, o]."""
    out = {}
    for name, w in params.items():
        i, g, o = w[:H], w[H: 2 * H], w[2 * H:]
        out[name] = np.concatenate([i, -i, g, o])
    return out


@pytest.mark.parametrize("run", list(RUNS))
def test_cifg_is_a_plain_lstm_whose_forget_gate_is_one_minus_i(rng, run):
    lengths, reverse, bias = RUNS[run]
    lengths = _lengths(lengths)
    form = form_of("cifg")
    params, d = _draw(rng, form, bias)
    got = _results(form, params, d, lengths, reverse)
    plain = _results(LSTMForm(), _forced_plain(params, H), d, lengths, reverse)
    for what in ("y", "h_n", "c_n", "dx", "dh0", "dc0"):
        err = rel_err(got[what], plain[what])
        assert err <= 1e-12, f"{run}: {what} differs by {err:.2e}"
    for name in params:
        pg = plain[name]
        i, f, g, o = pg[:H], pg[H: 2 * H], pg[2 * H: 3 * H], pg[3 * H:]
        # a_i drives both i and f = 1 - i: its gradient is dW_i - dW_f of the plain cell
        expected = np.concatenate([i - f, g, o])
        err = rel_err(got[name], expected)
        assert err <= 1e-12, f"{run}: {name} differs by {err:.2e}"


def _with_padding(d, lengths, value):
    """d with x and dy set to `value` on the padded steps (t >= lengths[b])."""
    pad = np.arange(T)[:, None] >= lengths[None, :]
    out = dict(d)
    for k in ("x", "dy"):
        out[k] = d[k].copy()
        out[k][pad] = value
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", FORMS)
def test_nan_in_padded_steps_changes_nothing(rng, name, reverse, dtype):
    form = form_of(name)
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, form, dtype=dtype)
    clean = _results(form, params, _with_padding(d, lengths, 0), lengths, reverse)
    dirty = _results(form, params, _with_padding(d, lengths, np.nan), lengths, reverse)
    for what in clean:
        assert np.isfinite(clean[what]).all(), what
        assert np.array_equal(dirty[what], clean[what]), f"{what} changed by NaN padding"


def _read_only(arrays):
    for a in arrays:
        a.setflags(write=False)


@pytest.mark.parametrize("name", FORMS)
def test_arguments_and_saved_are_never_written(rng, name):
    # H = 1 too: there w.T of a (G, 1) weight is C-contiguous, a view a careless copy keeps
    form = form_of(name)
    for h_size in (H, 1):
        if form.proj_size and h_size <= form.proj_size:
            continue
        lengths = np.array([T, 0, 2], np.int64)
        params, d = _draw(rng, form, H=h_size)
        _read_only(list(params.values()) + list(d.values()) + [lengths])
        y, h_n, c_n, saved = _forward(form, params, d, lengths, True)
        kept = [s.copy() for s in saved]
        _read_only(saved)
        first = _backward(form, params, d, saved, lengths, True)
        again = _backward(form, params, d, saved, lengths, True)
        for s, k in zip(saved, kept):
            assert np.array_equal(s, k)
        for a, b in zip(first[:3] + tuple(first[3].values()), again[:3] + tuple(again[3].values())):
            assert np.array_equal(a, b)
        assert list(first[3]) == list(again[3])
        # every result is an array of its own: no view of an argument, of saved or of another
        results = [y, h_n, c_n, *first[:3], *first[3].values()]
        given = [*params.values(), *d.values(), *saved]
        for k, a in enumerate(results):
            for other in results[k + 1:] + given:
                assert not np.shares_memory(a, other)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", FORMS)
def test_saved_layout_and_dtypes_follow_the_contract(rng, name, dtype):
    form = form_of(name)
    params, d = _draw(rng, form, dtype=dtype)
    y, h_n, c_n, saved = _forward(form, params, d, None, False)
    specs = form.saved_specs(T, B, I, H, dtype)
    assert len(saved) == len(specs)
    for arr, (what, shape, dt) in zip(saved, specs):
        assert arr.shape == shape and arr.dtype == dt, what
    R = form.state_size(H)
    assert y.shape == (T, B, R) and h_n.shape == (B, R) and c_n.shape == (B, H)
    assert y.dtype == h_n.dtype == c_n.dtype == dtype
    # y is the saved boundary states, h_n and c_n the last ones; no saved: the same outputs
    assert np.array_equal(y, saved[0][1:]) and np.array_equal(h_n, saved[0][T])
    assert np.array_equal(c_n, saved[1][T])
    y2, h_n2, c_n2, none = _forward(form, params, d, None, False, need_saved=False)
    assert none is None
    assert np.array_equal(y, y2) and np.array_equal(h_n, h_n2) and np.array_equal(c_n, c_n2)
    dx, dh0, dc0, grads = _backward(form, params, d, saved, None, False)
    assert dx.dtype == dh0.dtype == dc0.dtype == dtype
    assert all(g.dtype == dtype and g.shape == params[k].shape for k, g in grads.items())


@pytest.mark.parametrize("name", FORMS)
def test_float32_is_close_to_float64(rng, name):
    form = form_of(name)
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, form, scale=0.5)
    exact = _results(form, params, d, lengths, True)
    single = _results(form, {k: v.astype(np.float32) for k, v in params.items()},
                      {k: v.astype(np.float32) for k, v in d.items()}, lengths, True)
    for what in exact:
        tol = TOL["float32"] if what in ("y", "h_n", "c_n") else GRAD_TOL["float32"]
        assert rel_err(single[what], exact[what]) <= tol, what


def test_cpu_backend_runs_the_reference(rng):
    form = form_of(f"lstm_peephole_proj{P}")
    lengths = np.array([T, 0, 2], np.int64)
    params, d = _draw(rng, form)
    mine = _results(form, params, d, lengths, True, backend=cpu_backend)
    expected = _results(form, params, d, lengths, True)
    for what in expected:
        assert np.array_equal(mine[what], expected[what]), what
    # the cpu backend's own options are accepted, others are not
    cpu_backend.lstm_forward(form, d["x"], params, d["h0"], d["c0"], None, False, False,
                             options={"threads": 1})
    with pytest.raises(ValueError, match="bogus"):
        cpu_backend.lstm_forward(form, d["x"], params, d["h0"], d["c0"], None, False, False,
                                 options={"bogus": 1})


@pytest.mark.parametrize("options", [{"threads": 2}, {"path": "fused", "blocks": 4}])
def test_options_are_refused_naming_the_keys(rng, options):
    form = form_of("mlstm")
    params, d = _draw(rng, form)
    saved = _forward(form, params, d, None, False)[3]
    key = sorted(options)[0]
    with pytest.raises(ValueError, match=key):
        ref.lstm_forward(form, d["x"], params, d["h0"], d["c0"], None, False, True,
                         options=options)
    with pytest.raises(ValueError, match=key):
        ref.lstm_backward(form, d["x"], params, saved, None, False, d["dy"], d["dh"], d["dc"],
                          options=options)
    with pytest.raises(TypeError, match="dict"):
        ref.lstm_forward(form, d["x"], params, d["h0"], d["c0"], None, False, True,
                         options=["threads"])
    # None and {} are both fine
    for ok in (None, {}):
        ref.lstm_forward(form, d["x"], params, d["h0"], d["c0"], None, False, False, options=ok)


@pytest.mark.parametrize("first", ["gpurnn.backends.numpy_lstm", "gpurnn.backends.numpy"])
def test_either_module_may_be_imported_first(first):
    # backends.numpy re-exports the entry points from its last line and numpy_lstm reads
    # numpy's helpers from its own: a fresh interpreter importing either one first must work
    import subprocess
    import sys
    script = (f"import sys, importlib; importlib.import_module({first!r}); "
              "from gpurnn.backends import numpy, numpy_lstm; "
              "assert numpy.lstm_forward is numpy_lstm.lstm_forward; "
              "assert numpy_lstm.check_options is numpy.check_options; print('ok')")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
