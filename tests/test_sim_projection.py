"""The LSTM projection (proj_size) kernels: strict-simulator parity with the NumPy reference
(gpurnn.backends.numpy_lstm) for every projected cell on the persistent path (P > 1 blocks in
ONE launch, P dividing neither H nor R, blocks that own no unit or no feature, batch tiles)
and the stepwise path — outputs, h_n, c_n, the saved arrays and every gradient — plus the
launch structure, the barrier-deletion mutants, the plan, and the static compile of every
projection kernel for sm_80 and sm_90.

Every strict launch is a zero-findings check: a race, a barrier error, an out-of-bounds index
or an uninitialised shared read fails the call.
"""
import zlib

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import cuda_proj, sim
from gpurnn.backends import numpy_lstm as ref
from gpurnn.backends.sim import SimRuntime
from gpurnn.kernels import projection as kproj
from gpurnn.kernels.layout import lanes_per_output
from gpurnn.planning import projection as pplan
from gpurnn.testing import GRAD_TOL, TOL, assert_close
from gpurnn.variants import LSTMForm

from simtools import (ARCHS, PROFILE, barrier_kinds, by_kernel, compile_errors, compile_rows,
                      first_catch, first_difference, kernel_source, lstm_case, mutant_module,
                      mutation_tests, needs_ptxas, smem_overflows, staggered_lengths)

pytestmark = pytest.mark.sim


def form_of(cell, R):
    return LSTMForm(peephole=cell.endswith("_peephole"), coupled=cell.startswith("cifg"),
                    proj_size=R)


def make_case(form, T, B, I, H, dtype, bias, seed):
    assert form.proj_size > 0
    return lstm_case(form, T, B, I, H, dtype, bias, seed)


def options(P, threads, tile):
    if P == "stepwise":
        return {"path": "stepwise", "threads": threads}
    opts = {"path": "persistent", "blocks": P, "threads": threads}
    if tile is not None:
        opts["batch_tile"] = tile
    return opts


def forward(rt, form, args, lengths, reverse, opts):
    return cuda_proj.run_forward(rt, form, args["x"], args["params"], args["h0"], args["c0"],
                                 lengths, reverse, True, opts)


def backward(rt, form, args, saved, lengths, reverse, cot, opts):
    return cuda_proj.run_backward(rt, form, args["x"], args["params"], saved, lengths, reverse,
                                  cot["dy"], cot["dh_n"], cot["dc_n"], opts)


def reference(form, args, cot, lengths, reverse):
    out = ref.lstm_forward(form, args["x"], args["params"], args["h0"], args["c0"], lengths,
                           reverse, True)
    grads = ref.lstm_backward(form, args["x"], args["params"], out[3], lengths, reverse,
                              cot["dy"], cot["dh_n"], cot["dc_n"])
    return out, grads


# (cell, T, B, I, H, R, P | "stepwise", threads, batch_tile, lengths, reverse, bias, dtype)
# P = 3 over H = 7, R = 3: units 3, 3, 1, one feature each; P = 4 over H = 7, R = 3: the last
# block owns no feature; P = 6 over H = 7: two blocks own neither; P = 2 over H = 33, R = 5:
# units 17, 16, features 3, 2. Lengths hold a 0, a T and unsorted values.
CASES = [
    ("lstm", 4, 3, 5, 7, 3, 3, 32, None, [4, 2, 0], False, True, np.float32),
    ("lstm", 3, 1, 4, 33, 5, 2, 64, None, None, True, False, np.float64),
    ("lstm", 3, 3, 4, 7, 5, "stepwise", 32, None, [2, 3, 1], True, True, np.float32),
    ("lstm", 1, 1, 3, 7, 5, 2, 32, None, None, False, True, np.float64),
    ("lstm_peephole", 3, 3, 5, 7, 3, 4, 32, 2, [3, 1, 2], True, True, np.float64),
    ("lstm_peephole", 2, 3, 4, 33, 3, 5, 64, None, None, False, True, np.float32),
    ("lstm_peephole", 3, 3, 3, 33, 5, "stepwise", 32, None, [3, 1, 2], True, False, np.float32),
    ("cifg", 3, 3, 4, 7, 5, 2, 64, 2, [1, 3, 2], False, True, np.float32),
    ("cifg", 4, 1, 4, 33, 3, 4, 32, None, None, True, False, np.float64),
    ("cifg", 3, 3, 4, 7, 3, "stepwise", 32, None, [3, 0, 2], True, True, np.float64),
    ("cifg_peephole", 3, 3, 4, 7, 3, 6, 32, None, [2, 3, 3], True, True, np.float32),
    ("cifg_peephole", 3, 3, 5, 33, 5, 2, 32, 1, None, False, True, np.float64),
    ("cifg_peephole", 2, 1, 4, 7, 5, "stepwise", 32, None, None, False, False, np.float32),
]


