"""The LSTM variants' kernels (kernel cells lstm_peephole, cifg, cifg_peephole: gpurnn.cells,
gpurnn.kernels.cellmath) in gpurnn's strict simulator through the backends' lstm_forward /
lstm_backward (gpurnn.variants), against the NumPy reference (gpurnn.backends.numpy_lstm):
outputs, final states, the saved (h, c, gates) and every gradient, weight_ch's included.

The strict simulator runs all P blocks of a persistent launch at once with a real grid barrier,
so here each persistent forward and backward is ONE launch over all steps with P > 1 blocks,
P not dividing H (a last block with fewer units), as on a GPU; any race, barrier error,
out-of-bounds index or uninitialised shared read fails the call (and every launch's report is
checked for zero findings). The cases are a covering set: H 7 and 33, B 1 and 3, unsorted
lengths with a length T and a shorter one, reverse, bias=False, float32 and float64, one and
two lanes per dot product, a batch staged in two tiles; each on the persistent and the stepwise
path.
"""
import sys
import zlib

import numpy as np
import pytest

import gpurnn.backends
from gpurnn import sim as strict
from gpurnn.backends import numpy_lstm, sim
from gpurnn.cells import CELLS, GATES, KERNEL_CELLS, RESERVE_GATES
from gpurnn.testing import TOL, assert_close
from gpurnn.variants import LSTMForm

pytestmark = pytest.mark.sim

FORMS = {"lstm_peephole": LSTMForm(peephole=True), "cifg": LSTMForm(coupled=True),
         "cifg_peephole": LSTMForm(coupled=True, peephole=True)}
SHORT = {"float32": "f32", "float64": "f64"}

# (T, B, I, H, lengths, reverse, bias, dtype, persistent options): P never divides H
CASES = {
    "H7-B3-lengths-f64": (3, 3, 4, 7, [3, 1, 2], False, True, "float64",
                          dict(blocks=3, threads=32)),
    "H33-B1-reverse-nobias-f32": (3, 1, 5, 33, None, True, False, "float32",
                                  dict(blocks=4, threads=32)),
    "H7-B1-lengths-reverse-f32-2lanes": (3, 1, 3, 7, [2], True, True, "float32",
                                         dict(blocks=2, threads=32)),
    "H33-B3-lengths-nobias-f64-tiles": (2, 3, 2, 33, [1, 2, 2], False, False, "float64",
                                        dict(blocks=5, threads=64, batch_tile=2)),
}


def make_case(form, T, B, I, H, bias, dtype, seed):
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (0.5 * rng.standard_normal(shape)).astype(dtype)
    params = {name: rand(*shape) for name, shape in form.param_shapes(I, H, bias)}
    if form.peephole:       # peepholes large enough to matter
        params["weight_ch"] = rand(form.peepholes * H) * 2
    inputs = dict(x=rand(T, B, I), h0=rand(B, H), c0=rand(B, H))
    cot = dict(dy=rand(T, B, H), dh_n=rand(B, H), dc_n=rand(B, H))
    return params, inputs, cot


def copies(d):
    return {k: v.copy() for k, v in d.items()}


def run_both(form, params, inputs, cot, lengths, reverse, options):
    """(sim forward, sim backward, reference forward, reference backward, launch reports)."""
    p0, i0, c0 = copies(params), copies(inputs), copies(cot)
    with strict.record() as reports:
        out = sim.lstm_forward(form, inputs["x"], params, inputs["h0"], inputs["c0"], lengths,
                               reverse, True, options=options)
        grads = sim.lstm_backward(form, inputs["x"], params, out[3], lengths, reverse,
                                  cot["dy"], cot["dh_n"], cot["dc_n"], options=options)
    # never a write into an argument
    for a, b in ((params, p0), (inputs, i0), (cot, c0)):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ref_out = numpy_lstm.lstm_forward(form, inputs["x"], params, inputs["h0"], inputs["c0"],
                                      lengths, reverse, True)
    ref_grads = numpy_lstm.lstm_backward(form, inputs["x"], params, ref_out[3], lengths, reverse,
                                         cot["dy"], cot["dh_n"], cot["dc_n"])
    return out, grads, ref_out, ref_grads, reports


