"""Every kernel (persistent and stepwise, every cell, both dtypes) in gpurnn's strict simulator,
against the NumPy reference backend: outputs, final states, the reserve and every gradient.

The strict simulator runs every block of a launch at once with a real grid barrier, so the
persistent kernels run with P > 1 blocks in ONE launch over all steps, as on a GPU, and any
race, barrier error, out-of-bounds index or uninitialised shared read fails the call: every
test here is also a zero-findings check.

The cases are a covering set, not the cross product: each cell meets the persistent path with
one block and with several, and the stepwise path, each with and without lengths and reverse;
sizes are awkward (H 7 and 33, P not dividing H, a block owning no unit, T = 1, B = 1, a length
0 and a length T, unsorted lengths, bias=False).
"""
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import sim
from gpurnn.backends import numpy as ref
from gpurnn.backends.cuda import LaunchConfig
from gpurnn.cells import CELLS, GATES
from gpurnn.testing import TOL, assert_close

pytestmark = pytest.mark.sim

def make_case(cell, T, B, I, H, dtype, bias, seed):
    rng = np.random.default_rng(seed)
    G = GATES[cell]

    def rand(*shape):
        return (0.5 * rng.standard_normal(shape)).astype(dtype)

    args = dict(x=rand(T, B, I), w_ih=rand(G * H, I), w_hh=rand(G * H, H),
                b_ih=rand(G * H) if bias else None, b_hh=rand(G * H) if bias else None,
                h0=rand(B, H), c0=rand(B, H) if cell == "lstm" else None)
    cotangents = dict(dy=rand(T, B, H), dh_n=rand(B, H), dc_n=rand(B, H) if cell == "lstm" else None)
    return args, cotangents


def run(backend, cell, args, lengths, reverse, options=None):
    kw = {} if options is None else {"options": options}
    return backend.forward(cell, args["x"], args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"],
                           args["h0"], args["c0"], lengths, reverse, True, **kw)


def assert_forward_matches(out, expected, tol):
    y, h_n, c_n, res = out
    y_r, h_n_r, c_n_r, res_r = expected
    assert_close(y, y_r, tol, "y")
    assert_close(h_n, h_n_r, tol, "h_n")
    assert (c_n is None) == (c_n_r is None)
    if c_n_r is not None:
        assert_close(c_n, c_n_r, tol, "c_n")
    for name in ("h", "c", "gates"):
        a, b = getattr(res, name), getattr(res_r, name)
        assert (a is None) == (b is None), f"reserve.{name}: {type(a)} vs {type(b)}"
        if b is not None:
            assert_close(a, b, tol, f"reserve.{name}")


def assert_grads_match(grads, expected, tol):
    for name in expected._fields:
        a, b = getattr(grads, name), getattr(expected, name)
        assert (a is None) == (b is None), f"{name}: {type(a)} vs {type(b)}"
        if b is not None:
            assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} vs {b.dtype}"
            assert_close(a, b, tol, name)


# (T, B, I, H, P or "stepwise", lengths or None, reverse, bias, dtype). P is forced through
# options; P = 3 with H = 7 gives units 3, 3, 1; P = 6 with H = 7 gives 2, 2, 2, 1, 0, 0.
CASES = [
    (5, 3, 5, 7, 1, [5, 2, 0], False, True, np.float32),
    (1, 1, 16, 33, 1, None, True, False, np.float32),
    (5, 3, 16, 7, 2, [3, 5, 1], True, True, np.float64),
    (5, 1, 5, 7, 3, None, False, False, np.float32),
    (5, 3, 5, 33, "stepwise", [5, 1, 4], True, True, np.float32),
    (1, 1, 16, 7, "stepwise", None, False, False, np.float64),
]
# Extra cases for coverage of the remaining (path, lengths, reverse) combinations, spread over
# the cells instead of repeating each for every cell.
EXTRA = {
    "lstm": [(5, 3, 5, 7, 3, [2, 5, 4], True, True, np.float32),
             (4, 2, 5, 7, 6, None, False, True, np.float32)],
    "gru": [(5, 3, 5, 7, 3, [2, 5, 4], False, True, np.float32),
            (5, 3, 16, 33, 1, [4, 5, 2], True, True, np.float64)],
    "rnn_tanh": [(5, 2, 5, 7, 2, [5, 3], False, True, np.float32),
                 (5, 3, 5, 7, "stepwise", [1, 5, 3], False, True, np.float32)],
    "rnn_relu": [(5, 2, 5, 7, 2, [5, 3], True, True, np.float32),
                 (3, 3, 5, 7, "stepwise", None, True, False, np.float32)],
}