def _case_id(case):
    cell, T, B, I, H, R, P, threads, tile, lengths, reverse, bias, dtype = case
    return (f"{cell}-T{T}-B{B}-H{H}-R{R}-{'P%d' % P if P != 'stepwise' else 'stepwise'}"
            f"-n{threads}{'-bt%d' % tile if tile else ''}{'-len' if lengths else ''}"
            f"{'-rev' if reverse else ''}{'' if bias else '-nobias'}-{np.dtype(dtype).name}")


def assert_saved_match(saved, want, lengths, T, B, G, H):
    h, c, gates = saved
    assert_close(h, want[0], TOL[h.dtype.type], "saved h")
    assert_close(c, want[1], TOL[c.dtype.type], "saved c")
    # the gates of padded steps are formed but never used: compare the active ones
    active = np.ones((T, B), bool) if lengths is None else np.arange(T)[:, None] < lengths
    assert gates.shape == want[2].shape == (T, B, G * H)
    assert_close(gates[active], want[2][active], TOL[gates.dtype.type], "saved gates")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_numpy_reference(case):
    cell, T, B, I, H, R, P, threads, tile, lengths, reverse, bias, dtype = case
    form = form_of(cell, R)
    args, cot = make_case(form, T, B, I, H, dtype, bias, zlib.crc32(_case_id(case).encode()))
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    opts = options(P, threads, tile)
    with strict.record() as reports:
        y, h_n, c_n, saved = forward(sim.RUNTIME, form, args, lengths, reverse, opts)
        dx, dh0, dc0, grads = backward(sim.RUNTIME, form, args, saved, lengths, reverse, cot, opts)
    (y_r, h_n_r, c_n_r, saved_r), (dx_r, dh0_r, dc0_r, grads_r) = reference(form, args, cot,
                                                                            lengths, reverse)
    tol, gtol = TOL[dtype], GRAD_TOL[dtype]
    assert y.shape == (T, B, R) and h_n.shape == (B, R) and c_n.shape == (B, H)
    assert y.dtype == h_n.dtype == c_n.dtype == np.dtype(dtype)
    assert_close(y, y_r, tol, "y")
    assert_close(h_n, h_n_r, tol, "h_n")
    assert_close(c_n, c_n_r, tol, "c_n")
    assert_saved_match(saved, saved_r, lengths, T, B, form.gates, H)
    if lengths is not None:
        masked = np.arange(T)[:, None] >= lengths[None, :]
        assert np.all(y[masked] == 0), "y must be exactly 0 at masked steps"
    assert_close(dx, dx_r, gtol, "dx")
    assert_close(dh0, dh0_r, gtol, "dh0")
    assert_close(dc0, dc0_r, gtol, "dc0")
    expected_names = {name for name, _ in form.param_shapes(I, H, bias)}
    assert set(grads) == set(grads_r) == expected_names
    for name in sorted(expected_names):
        assert grads[name].dtype == np.dtype(dtype) and grads[name].shape == grads_r[name].shape
        assert_close(grads[name], grads_r[name], gtol, name)
    kinds = [r.kernel.rsplit("_", 1)[0] for r in reports]
    if P == "stepwise":
        assert kinds == [f"{cell}_proj_pointwise_fwd"] * T + [f"{cell}_proj_pointwise_bwd"] * T
    else:
        assert kinds == [f"{cell}_proj_persistent_fwd", f"{cell}_proj_persistent_bwd"]
        assert all(r.grid == (P, 1, 1) for r in reports)
    assert all(r.findings == [] for r in reports)