def assert_matches(out, grads, ref_out, ref_grads, dtype):
    tol = TOL[dtype]
    for name, a, b in zip(("y", "h_n", "c_n"), out[:3], ref_out[:3]):
        assert a.dtype == np.dtype(dtype), name
        assert_close(a, b, tol, name)
    assert len(out[3]) == 3
    for name, a, b in zip(("h", "c", "gates"), out[3], ref_out[3]):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, tol, f"saved {name}")
    for name, a, b in zip(("dx", "dh0", "dc0"), grads[:3], ref_grads[:3]):
        assert a.dtype == np.dtype(dtype), name
        assert_close(a, b, tol, name)
    assert set(grads[3]) == set(ref_grads[3])
    for name in ref_grads[3]:
        assert grads[3][name].shape == ref_grads[3][name].shape, name
        assert grads[3][name].dtype == np.dtype(dtype), name
        assert_close(grads[3][name], ref_grads[3][name], tol, f"d{name}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cell", KERNEL_CELLS)
def test_persistent_kernels_match_the_reference(cell, case):
    T, B, I, H, lengths, reverse, bias, dtype, opts = CASES[case]
    form = FORMS[cell]
    assert form.kernel_cell == cell
    params, inputs, cot = make_case(form, T, B, I, H, bias, dtype, seed=zlib.crc32(f"{cell}-{case}".encode()))
    lengths = None if lengths is None else np.array(lengths)
    options = dict(opts, path="persistent")
    out, grads, ref_out, ref_grads, reports = run_both(form, params, inputs, cot, lengths,
                                                       reverse, options)
    assert_matches(out, grads, ref_out, ref_grads, dtype)
    # one launch each way, all P blocks at once, the grid barrier between steps / phases
    P = opts["blocks"]
    assert H % P != 0
    assert [r.kernel for r in reports] == [f"{cell}_persistent_fwd_{SHORT[dtype]}",
                                           f"{cell}_persistent_bwd_{SHORT[dtype]}"]
    assert [r.grid for r in reports] == [(P, 1, 1)] * 2
    assert [r.block for r in reports] == [(opts["threads"], 1, 1)] * 2
    assert [r.grid_barriers for r in reports] == [T - 1, T]
    assert all(r.findings == [] for r in reports)
    if form.peephole:        # the kernels read the peephole vector (b_rec) in both directions
        for r in reports:
            assert r.traffic["b_rec"].reads.sum() > 0, r.kernel
            assert r.traffic["b_rec"].writes.sum() == 0, r.kernel


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cell", KERNEL_CELLS)
def test_stepwise_kernels_match_the_reference(cell, case):
    T, B, I, H, lengths, reverse, bias, dtype, opts = CASES[case]
    form = FORMS[cell]
    params, inputs, cot = make_case(form, T, B, I, H, bias, dtype,
                                    seed=zlib.crc32(f"{cell}-{case}-stepwise".encode()))
    lengths = None if lengths is None else np.array(lengths)
    options = dict(path="stepwise", threads=opts["threads"])
    out, grads, ref_out, ref_grads, reports = run_both(form, params, inputs, cot, lengths,
                                                       reverse, options)
    assert_matches(out, grads, ref_out, ref_grads, dtype)
    names = [r.kernel for r in reports]
    assert names == ([f"{cell}_pointwise_fwd_{SHORT[dtype]}"] * T
                     + [f"{cell}_pointwise_bwd_{SHORT[dtype]}"] * T)
    assert all(r.findings == [] for r in reports)


def test_kernel_cells_are_kernel_only():
    # in the kernels' and the plan's maps, not among the torch-facing cells
    assert set(KERNEL_CELLS) == {"lstm_peephole", "cifg", "cifg_peephole"}
    assert not set(KERNEL_CELLS) & set(CELLS)
    assert {c: (GATES[c], RESERVE_GATES[c]) for c in KERNEL_CELLS} == {
        "lstm_peephole": (4, 4), "cifg": (3, 3), "cifg_peephole": (3, 3)}
    for c in KERNEL_CELLS:
        assert FORMS[c].gates == GATES[c]