def _params():
    out = []
    for cell in CELLS:
        for case in CASES + EXTRA[cell]:
            T, B, I, H, P, lengths, reverse, bias, dtype = case
            cid = (f"{cell}-T{T}-B{B}-I{I}-H{H}-{'P%d' % P if P != 'stepwise' else 'stepwise'}"
                   f"{'-len' if lengths else ''}{'-rev' if reverse else ''}"
                   f"{'' if bias else '-nobias'}-{np.dtype(dtype).name}")
            out.append(pytest.param(cell, *case, id=cid))
    return out


def _options(P):
    return {"path": "stepwise"} if P == "stepwise" else {"path": "persistent", "blocks": P}


@pytest.mark.parametrize("cell,T,B,I,H,P,lengths,reverse,bias,dtype", _params())
def test_matches_numpy_reference(request, cell, T, B, I, H, P, lengths, reverse, bias, dtype):
    seed = zlib.crc32(request.node.callspec.id.encode())   # fresh data per case, reproducible
    args, cot = make_case(cell, T, B, I, H, dtype, bias, seed)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    tol = TOL[dtype]
    options = _options(P)

    out = run(sim, cell, args, lengths, reverse, options)
    expected = run(ref, cell, args, lengths, reverse)
    assert out[0].dtype == np.dtype(dtype)
    assert_forward_matches(out, expected, tol)
    cfg = out[3].launch
    assert isinstance(cfg, LaunchConfig)
    assert cfg.path == options["path"]
    if P != "stepwise":
        assert cfg.blocks == P and cfg.units_per_block == -(-H // P)
    if lengths is not None:
        masked = np.arange(T)[:, None] >= lengths[None, :]
        assert np.all(out[0][masked] == 0), "y must be exactly 0 at masked steps"

    grads = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    expected_grads = ref.backward(expected[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    assert_grads_match(grads, expected_grads, tol)


def test_every_cell_meets_every_path_with_lengths_and_reverse():
    # The covering set above is hand-picked; this keeps it honest when cases are edited.
    seen = set()
    for p in _params():
        cell, T, B, I, H, P, lengths, reverse, bias, dtype = p.values
        mode = "stepwise" if P == "stepwise" else ("P=1" if P == 1 else "P>1")
        seen.add((cell, mode, "lengths" if lengths else "full", "reverse" if reverse else "fwd"))
    for cell in CELLS:
        for mode in ("P=1", "P>1", "stepwise"):
            assert any(c == cell and m == mode and ln == "lengths" for c, m, ln, _ in seen), (cell, mode)
            assert any(c == cell and m == mode and d == "reverse" for c, m, _, d in seen), (cell, mode)


@pytest.fixture
def launches(monkeypatch):
    log = []
    monkeypatch.setattr(sim.RUNTIME, "launch_hook", log.append)
    return log


@pytest.mark.parametrize("P", [1, 3])
def test_one_launch_covers_every_step_whatever_the_grid(P, launches):
    # The strict simulator's grid barrier is real: P blocks run all T steps (and the backward's
    # T+1 phases) in one launch each, as on a GPU, with a grid barrier between steps.
    T = 4
    args, cot = make_case("gru", T, 2, 5, 7, np.float32, True, 11)
    with strict.record() as reports:
        out = run(sim, "gru", args, None, False, {"blocks": P, "path": "persistent"})
        sim.backward(out[3], cot["dy"], cot["dh_n"], None)
    fwd = [(d["blocks"], d["step_range"]) for d in launches if d["kind"] == "persistent_fwd"]
    bwd = [(d["blocks"], d["step_range"]) for d in launches if d["kind"] == "persistent_bwd"]
    assert all(d["kind"].startswith("persistent") and d["simulator"] == "strict" for d in launches)
    assert fwd == [(P, (0, T))]
    assert bwd == [(P, (0, T + 1))]
    assert [(r.grid[0], r.grid_barriers, r.findings) for r in reports] == [(P, T - 1, []),
                                                                           (P, T, [])]


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_persistent_kernels_read_w_hh_once_per_launch(cell, direction):
    # Persistence, measured: in one launch every element of W_hh is loaded from global memory
    # exactly once, however many steps the launch runs (T = 2 and T = 9 count the same).
    counts = []
    for T in (2, 9):
        args, cot = make_case(cell, T, 2, 3, 7, np.float32, True, 19)
        with strict.record() as reports:
            out = run(sim, cell, args, None, False, {"path": "persistent", "blocks": 3})
            if direction == "bwd":
                sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
        report = [r for r in reports if r.kernel.endswith(direction + "_f32")]
        assert len(report) == 1 and report[0].grid == (3, 1, 1)
        reads = report[0].traffic["w_hh"].reads
        assert reads.shape == args["w_hh"].shape and (reads == 1).all(), reads
        assert report[0].traffic["w_hh"].total_writes == 0
        counts.append(reads)
    assert np.array_equal(counts[0], counts[1])


STOCK_SCRIPT = """
    import numpy as np
    from gpurnn.backends import sim, numpy as ref
    rng = np.random.default_rng(3)
    T, B, I, H = 3, 2, 4, 7
    r = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float32)
    x, w_ih, w_hh, b_ih, b_hh, h0 = r(T, B, I), r(3 * H, I), r(3 * H, H), r(3 * H), r(3 * H), r(B, H)
    log = []
    sim.RUNTIME.launch_hook = log.append
    opts = {"simulator": "stock", "path": "persistent", "blocks": 3}
    out = sim.forward("gru", x, w_ih, w_hh, b_ih, b_hh, h0, None, None, False, True, options=opts)
    want = ref.forward("gru", x, w_ih, w_hh, b_ih, b_hh, h0, None, None, False, True)
    assert np.allclose(out[0], want[0], atol=1e-5), abs(out[0] - want[0]).max()
    dy, dh_n = r(T, B, H), r(B, H)
    g = sim.backward(out[3], dy, dh_n, None, options={"simulator": "stock"})
    g_ref = ref.backward(want[3], dy, dh_n, None)
    for name in ("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"):
        assert np.allclose(getattr(g, name), getattr(g_ref, name), atol=1e-5), name
    bwd = [d["step_range"] for d in log if d["kind"] == "persistent_bwd"]
    assert bwd == [(k, k + 1) for k in range(T + 1)], bwd
    fwd = [d["step_range"] for d in log if d["kind"] == "persistent_fwd"]
    assert fwd == [(s, s + 1) for s in range(T)], fwd      # one launch per step
    assert {d["simulator"] for d in log} == {"stock"}
    from numba.cuda.core import config
    assert config.ENABLE_CUDASIM
    # the strict simulator in the same, simulator-mode process: Numba's FakeCUDAKernel device
    # functions are read as source too, and P = 3 runs in one launch
    log.clear()
    strict = sim.forward("gru", x, w_ih, w_hh, b_ih, b_hh, h0, None, None, False, True,
                         options={"path": "persistent", "blocks": 3})
    assert np.allclose(strict[0], want[0], atol=1e-5)
    assert [(d["simulator"], d["step_range"]) for d in log] == [("strict", (0, T))], log
    print("STOCK-OK")
"""


def test_stock_simulator_fallback_launches_once_per_step_in_a_fresh_process():
    r = _python(STOCK_SCRIPT, env_sim=False)
    assert r.returncode == 0 and "STOCK-OK" in r.stdout, r.stdout + r.stderr


def test_stepwise_launches_one_pointwise_kernel_per_step(launches):
    T = 3
    args, cot = make_case("lstm", T, 2, 5, 7, np.float32, True, 12)
    out = run(sim, "lstm", args, None, True, {"path": "stepwise"})
    sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    assert [d["kind"] for d in launches] == ["pointwise_fwd"] * T + ["pointwise_bwd"] * T
    assert [d["step_range"][0] for d in launches] == list(range(T)) + list(range(T - 1, -1, -1))


@pytest.mark.parametrize("options", [{"path": "persistent", "blocks": 3}, {"path": "stepwise"}],
                         ids=["persistent-P3", "stepwise"])
def test_backward_is_deterministic(options):
    args, cot = make_case("lstm", 4, 3, 5, 7, np.float32, True, 13)
    lengths = np.array([4, 2, 3], np.int64)
    out = run(sim, "lstm", args, lengths, False, options)
    first = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    second = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    for name in first._fields:
        a, b = getattr(first, name), getattr(second, name)
        assert np.all(np.isfinite(a)), name
        assert np.array_equal(a, b), f"{name} differs between two identical backward runs"


def test_reserve_is_interchangeable_with_numpy_backend():
    # Same layout (gpurnn.cells): a NumPy reserve feeds the kernels' backward and vice versa.
    args, cot = make_case("gru", 5, 3, 5, 7, np.float32, True, 14)
    lengths = np.array([5, 1, 3], np.int64)
    expected = run(ref, "gru", args, lengths, True)
    expected_grads = ref.backward(expected[3], cot["dy"], cot["dh_n"], None)
    from_numpy = sim.backward(expected[3], cot["dy"], cot["dh_n"], None,
                              options={"path": "persistent", "blocks": 2})
    assert_grads_match(from_numpy, expected_grads, TOL[np.float32])
    out = run(sim, "gru", args, lengths, True, {"path": "stepwise"})
    from_sim = ref.backward(out[3], cot["dy"], cot["dh_n"], None)
    assert_grads_match(from_sim, expected_grads, TOL[np.float32])


def test_backward_options_override_the_forward_launch(launches):
    args, cot = make_case("rnn_tanh", 3, 2, 5, 7, np.float32, True, 15)
    out = run(sim, "rnn_tanh", args, None, False, {"path": "persistent", "blocks": 2})
    grads = sim.backward(out[3], cot["dy"], cot["dh_n"], None, options={"path": "stepwise"})
    assert [d["kind"] for d in launches][-3:] == ["pointwise_bwd"] * 3
    expected = ref.backward(run(ref, "rnn_tanh", args, None, False)[3], cot["dy"], cot["dh_n"], None)
    assert_grads_match(grads, expected, TOL[np.float32])


def test_plan_chooses_when_options_are_silent():
    args, _ = make_case("lstm", 2, 2, 5, 7, np.float32, True, 16)
    out = run(sim, "lstm", args, None, False)
    cfg = out[3].launch
    assert cfg.plan is not None and cfg.plan.device.name == "sim"
    assert (cfg.path, cfg.blocks, cfg.threads) == (cfg.plan.path, cfg.plan.blocks, cfg.plan.threads)
    assert_forward_matches(out, run(ref, "lstm", args, None, False), TOL[np.float32])


@pytest.mark.parametrize("options,match", [
    ({"paths": "stepwise"}, "unknown keys"),
    ({"path": "fused"}, "options\\['path'\\] must be one of"),
    ({"blocks": 0}, "options\\['blocks'\\] must be a positive int"),
    ({"threads": 48}, "multiple of 32"),
])
def test_bad_options_are_rejected(options, match):
    args, _ = make_case("rnn_relu", 2, 1, 5, 7, np.float32, True, 17)
    with pytest.raises(ValueError, match=match):
        run(sim, "rnn_relu", args, None, False, options)


def test_functional_api_passes_backend_options_through(launches):
    from gpurnn import functional
    args, cot = make_case("lstm", 3, 2, 5, 7, np.float32, True, 18)
    y, h_n, c_n, res = functional.forward(
        "lstm", args["x"], args["w_ih"], args["w_hh"], args["b_ih"], args["b_hh"], args["h0"],
        args["c0"], backend="sim", backend_options={"path": "persistent", "blocks": 2})
    assert res.backend == "sim" and res.launch.blocks == 2
    assert {d["blocks"] for d in launches} == {2}
    assert_close(y, run(ref, "lstm", args, None, False)[0], TOL[np.float32], "y")


def _python(code, env_sim):
    import os
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if env_sim:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_strict_simulator_runs_with_numba_cuda_in_hardware_mode():
    # The strict simulator reads kernels as source: no NUMBA_ENABLE_CUDASIM, and numba.cuda may
    # already be imported for the hardware (the static checks and a GPU share the process).
    r = _python("""
        import numba.cuda
        from numba.cuda.core import config
        import numpy as np
        from gpurnn import functional as F
        rng = np.random.default_rng(0)
        x = rng.standard_normal((3, 2, 4)).astype(np.float32)
        w_ih = rng.standard_normal((28, 4)).astype(np.float32)
        w_hh = rng.standard_normal((28, 7)).astype(np.float32)
        y, *_ = F.lstm_forward(x, w_ih, w_hh, None, None, backend="sim",
                               backend_options={"blocks": 2})
        y_ref, *_ = F.lstm_forward(x, w_ih, w_hh, None, None, backend="numpy")
        assert not config.ENABLE_CUDASIM
        assert np.allclose(y, y_ref, atol=1e-5)
        print("STRICT-HW-OK")
    """, env_sim=False)
    assert r.returncode == 0 and "STRICT-HW-OK" in r.stdout, r.stdout + r.stderr


def test_stock_simulator_says_why_after_numba_cuda_in_hardware_mode():
    r = _python("""
        import numba.cuda
        import numpy as np
        from gpurnn.backends import sim
        z = np.zeros
        try:
            sim.forward("rnn_tanh", z((1, 1, 2), np.float32), z((3, 2), np.float32),
                        z((3, 3), np.float32), None, None, z((1, 3), np.float32), None, None,
                        False, False, options={"simulator": "stock"})
        except RuntimeError as e:
            print("REFUSED:", e)
        else:
            raise SystemExit("ran the stock simulator over a hardware-mode numba.cuda")
    """, env_sim=False)
    assert r.returncode == 0, r.stderr
    assert "REFUSED:" in r.stdout and "already imported in hardware mode" in r.stdout


def test_unknown_simulator_is_a_value_error():
    args, _ = make_case("rnn_tanh", 2, 1, 3, 7, np.float32, True, 21)
    with pytest.raises(ValueError, match=r"backend_options\['simulator'\] must be one of"):
        run(sim, "rnn_tanh", args, None, False, {"simulator": "fast"})


def test_forced_grid_the_plan_cannot_run_is_a_value_error_naming_blocks(launches):
    args, _ = make_case("lstm", 2, 1, 3, 7, np.float32, True, 22)
    for options in ({"path": "persistent", "blocks": 100000}, {"blocks": 100000}):
        with pytest.raises(ValueError, match=r"options\['blocks'\]=100000: the persistent path "
                                             r"cannot run .*cannot be co-resident"):
            run(sim, "lstm", args, None, False, options)
    assert launches == []          # nothing was launched


def test_sim_backend_is_safe_from_several_host_threads():
    import gpurnn
    from conftest import run_in_threads
    x = np.random.default_rng(23).standard_normal((4, 2, 3)).astype(np.float32)
    models = [gpurnn.GRU(3, 7, num_layers=2, backend="sim", seed=k) for k in range(3)]
    want = [gpurnn.GRU(3, 7, num_layers=2, backend="numpy", seed=k)(x)[0] for k in range(3)]
    got = run_in_threads(lambda k: models[k](x)[0], 3)
    for k in range(3):
        assert_close(got[k], want[k], 1e-5, f"model {k}")


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_multi_layer_bidirectional_modules_on_the_strict_simulator(cell):
    import gpurnn
    T, B, I, H = 4, 3, 5, 7
    rng = np.random.default_rng(24)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    lengths = np.array([4, 1, 3])
    mods = {b: getattr(gpurnn, cell)(I, H, num_layers=2, bidirectional=True, seed=5, backend=b)
            for b in ("sim", "numpy")}
    with strict.record() as reports:
        out = mods["sim"](x, lengths=lengths)
    want = mods["numpy"](x, lengths=lengths)
    assert any(r.grid[0] > 1 for r in reports) and all(r.findings == [] for r in reports)
    assert_close(out[0], want[0], 1e-5, "y")
    dy = rng.standard_normal(out[0].shape).astype(np.float32)
    dx, _ = mods["sim"].backward(dy)
    dx_ref, _ = mods["numpy"].backward(dy)
    assert_close(dx, dx_ref, 1e-5, "dx")
    for name, g in mods["numpy"].grads.items():
        assert_close(mods["sim"].grads[name], g, 1e-5, name)


# (cell, T, B, H, P, threads): launches whose dot products are split over 32 lanes, a few, and
# one (gpurnn.kernels.layout.lanes_per_output), checked against the reference like any other.
LANE_CASES = [
    ("rnn_tanh", 4, 1, 7, 7, 32),     # one unit per block, B = 1: forward and backward L = 32
    ("lstm", 4, 1, 7, 2, 32),         # forward 16 outputs -> L = 2, backward 4 -> L = 8
    ("gru", 3, 2, 9, 3, 64),          # forward 18 -> L = 2, backward 6 -> L = 8
    ("lstm", 3, 3, 33, 1, 64),        # 396 and 99 outputs: one lane each
]


@pytest.mark.parametrize("cell,T,B,H,P,threads", LANE_CASES,
                         ids=[f"{c[0]}-B{c[2]}-H{c[3]}-P{c[4]}-threads{c[5]}" for c in LANE_CASES])
def test_split_dot_products_match_reference(cell, T, B, H, P, threads):
    from gpurnn.kernels.layout import lanes_per_output, units_per_block
    U = units_per_block(H, P)
    G = GATES[cell]
    fwd_lanes = lanes_per_output(B * G * U, threads)
    bwd_lanes = lanes_per_output(B * U, threads)
    assert 1 <= fwd_lanes <= bwd_lanes <= 32
    args, cot = make_case(cell, T, B, 5, H, np.float32, True, seed=T * 1000 + H)
    lengths = np.arange(B, dtype=np.int64) % T + 1 if B > 1 else None
    options = {"path": "persistent", "blocks": P, "threads": threads}
    out = run(sim, cell, args, lengths, False, options)
    expected = run(ref, cell, args, lengths, False)
    assert_forward_matches(out, expected, 1e-5)
    grads = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    want = ref.backward(expected[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    assert_grads_match(grads, want, 1e-5)


def test_lanes_per_output():
    from gpurnn.kernels.layout import lanes_per_output
    assert lanes_per_output(1, 32) == 32
    assert lanes_per_output(1, 1024) == 32          # never more than a warp
    assert lanes_per_output(16, 32) == 2
    assert lanes_per_output(17, 32) == 1
    assert lanes_per_output(300, 256) == 1
    assert lanes_per_output(8, 256) == 32
    assert lanes_per_output(9, 256) == 16


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("P", [1, 2, "stepwise"])
def test_inference_forward_keeps_no_gates(cell, P):
    """A forward without a reserve skips the gate writes in the kernels; outputs unchanged."""
    args, _ = make_case(cell, 4, 2, 5, 7, np.float32, True, seed=17)
    lengths = np.array([4, 2], np.int64)
    launches = []
    sim.RUNTIME.launch_hook = launches.append
    try:
        y, h_n, c_n, res = sim.forward(cell, args["x"], args["w_ih"], args["w_hh"], args["b_ih"],
                                       args["b_hh"], args["h0"], args["c0"], lengths, True, False,
                                       options=_options(P))
    finally:
        sim.RUNTIME.launch_hook = None
    assert res is None and launches
    y_r, h_r, c_r, _ = ref.forward(cell, args["x"], args["w_ih"], args["w_hh"], args["b_ih"],
                                   args["b_hh"], args["h0"], args["c0"], lengths, True, False)
    assert_close(y, y_r, 1e-5, "y")
    assert_close(h_n, h_r, 1e-5, "h_n")
    if cell == "lstm":
        assert_close(c_n, c_r, 1e-5, "c_n")


@pytest.mark.parametrize("lanes", [1, 2, 4, 8, 16, 32])
def test_padded_rows_spread_a_warp_over_all_banks(lanes):
    from gpurnn.kernels.layout import padded_row
    for length in (1, 7, 31, 32, 33, 64, 100, 512, 1313, 4 * 1024):
        S = padded_row(length, lanes)
        assert length <= S < length + 32 and S % 32 == lanes % 32
        # a warp: 32 // lanes groups on consecutive rows, lanes on consecutive elements
        banks = {(q * S + lane) % 32 for q in range(32 // lanes) for lane in range(lanes)}
        assert len(banks) == 32


# (cell, T, B, H, P, batch_tile, lengths, reverse, dtype): the batch staged in tiles smaller than
# B that do not divide it (the last tile is shorter), forward and backward, every cell.
TILE_CASES = [
    ("lstm", 4, 5, 7, 2, 2, [4, 1, 3, 0, 2], False, np.float32),
    ("lstm", 3, 7, 9, 3, 3, None, True, np.float64),
    ("gru", 4, 5, 7, 3, 2, [2, 4, 4, 1, 3], True, np.float32),
    ("rnn_tanh", 3, 5, 33, 2, 3, None, False, np.float32),
    ("rnn_relu", 3, 3, 7, 2, 2, [3, 1, 2], True, np.float64),
]


@pytest.mark.parametrize("cell,T,B,H,P,bt,lengths,reverse,dtype", TILE_CASES,
                         ids=[f"{c[0]}-B{c[2]}-H{c[3]}-P{c[4]}-tile{c[5]}-{np.dtype(c[8]).name}"
                              for c in TILE_CASES])
def test_batch_tiles_match_reference(request, cell, T, B, H, P, bt, lengths, reverse, dtype):
    seed = zlib.crc32(request.node.callspec.id.encode())
    args, cot = make_case(cell, T, B, 4, H, dtype, True, seed)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    options = {"path": "persistent", "blocks": P, "batch_tile": bt}
    with strict.record() as reports:
        out = run(sim, cell, args, lengths, reverse, options)
        grads = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    assert out[3].launch.batch_tile == bt
    assert [r.grid[0] for r in reports] == [P, P] and all(not r.findings for r in reports)
    expected = run(ref, cell, args, lengths, reverse)
    assert_forward_matches(out, expected, TOL[dtype])
    assert_grads_match(grads, ref.backward(expected[3], cot["dy"], cot["dh_n"], cot["dc_n"]),
                       TOL[dtype])


def test_batch_tile_option_is_validated():
    args, _ = make_case("gru", 2, 3, 3, 7, np.float32, True, 25)
    with pytest.raises(ValueError, match=r"options\['batch_tile'\] must be <= the batch \(3\); got 4"):
        run(sim, "gru", args, None, False, {"batch_tile": 4})
    with pytest.raises(ValueError, match=r"options\['batch_tile'\] must be a positive int"):
        run(sim, "gru", args, None, False, {"batch_tile": 0})