def test_cases_cover_every_cell_path_and_layout():
    seen = set()
    for cell, T, B, I, H, R, P, threads, tile, lengths, reverse, bias, dtype in CASES:
        mode = "stepwise" if P == "stepwise" else "P>1"
        assert P == "stepwise" or (P > 1 and (H % P or R % P)), "P must not divide H or R"
        seen.add((cell, mode))
        seen |= {("H", H), ("R", R), ("B", B), ("dtype", np.dtype(dtype).name)}
        seen |= {("lengths", lengths is not None), ("reverse", reverse), ("bias", bias)}
        if P != "stepwise":
            U, Q = kproj.slices(H, R, P)
            seen |= {("idle units", P * U - H >= U), ("idle feats", P * Q - R >= Q),
                     ("tiles", tile is not None and tile < B)}
    for cell in kproj.CELLS:
        assert (cell, "P>1") in seen and (cell, "stepwise") in seen, cell
    for fact in [("H", 7), ("H", 33), ("R", 3), ("R", 5), ("B", 1), ("B", 3),
                 ("dtype", "float32"), ("dtype", "float64"), ("lengths", True),
                 ("reverse", True), ("bias", False), ("idle units", True),
                 ("idle feats", True), ("tiles", True)]:
        assert fact in seen, fact


@pytest.fixture
def launches(monkeypatch):
    log = []
    monkeypatch.setattr(sim.RUNTIME, "launch_hook", log.append)
    return log


def test_one_launch_per_direction_with_two_grid_barriers_a_step(launches):
    # P = 3 blocks run all T steps in one launch: 2T - 1 grid barriers forward (the cell, the
    # projection; none after the last step), 2T backward (T phases of two, the dh0 tail none);
    # and each weight element is loaded from global memory once per launch.
    T, P = 4, 3
    form = form_of("lstm", 3)
    args, cot = make_case(form, T, 2, 3, 7, np.float32, True, 5)
    opts = options(P, 32, None)
    with strict.record() as reports:
        _, _, _, saved = forward(sim.RUNTIME, form, args, None, False, opts)
        backward(sim.RUNTIME, form, args, saved, None, False, cot, opts)
    assert [(d["kind"], d["blocks"], d["step_range"]) for d in launches] == [
        ("proj_persistent_fwd", P, (0, T)), ("proj_persistent_bwd", P, (0, T + 1))]
    assert [(r.grid[0], r.grid_barriers, r.findings) for r in reports] == [(P, 2 * T - 1, []),
                                                                           (P, 2 * T, [])]
    for r in reports:
        for w in ("w_hh", "w_hr"):
            assert (r.traffic[w].reads == 1).all(), (r.kernel, w)
            assert r.traffic[w].total_writes == 0


def test_the_variants_entry_point_runs_these_kernels(launches):
    # gpurnn.backends.sim.lstm_forward / lstm_backward (the stack's entry point) dispatch a
    # projected form here, with the simulator option split off
    form = form_of("cifg_peephole", 3)
    args, cot = make_case(form, 3, 2, 4, 7, np.float64, True, 6)
    opts = {"simulator": "strict", "path": "persistent", "blocks": 2, "threads": 32}
    y, h_n, c_n, saved = sim.lstm_forward(form, args["x"], args["params"], args["h0"], args["c0"],
                                          None, True, True, options=opts)
    got = sim.lstm_backward(form, args["x"], args["params"], saved, None, True, cot["dy"],
                            cot["dh_n"], cot["dc_n"], options=opts)
    (y_r, *_), want = reference(form, args, cot, None, True)
    assert [d["kind"] for d in launches] == ["proj_persistent_fwd", "proj_persistent_bwd"]
    assert_close(y, y_r, TOL[np.float64], "y")
    for name in want[3]:
        assert_close(got[3][name], want[3][name], GRAD_TOL[np.float64], name)


@pytest.mark.parametrize("opts", [options(3, 32, None), options("stepwise", 32, None)],
                         ids=["persistent-P3", "stepwise"])
def test_backward_is_deterministic(opts):
    form = form_of("lstm_peephole", 3)
    lengths = np.array([3, 1, 2], np.int64)
    args, cot = make_case(form, 3, 3, 4, 7, np.float32, True, 7)
    saved = forward(sim.RUNTIME, form, args, lengths, False, opts)[3]
    first = backward(sim.RUNTIME, form, args, saved, lengths, False, cot, opts)
    second = backward(sim.RUNTIME, form, args, saved, lengths, False, cot, opts)
    for a, b in zip(first[:3], second[:3]):
        assert np.array_equal(a, b)
    for name in first[3]:
        assert np.array_equal(first[3][name], second[3][name]), name


@pytest.mark.parametrize("P", [2, "stepwise"])
def test_inference_forward_saves_nothing_and_agrees(P):
    form = form_of("cifg", 3)
    lengths = np.array([2, 3], np.int64)
    args, _ = make_case(form, 3, 2, 4, 7, np.float32, True, 10)
    opts = options(P, 32, None)
    train = forward(sim.RUNTIME, form, args, lengths, True, opts)
    infer = cuda_proj.run_forward(sim.RUNTIME, form, args["x"], args["params"], args["h0"],
                                  args["c0"], lengths, True, False, opts)
    assert infer[3] is None
    for a, b in zip(train[:3], infer[:3]):
        assert np.array_equal(a, b)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN:UserWarning")