@pytest.mark.parametrize("path", ["persistent", "stepwise"])
def test_zero_peepholes_are_the_base_cell(path):
    # lstm_peephole with weight_ch = 0 is the plain LSTM kernel's result, bit for bit in the
    # forward (the added terms are exact zeros); cifg_peephole with 0 is cifg
    T, B, I, H = 3, 2, 3, 7
    opts = {"path": path, "threads": 32}
    if path == "persistent":
        opts["blocks"] = 2
    lengths = np.array([3, 2])
    for peep, base in ((LSTMForm(peephole=True), LSTMForm()),
                       (LSTMForm(coupled=True, peephole=True), LSTMForm(coupled=True))):
        params, inputs, cot = make_case(peep, T, B, I, H, True, "float64", seed=7)
        params["weight_ch"][:] = 0
        base_params = {k: v for k, v in params.items() if k != "weight_ch"}
        a = sim.lstm_forward(peep, inputs["x"], params, inputs["h0"], inputs["c0"], lengths,
                             False, True, options=opts)
        b = sim.lstm_forward(base, inputs["x"], base_params, inputs["h0"], inputs["c0"], lengths,
                             False, True, options=opts)
        for u, v in zip(a[:3], b[:3]):
            np.testing.assert_array_equal(u, v)
        ga = sim.lstm_backward(peep, inputs["x"], params, a[3], lengths, False, cot["dy"],
                               cot["dh_n"], cot["dc_n"], options=opts)
        gb = sim.lstm_backward(base, inputs["x"], base_params, b[3], lengths, False, cot["dy"],
                               cot["dh_n"], cot["dc_n"], options=opts)
        for u, v in zip(ga[:3], gb[:3]):
            np.testing.assert_array_equal(u, v)
        for k in base_params:
            np.testing.assert_array_equal(ga[3][k], gb[3][k])
        assert set(ga[3]) == set(gb[3]) | {"weight_ch"}
        assert np.abs(ga[3]["weight_ch"]).max() > 0      # a real gradient, even at 0


def test_peepholes_change_the_result():
    # the peephole terms are not dropped anywhere: with weight_ch != 0 the outputs and the
    # gradients differ from the base cell's by far more than rounding
    T, B, I, H = 3, 1, 3, 7
    form = LSTMForm(peephole=True)
    params, inputs, cot = make_case(form, T, B, I, H, True, "float64", seed=3)
    base_params = {k: v for k, v in params.items() if k != "weight_ch"}
    opts = {"path": "persistent", "blocks": 2, "threads": 32}
    a = sim.lstm_forward(form, inputs["x"], params, inputs["h0"], inputs["c0"], None, False,
                         True, options=opts)
    b = sim.lstm_forward(LSTMForm(), inputs["x"], base_params, inputs["h0"], inputs["c0"], None,
                         False, True, options=opts)
    assert np.abs(a[0] - b[0]).max() > 1e-3
    ga = sim.lstm_backward(form, inputs["x"], params, a[3], None, False, cot["dy"], cot["dh_n"],
                           cot["dc_n"], options=opts)
    gb = sim.lstm_backward(LSTMForm(), inputs["x"], base_params, b[3], None, False, cot["dy"],
                           cot["dh_n"], cot["dc_n"], options=opts)
    assert np.abs(ga[2] - gb[2]).max() > 1e-3


def test_the_plain_form_runs_the_lstm_kernels():
    T, B, I, H = 2, 3, 3, 7
    form = LSTMForm()
    params, inputs, cot = make_case(form, T, B, I, H, True, "float32", seed=11)
    lengths = np.array([2, 1, 2])
    options = {"path": "persistent", "blocks": 3, "threads": 32}
    out, grads, ref_out, ref_grads, reports = run_both(form, params, inputs, cot, lengths, True,
                                                       options)
    assert_matches(out, grads, ref_out, ref_grads, "float32")
    assert [r.kernel for r in reports] == ["lstm_persistent_fwd_f32", "lstm_persistent_bwd_f32"]


def test_inference_saves_nothing_and_skips_the_gate_writes():
    T, B, I, H = 2, 1, 3, 7
    form = LSTMForm(coupled=True, peephole=True)
    params, inputs, _ = make_case(form, T, B, I, H, False, "float32", seed=5)
    with strict.record() as reports:
        y, h_n, c_n, saved = sim.lstm_forward(form, inputs["x"], params, inputs["h0"],
                                              inputs["c0"], None, False, False,
                                              options={"path": "persistent", "blocks": 2,
                                                       "threads": 32})
    assert saved is None
    assert reports[0].traffic["gates"].writes.sum() == 0
    ref = numpy_lstm.lstm_forward(form, inputs["x"], params, inputs["h0"], inputs["c0"], None,
                                  False, False)
    for a, b, name in zip((y, h_n, c_n), ref[:3], ("y", "h_n", "c_n")):
        assert_close(a, b, TOL["float32"], name)


@pytest.mark.parametrize("form,module", [(LSTMForm(proj_size=3), "cuda_proj"),
                                         (LSTMForm(peephole=True, proj_size=2), "cuda_proj"),
                                         (LSTMForm(multiplicative=True), "cuda_mlstm")])
def test_projection_and_mlstm_forms_are_dispatched(form, module, monkeypatch):
    # forms the kernel cells do not cover go to their own host modules with the same runtime
    calls = []

    class Stub:
        @staticmethod
        def run_forward(*args):
            calls.append(("fwd",) + args)
            return "fwd-result"

        @staticmethod
        def run_backward(*args):
            calls.append(("bwd",) + args)
            return "bwd-result"
    monkeypatch.setitem(sys.modules, f"gpurnn.backends.{module}", Stub)
    monkeypatch.setattr(gpurnn.backends, module, Stub, raising=False)
    x = np.zeros((2, 1, 3), np.float32)
    assert sim.lstm_forward(form, x, {}, None, None, None, True, True,
                            options={"threads": 32}) == "fwd-result"
    assert sim.lstm_backward(form, x, {}, (), None, False, None, None, None,
                             options={"simulator": "strict"}) == "bwd-result"
    (kind_f, rt_f, *fwd_args), (kind_b, rt_b, *bwd_args) = calls
    assert (kind_f, kind_b) == ("fwd", "bwd")
    assert rt_f is rt_b is sim.RUNTIME
    assert fwd_args[0] is form and fwd_args[1] is x and fwd_args[6:] == [True, True,
                                                                         {"threads": 32}]
    assert bwd_args[0] is form and bwd_args[5] is False and bwd_args[-1] == {}


STOCK_SCRIPT = """
import numpy as np
from gpurnn.backends import numpy_lstm, sim
from gpurnn.variants import LSTMForm
rng = np.random.default_rng(4)
T, B, I, H = 3, 2, 3, 7
form = LSTMForm(coupled=True, peephole=True)
p = {n: (0.5 * rng.standard_normal(s)).astype(np.float32) for n, s in form.param_shapes(I, H, True)}
x, h0, c0 = (rng.standard_normal(s).astype(np.float32) for s in ((T, B, I), (B, H), (B, H)))
dy, dh, dc = (rng.standard_normal(s).astype(np.float32) for s in ((T, B, H), (B, H), (B, H)))
lengths = np.array([3, 2])
log = []
sim.RUNTIME.launch_hook = log.append
opts = {"simulator": "stock", "path": "persistent", "blocks": 3}
out = sim.lstm_forward(form, x, p, h0, c0, lengths, True, True, options=opts)
g = sim.lstm_backward(form, x, p, out[3], lengths, True, dy, dh, dc, options=opts)
want = numpy_lstm.lstm_forward(form, x, p, h0, c0, lengths, True, True)
gw = numpy_lstm.lstm_backward(form, x, p, want[3], lengths, True, dy, dh, dc)
for a, b in list(zip(out[:3], want[:3])) + list(zip(g[:3], gw[:3])):
    assert np.allclose(a, b, rtol=1e-4, atol=1e-5), abs(a - b).max()
for k in gw[3]:
    assert np.allclose(g[3][k], gw[3][k], rtol=1e-4, atol=1e-5), k
assert [d["step_range"] for d in log if d["kind"] == "persistent_fwd"] == [(s, s + 1) for s in range(T)]
assert [d["step_range"] for d in log if d["kind"] == "persistent_bwd"] == [(k, k + 1) for k in range(T + 1)]
assert {d["simulator"] for d in log} == {"stock"}
print("STOCK-VARIANT-OK")
"""


def test_stock_simulator_runs_the_variants_once_per_step_in_a_fresh_process():
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", STOCK_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "STOCK-VARIANT-OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("cell", ["lstm_peephole", "cifg"])
def test_saved_tuples_are_interchangeable_with_the_reference(cell):
    # the same saved layout (gpurnn.variants): the reference's saved tuple feeds the kernels'
    # backward and the kernels' feeds the reference's
    T, B, I, H = 3, 2, 3, 7
    form = FORMS[cell]
    params, inputs, cot = make_case(form, T, B, I, H, True, "float64", seed=21)
    lengths = np.array([1, 3])
    opts = {"path": "persistent", "blocks": 2, "threads": 32}
    ours = sim.lstm_forward(form, inputs["x"], params, inputs["h0"], inputs["c0"], lengths, True,
                            True, options=opts)
    theirs = numpy_lstm.lstm_forward(form, inputs["x"], params, inputs["h0"], inputs["c0"],
                                     lengths, True, True)
    args = (lengths, True, cot["dy"], cot["dh_n"], cot["dc_n"])
    a = sim.lstm_backward(form, inputs["x"], params, theirs[3], *args, options=opts)
    b = numpy_lstm.lstm_backward(form, inputs["x"], params, ours[3], *args)
    for u, v, name in zip(a[:3], b[:3], ("dx", "dh0", "dc0")):
        assert_close(u, v, TOL["float64"], name)
    for name in b[3]:
        assert_close(a[3][name], b[3][name], TOL["float64"], name)