def test_torch_lstm_proj_size_on_the_sim_backend_matches_torch_nn_lstm():
    # the whole stack (gpurnn.torch -> the stack core -> variants -> cuda.run_lstm_* -> here)
    # with the default plan (persistent, P = 7 on the sim profile), two layers, both
    # directions, a packed batch of unsorted lengths
    torch = pytest.importorskip("torch")
    import gpurnn.torch as gt
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    T, B, I, H, R = 4, 3, 4, 7, 3
    torch.manual_seed(0)
    mods = [torch.nn.LSTM(I, H, 2, bidirectional=True, proj_size=R, dtype=torch.float64),
            gt.LSTM(I, H, 2, bidirectional=True, proj_size=R, dtype=torch.float64,
                    backend="sim")]
    mods[1].load_state_dict(mods[0].state_dict())
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(T, B, I, generator=g, dtype=torch.float64), None
    lengths = torch.tensor([4, 2, 3])
    results = []
    with strict.record() as reports:
        for m in mods:
            xs = x.clone().requires_grad_()
            y, (h_n, c_n) = m(pack_padded_sequence(xs, lengths, enforce_sorted=False))
            y = pad_packed_sequence(y)[0]
            dy = torch.randn(y.shape, generator=g, dtype=torch.float64) if dy is None else dy
            ((y * dy).sum() + h_n.sum() + (c_n * c_n).sum()).backward()
            results.append([y, h_n, c_n, xs.grad] + [p.grad for _, p in m.named_parameters()])
    assert len(reports) == 8 and {r.kernel.split("_proj_")[1][:14] for r in reports} == {
        "persistent_fwd", "persistent_bwd"}
    for a, b in zip(*results):
        assert_close(b.detach(), a.detach(), TOL[np.float64])


def test_arguments_are_not_written():
    form = form_of("lstm", 3)
    args, cot = make_case(form, 3, 2, 4, 7, np.float32, True, 8)
    before = ({k: v.copy() for k, v in args["params"].items()}, args["x"].copy(),
              args["h0"].copy(), args["c0"].copy(), {k: v.copy() for k, v in cot.items()})
    opts = options(2, 32, None)
    saved = forward(sim.RUNTIME, form, args, None, False, opts)[3]
    kept = [a.copy() for a in saved]
    backward(sim.RUNTIME, form, args, saved, None, False, cot, opts)
    for k, v in before[0].items():
        assert np.array_equal(args["params"][k], v), k
    for a, b in zip((args["x"], args["h0"], args["c0"]), before[1:4]):
        assert np.array_equal(a, b)
    for k, v in before[4].items():
        assert np.array_equal(cot[k], v), k
    for a, b in zip(saved, kept):
        assert np.array_equal(a, b)


def test_a_forced_grid_that_does_not_fit_is_refused_before_launching(launches):
    form = form_of("lstm", 3)
    args, _ = make_case(form, 2, 1, 3, 7, np.float32, True, 9)
    with pytest.raises(ValueError, match="cannot run"):
        forward(sim.RUNTIME, form, args, None, False, {"path": "persistent", "blocks": 999,
                                                       "threads": 32})
    with pytest.raises(ValueError, match="stock simulator"):
        forward(sim.STOCK_RUNTIME, form, args, None, False, options(2, 32, None))
    assert launches == []


# ---- the plan ----

def test_plan_capacity_edges_and_threads():
    for dev in ("H100", "A100"):
        for dtype in ("float32", "float64"):
            for kw in ({"proj_size": 256}, {"ratio": 4}):
                h = pplan.capacity("lstm", dtype, dev, 8, **kw)
                r_of = (lambda H: kw["proj_size"]) if "proj_size" in kw else (lambda H: H // 4)
                assert h > r_of(h)
                assert pplan.plan("lstm", 64, h, r_of(h), 8, dtype, dev).persistent_fits
                nxt = pplan.plan("lstm", 64, h + 1, r_of(h + 1), 8, dtype, dev)
                assert not nxt.persistent_fits and nxt.path == "stepwise"
                assert any("shared memory" in f for f in nxt.failures)
    # the projection kernels take up to 255 registers: at most 256 threads per block
    assert pplan.plan("lstm", 64, 512, 128, 4, "float32", "H100", threads=256).persistent_fits
    p = pplan.plan("lstm", 64, 512, 128, 4, "float32", "H100", threads=288)
    assert not p.persistent_fits and any("registers" in f for f in p.failures)
    # a projection fits more hidden units than the same LSTM without one (W_hh is G*H x R)
    from gpurnn.planning import capacity as plain_capacity
    assert pplan.capacity("lstm", "float32", "H100", 1, ratio=4) > plain_capacity("lstm", "float32",
                                                                                   "H100")


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_planned_shared_memory_is_exactly_what_the_kernels_use(direction, monkeypatch):
    # The parity cases run at the planned bytes (the strict simulator faults on any shared
    # index past them); one element fewer must fault, so the model has no slack either. The
    # case has L > 1 in the last phase of each kernel, so the scratch's last element is used.
    cell, T, B, H, R, P, threads = "lstm", 2, 2, 7, 3, 3, 32
    assert _lanes_of((cell, T, B, H, R, P, threads, None))[1:] == (16, 16, 4)
    form = form_of(cell, R)
    args, cot = make_case(form, T, B, 3, H, np.float32, True, 11)
    opts = options(P, threads, None)
    saved = forward(sim.RUNTIME, form, args, None, False, opts)[3]
    backward(sim.RUNTIME, form, args, saved, None, False, cot, opts)
    planned = kproj.smem_bytes

    def short(d, *a, **kw):
        return planned(d, *a, **kw) - (4 if d == direction else 0)
    monkeypatch.setattr(kproj, "smem_bytes", short)
    with pytest.raises(strict.MemoryFault):
        saved = forward(sim.RUNTIME, form, args, None, False, opts)[3]
        backward(sim.RUNTIME, form, args, saved, None, False, cot, opts)


def test_traffic_counts_the_weight_rereads_of_the_stepwise_path():
    p = pplan.plan("lstm", 256, 1024, 256, 8, "float32", "H100")
    assert p.path == "persistent"
    pers, step = pplan.step_traffic(p), pplan.step_traffic(p, "stepwise")
    assert step["bytes"]["gemm read w_hh"] == 4 * 1024 * 256 * 4
    assert step["bytes"]["gemm read w_hr"] == 256 * 1024 * 4
    assert not any("w_h" in k for k in pers["bytes"])
    assert pers["launches"] == 1 and step["launches"] == pplan.STEPWISE_LAUNCHES["fwd"]


# ---- barrier-deletion mutants ----

SOURCE, LINES, BARRIER_LINES = kernel_source(kproj)

# (cell, T, B, H, R, P, threads, batch_tile): lane splits L = 1 and L > 1 in each phase, tiles
# (also with L = 1), idle blocks
MUTANT_CASES = [
    ("lstm", 3, 3, 7, 3, 3, 32, None),      # fwd L1 = 1, L2 = 8; bwd LA = 8, LB = 2
    ("lstm", 2, 5, 7, 5, 1, 32, 4),         # tiles 4, 1; every phase L = 1
    ("cifg", 3, 3, 7, 3, 4, 32, 2),         # tiles 2, 1 with L > 1; the last block no feature
    ("lstm", 2, 3, 33, 5, 2, 32, None),     # bwd LB = 1 with P > 1
]


def _lanes_of(case):
    cell, T, B, H, R, P, n, bt = case
    G, bt = kproj.GATES[cell], bt or B
    U, Q = kproj.slices(H, R, P)
    return (lanes_per_output(bt * G * U, n), lanes_per_output(bt * Q, n),
            lanes_per_output(bt * Q, n), lanes_per_output(bt * U, n))


def test_mutant_cases_cover_both_lane_modes_tiles_and_idle_blocks():
    lanes = [_lanes_of(c) for c in MUTANT_CASES]
    for phase in range(4):
        assert any(ls[phase] == 1 for ls in lanes) and any(ls[phase] > 1 for ls in lanes), phase
    tiled = [(c, ls) for c, ls in zip(MUTANT_CASES, lanes) if c[7] and c[7] < c[2]]
    assert any(all(v == 1 for v in ls) for _, ls in tiled)
    assert any(all(v > 1 for v in ls[1:]) for _, ls in tiled)
    assert any(c[5] * kproj.slices(c[3], c[4], c[5])[1] - c[4] >= 1 for c in MUTANT_CASES)


def test_the_source_has_the_barriers_the_docstring_promises():
    kinds = barrier_kinds(LINES, BARRIER_LINES)
    assert kinds.count("_grid_group_sync(grid)") == 4          # two per persistent kernel
    assert kinds.count("cuda.syncthreads()") == 12             # six per persistent kernel


class MutantRuntime(SimRuntime):
    """The strict sim runtime with the projection kernels built from a rebuilt module."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self._built = {}

    def projection_kernel(self, cell, kind, dtype):
        key = (cell, kind, dtype)
        if key not in self._built:
            sp = self.module.spec(cell, kind, dtype)
            self._built[key] = (sp, strict.jit(sp.func, name=sp.name))
        return self._built[key]


def _run_mutant_case(rt, case, seed):
    cell, T, B, H, R, P, threads, tile = case
    form = form_of(cell, R)
    args, cot = make_case(form, T, B, 3, H, np.float32, True, seed)
    lengths = staggered_lengths(T, B)
    opts = options(P, threads, tile)
    y, h_n, c_n, saved = forward(rt, form, args, lengths, False, opts)
    dx, dh0, dc0, grads = backward(rt, form, args, saved, lengths, False, cot, opts)
    (y_r, h_n_r, c_n_r, _), (dx_r, dh0_r, dc0_r, g_r) = reference(form, args, cot, lengths, False)
    pairs = [("y", y, y_r), ("h_n", h_n, h_n_r), ("c_n", c_n, c_n_r), ("dx", dx, dx_r),
             ("dh0", dh0, dh0_r), ("dc0", dc0, dc0_r)] + [(k, grads[k], g_r[k]) for k in g_r]
    return first_difference(pairs)


def caught_by(source, tag):
    rt = MutantRuntime(mutant_module(source, tag, kproj, "proj"))
    return first_catch(MUTANT_CASES, lambda n, case: _run_mutant_case(rt, case, seed=n))


# the unmutated source passes every case; deleting any one barrier is caught; a block that owns
# no feature returning early is caught as a hang
(test_unmutated_source_passes_every_mutant_case, test_deleting_any_barrier_is_caught,
 test_blocks_without_features_returning_early_is_caught) = mutation_tests(
    caught_by, SOURCE, LINES, BARRIER_LINES, "projection.py", "q0, nq = _owned(feats, R)",
    "nq == 0")


# ---- static compile for sm_80 and sm_90 ----

SPECS = "gpurnn.kernels.projection:specializations"


@pytest.fixture(scope="module")
def rows():
    # one subprocess per architecture, side by side (compile_ptx is the slow part)
    return compile_rows(SPECS, per_arch=True)


@needs_ptxas
def test_every_projection_kernel_compiles_for_every_arch(rows):
    kernels = by_kernel(rows)
    assert set(kernels) == {sp.name for sp in kproj.specializations()}
    assert len(kernels) == len(kproj.CELLS) * len(kproj.DTYPES) * len(kproj.KINDS) == 32
    for name, per_arch in kernels.items():
        assert set(per_arch) == set(ARCHS), name
    assert compile_errors(rows) == []


@needs_ptxas
def test_no_spills_and_no_local_memory(rows):
    assert [(r.kernel, r.arch, r.spill_stores, r.spill_loads, r.local_bytes) for r in rows
            if r.spill_bytes or r.local_bytes] == []


@needs_ptxas
def test_registers_within_the_projection_plans_budget(rows):
    for r in rows:
        p = pplan.plan(r.cell, 256, 1024, 256, 8, r.dtype, PROFILE[r.arch])
        assert r.registers is not None and 0 < r.registers <= p.regs_per_thread, (r.kernel, r.arch)
        assert r.registers <= kproj.REGS_MAX, (r.kernel, r.arch, r.registers)


@needs_ptxas
def test_grid_sync_kernels_are_linked_with_cudadevrt(rows):
    for r in rows:
        assert r.linked_cudadevrt == r.grid_sync == ("persistent" in r.kind), (r.kernel, r.arch)


@needs_ptxas
def test_static_plus_planned_dynamic_smem_fits_at_capacity(rows):
    def at_capacity(r, dev, batch):
        h = pplan.capacity(r.cell, r.dtype, dev, batch, ratio=4)
        return h, pplan.plan(r.cell, 64, h, h // 4, batch, r.dtype, dev)
    assert smem_overflows(rows, at_capacity, persistent=lambda r: "persistent" in r.kind,
                          forward=lambda r: r.kind.endswith("fwd")) == []
