"""The multiplicative LSTM's kernels (gpurnn/kernels/mlstm.py, host side
gpurnn/backends/cuda_mlstm.py, plan gpurnn/planning/mlstm.py): static compilation for sm_80 and
sm_90, the strict simulator against the NumPy reference (gpurnn.backends.numpy_lstm) with zero
findings, and barrier-deletion mutants that must be caught.

The persistent kernels run with P > 1 blocks in ONE launch over all steps (the strict
simulator's grid barrier is real); sizes are awkward (H 7 and 33, P not dividing H, blocks that
own no unit, B 1 and 3, T 1, a length 0, unsorted lengths, bias=False, batch tiles that do not
divide B, dot products split over 1 to 32 lanes).
"""
import zlib

import numpy as np
import pytest

from gpurnn import planning as lstm_planning
from gpurnn import sim as strict
from gpurnn.backends import cuda_mlstm
from gpurnn.backends import numpy_lstm as ref
from gpurnn.backends import sim
from gpurnn.kernels import mlstm as kernels
from gpurnn.kernels.layout import KERNEL_REGS_MAX, lanes_per_output, units_per_block
from gpurnn.planning import mlstm as planning
from gpurnn.testing import GRAD_TOL, TOL, assert_close
from gpurnn.variants import LSTMForm

from simtools import (PROFILE, MutantRuntime, assert_close_with_finite_grads, barrier_kinds,
                      barriers_before_and_after, compile_errors, compile_rows, compiled_pairs,
                      devrt_mismatches, first_catch, first_difference, kernel_source,
                      launches_logged, lstm_case, mutant_module, mutation_tests, nan_padded,
                      needs_ptxas, over_budget, run_fresh, smem_overflows, spilled,
                      staggered_lengths, wanted_pairs)

FORM = LSTMForm(multiplicative=True)


# ---------------------------------------------------------------- static compilation

@pytest.fixture(scope="module")
def rows():
    return compile_rows("gpurnn.kernels.mlstm:specializations")


@needs_ptxas
def test_every_mlstm_kernel_compiles_for_every_arch_without_spills(rows):
    names = {sp.name for sp in kernels.specializations()}
    assert len(names) == 6
    assert compiled_pairs(rows) == wanted_pairs(names)
    assert compile_errors(rows) == []
    assert spilled(rows) == []
    assert devrt_mismatches(rows, lambda r: r.kind.startswith("persistent")) == []


@needs_ptxas
def test_registers_within_the_plans_budget(rows):
    assert over_budget(rows, lambda r: planning.plan(64, 512, 8, r.dtype, PROFILE[r.arch])) == []
    assert [(r.kernel, r.arch, r.registers) for r in rows if r.registers > KERNEL_REGS_MAX] == []


@needs_ptxas
def test_static_plus_planned_dynamic_smem_fits_at_capacity(rows):
    def at_capacity(r, dev, batch):
        h = planning.capacity(r.dtype, dev, batch=batch)
        return h, planning.plan(64, h, batch, r.dtype, dev)
    assert smem_overflows(rows, at_capacity) == []


# ---------------------------------------------------------------- the plan

@pytest.mark.parametrize("device", ["H100", "A100"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_capacity_is_below_the_plain_lstms_and_is_an_edge(device, dtype):
    for batch in (1, 8):
        h = planning.capacity(dtype, device, batch)
        lstm = lstm_planning.capacity("lstm", dtype, device, batch)
        # 5 H^2 weights against the LSTM's 4 H^2: about sqrt(4/5) of its H
        assert 0.8 * lstm < h < lstm, (h, lstm)
        assert planning.plan(64, h, batch, dtype, device, blocks=None).persistent_fits
        assert not planning.plan(64, h + 1, batch, dtype, device).persistent_fits


def test_plan_paths_reasons_and_traffic():
    p = planning.plan(256, 512, 8, "float32", "H100")
    assert p.persistent_fits and p.blocks <= p.max_cooperative_blocks
    assert p.units_per_block == units_per_block(512, p.blocks)
    assert p.smem_bytes_fwd == kernels.smem_bytes("fwd", 512, p.batch_tile, p.units_per_block,
                                                  "float32", threads=p.threads)
    assert any("two grid barriers per step" in r for r in p.reasons)
    big = planning.plan(256, 4096, 8, "float32", "H100")
    assert big.path == "stepwise" and not big.persistent_fits
    assert any("opt-in limit" in r for r in big.reasons)
    pers = planning.step_traffic(p, "persistent")
    step = planning.step_traffic(p, "stepwise")
    assert step["bytes"]["gemm read w_hh"] == 4 * 512 * 512 * 4
    assert step["bytes"]["gemm read w_mh"] == 512 * 512 * 4
    assert pers["dram_bytes"] < step["dram_bytes"] and pers["launches"] == 1
    with pytest.raises(ValueError, match="dtype must be one of"):
        planning.plan(8, 8, 1, "float16", "H100")


def test_smem_model_counts_both_weight_slices():
    # forward: W_mh rows U x S(H) and W_hh rows 4U x S(H); backward: the columns, U x S(H) and
    # U x S(4H); each padded row at most 31 elements longer than its length
    for H, bt, U, threads in ((7, 3, 3, 32), (33, 2, 17, 64), (512, 8, 4, 256)):
        wf, rest_f = kernels.smem_regions("fwd", H, bt, U, threads)
        wb, rest_b = kernels.smem_regions("bwd", H, bt, U, threads)
        assert 5 * U * H <= wf < 5 * U * (H + 32) and 5 * U * H <= wb < U * (5 * H + 64)
        assert rest_f == bt * H + bt * 4 * U + threads and rest_b == bt * 4 * H + threads


# ---------------------------------------------------------------- parity with the reference

def make_case(T, B, I, H, dtype, bias, seed):
    return lstm_case(FORM, T, B, I, H, dtype, bias, seed)


def forward(rt, args, lengths, reverse, options, need_saved=True):
    if rt is None:
        return ref.lstm_forward(FORM, args["x"], args["params"], args["h0"], args["c0"], lengths,
                                reverse, need_saved)
    return cuda_mlstm.run_forward(rt, FORM, args["x"], args["params"], args["h0"], args["c0"],
                                  lengths, reverse, need_saved, options)


def backward(rt, args, saved, lengths, reverse, cot, options):
    a = (FORM, args["x"], args["params"], saved, lengths, reverse, cot["dy"], cot["dh_n"],
         cot["dc_n"])
    if rt is None:
        return ref.lstm_backward(*a)
    return cuda_mlstm.run_backward(rt, *a, options)


SAVED = ("h", "c", "gates", "mx", "mh")


def assert_matches(out, want, grads, want_grads, dtype, lengths=None):
    tol, gtol = TOL[dtype], GRAD_TOL[dtype]
    for name, a, b in zip(("y", "h_n", "c_n"), out[:3], want[:3]):
        assert a.dtype == np.dtype(dtype), name
        assert_close(a, b, tol, name)
    assert len(out[3]) == len(want[3]) == 5
    for name, a, b in zip(SAVED, out[3], want[3]):
        assert a.shape == b.shape, name
        assert_close(a, b, tol, f"saved {name}")
    for name, a, b in zip(("dx", "dh0", "dc0"), grads[:3], want_grads[:3]):
        assert a.dtype == np.dtype(dtype), name
        assert_close(a, b, gtol, name)
    assert set(grads[3]) == set(want_grads[3])
    for name in want_grads[3]:
        assert grads[3][name].shape == want_grads[3][name].shape, name
        assert_close(grads[3][name], want_grads[3][name], gtol, name)
    if lengths is not None:
        T = out[0].shape[0]
        masked = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]
        assert np.all(out[0][masked] == 0), "y must be exactly 0 at masked steps"


# (T, B, I, H, P or "stepwise", lengths, reverse, bias, dtype, threads, batch_tile)
CASES = [
    (3, 3, 4, 7, 3, [3, 1, 2], False, True, np.float32, None, None),   # U 3, 3, 1
    (3, 1, 5, 33, 2, None, True, False, np.float64, None, None),       # U 17, 16; B 1
    (2, 3, 3, 7, 6, [2, 0, 1], True, True, np.float32, None, None),    # blocks 4, 5 idle
    (1, 3, 3, 7, 2, [1, 0, 1], False, False, np.float32, None, None),  # T 1
    (3, 3, 4, 7, 2, [1, 3, 2], False, True, np.float64, None, 2),      # tiles 2, 1; L 2
    (3, 3, 3, 33, 1, [2, 3, 1], True, True, np.float32, None, 2),      # tiles, L 1
    (3, 1, 3, 7, 7, None, False, True, np.float32, 64, None),          # L 32 and 16
    (3, 3, 4, 33, "stepwise", [3, 1, 2], True, True, np.float32, None, None),
    (2, 1, 3, 7, "stepwise", None, False, False, np.float64, None, None),
    (3, 3, 3, 7, "stepwise", [2, 0, 3], False, True, np.float64, None, None),
]


def _case_id(c):
    T, B, I, H, P, lengths, reverse, bias, dtype, threads, bt = c
    return (f"T{T}-B{B}-H{H}-{'P%d' % P if P != 'stepwise' else 'stepwise'}"
            f"{'-len' if lengths else ''}{'-rev' if reverse else ''}{'' if bias else '-nobias'}"
            f"{'-threads%d' % threads if threads else ''}{'-tile%d' % bt if bt else ''}"
            f"-{np.dtype(dtype).name}")


def _options(P, threads=None, batch_tile=None):
    if P == "stepwise":
        opts = {"path": "stepwise"}
    else:
        opts = {"path": "persistent", "blocks": P}
    if threads:
        opts["threads"] = threads
    if batch_tile:
        opts["batch_tile"] = batch_tile
    return opts


def test_cases_cover_lanes_tiles_idle_blocks_and_both_paths():
    seen = set()
    for T, B, I, H, P, lengths, reverse, bias, dtype, threads, bt in CASES:
        if P == "stepwise":
            seen.add(("stepwise", bool(lengths), reverse, np.dtype(dtype).name))
            continue
        U, n = units_per_block(H, P), threads or 32
        tile = bt or B
        seen.add(("P>1" if P > 1 else "P=1", bool(lengths), reverse, np.dtype(dtype).name))
        seen.add(("lanes fwd", lanes_per_output(tile * U, n) > 1, lanes_per_output(tile * 4 * U, n) > 1))
        seen.add(("lanes bwd", lanes_per_output(tile * U, n) > 1, bool(bt)))
        if P * U - H >= U:
            seen.add("idle block")
    for path in ("P>1", "stepwise"):
        assert any(s[0] == path and s[1] for s in seen if isinstance(s, tuple)), path
        assert any(s[0] == path and s[2] for s in seen if isinstance(s, tuple)), path
        for dt in ("float32", "float64"):
            assert any(s[0] == path and s[3] == dt for s in seen if len(s) == 4), (path, dt)
    assert {("lanes fwd", True, False), ("lanes fwd", False, False), ("lanes fwd", True, True)} <= seen
    assert {("lanes bwd", True, True), ("lanes bwd", False, True)} <= seen
    assert "idle block" in seen


@pytest.mark.parametrize("T,B,I,H,P,lengths,reverse,bias,dtype,threads,bt", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_matches_numpy_reference(request, T, B, I, H, P, lengths, reverse, bias, dtype, threads,
                                 bt):
    seed = zlib.crc32(request.node.callspec.id.encode())
    args, cot = make_case(T, B, I, H, dtype, bias, seed)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    options = _options(P, threads, bt)
    with launches_logged() as launches, strict.record() as reports:
        out = forward(sim.RUNTIME, args, lengths, reverse, options)
        grads = backward(sim.RUNTIME, args, out[3], lengths, reverse, cot, options)
    want = forward(None, args, lengths, reverse, None)
    want_grads = backward(None, args, want[3], lengths, reverse, cot, None)
    assert_matches(out, want, grads, want_grads, dtype, lengths)
    assert all(r.findings == [] for r in reports)
    kinds = [d["kind"] for d in launches]
    if P == "stepwise":
        assert kinds == ["pointwise_fwd"] * T + ["pointwise_bwd", "pointwise_dm"] * T
    else:
        # one launch each way, P blocks, two grid barriers a step (2T half-steps forward,
        # 2T + 1 half-phases backward)
        assert kinds == ["persistent_fwd", "persistent_bwd"]
        assert [(d["blocks"], d["step_range"]) for d in launches] == [(P, (0, 2 * T)),
                                                                      (P, (0, 2 * T + 1))]
        assert [(r.grid[0], r.grid_barriers) for r in reports] == [(P, 2 * T - 1), (P, 2 * T)]


@pytest.mark.parametrize("P", [3, "stepwise"])
def test_nan_in_padded_inputs_reaches_no_gradient(P):
    T, B, I, H = 3, 3, 4, 7
    args, cot = make_case(T, B, I, H, np.float32, True, 31)
    lengths = np.array([3, 1, 0], np.int64)
    clean = nan_padded(args, lengths)
    options = _options(P)
    with strict.record() as reports:
        out = forward(sim.RUNTIME, args, lengths, False, options)
        grads = backward(sim.RUNTIME, args, out[3], lengths, False, cot, options)
    assert all(r.findings == [] for r in reports)
    want = forward(None, clean, lengths, False, None)
    want_grads = backward(None, clean, want[3], lengths, False, cot, None)
    assert_close_with_finite_grads(out, grads, want, want_grads, np.float32)


@pytest.mark.parametrize("P", [2, "stepwise"])
def test_inference_forward_keeps_nothing_and_matches(P):
    args, _ = make_case(3, 2, 3, 7, np.float32, True, 32)
    lengths = np.array([3, 2], np.int64)
    y, h_n, c_n, saved = forward(sim.RUNTIME, args, lengths, True, _options(P), need_saved=False)
    want = forward(None, args, lengths, True, None, need_saved=False)
    assert saved is None
    for name, a, b in zip(("y", "h_n", "c_n"), (y, h_n, c_n), want[:3]):
        assert_close(a, b, TOL[np.float32], name)


@pytest.mark.parametrize("P", [3, "stepwise"])
def test_backward_is_deterministic(P):
    args, cot = make_case(3, 3, 4, 7, np.float32, True, 33)
    lengths = np.array([3, 1, 2], np.int64)
    options = _options(P)
    out = forward(sim.RUNTIME, args, lengths, False, options)
    first = backward(sim.RUNTIME, args, out[3], lengths, False, cot, options)
    second = backward(sim.RUNTIME, args, out[3], lengths, False, cot, options)
    for a, b in zip(first[:3], second[:3]):
        assert np.array_equal(a, b)
    for name in first[3]:
        assert np.array_equal(first[3][name], second[3][name]), name


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_persistent_kernels_read_each_weight_once_per_launch(direction):
    # persistence, measured: every element of W_mh and W_hh is loaded from global memory once
    # per launch, however many steps it runs; nothing writes them
    for T in (2, 5):
        args, cot = make_case(T, 2, 3, 7, np.float32, True, 36)
        opts = {"path": "persistent", "blocks": 3}
        with strict.record() as reports:
            out = forward(sim.RUNTIME, args, None, False, opts)
            if direction == "bwd":
                backward(sim.RUNTIME, args, out[3], None, False, cot, opts)
        report = [r for r in reports if r.kernel == f"mlstm_persistent_{direction}_f32"]
        assert len(report) == 1 and report[0].grid == (3, 1, 1)
        for name in ("w_mh", "w_hh"):
            reads = report[0].traffic[name].reads
            assert reads.shape == args["params"]["weight_" + name[2:]].shape
            assert (reads == 1).all(), (name, reads)
            assert report[0].traffic[name].total_writes == 0


def test_the_sim_backends_entry_points_dispatch_here():
    # gpurnn.backends.sim.lstm_forward / lstm_backward (gpurnn.variants' entry points) reach
    # cuda_mlstm for the multiplicative form, and the saved layout feeds either backend
    args, cot = make_case(2, 2, 3, 7, np.float64, True, 34)
    a = (FORM, args["x"], args["params"], args["h0"], args["c0"], None, False, True)
    opts = {"path": "persistent", "blocks": 2}
    with launches_logged() as launches:
        out = sim.lstm_forward(*a, options=opts)
        grads = sim.lstm_backward(FORM, args["x"], args["params"], out[3], None, False, cot["dy"],
                                  cot["dh_n"], cot["dc_n"], options=opts)
    assert [d["name"] for d in launches] == ["mlstm_persistent_fwd_f64", "mlstm_persistent_bwd_f64"]
    want = ref.lstm_forward(*a)
    # the reference's saved arrays through the kernels' backward
    from_ref = backward(sim.RUNTIME, args, want[3], None, False, cot, {"path": "stepwise"})
    want_grads = backward(None, args, want[3], None, False, cot, None)
    assert_matches(out, want, grads, want_grads, np.float64)
    assert_matches(out, want, from_ref, want_grads, np.float64)


def test_a_grid_the_plan_cannot_run_is_refused_before_launch():
    args, _ = make_case(2, 1, 3, 7, np.float32, True, 35)
    with pytest.raises(ValueError, match=r"options\['blocks'\]=100000: the persistent path cannot "
                                         r"run mlstm .*cannot be co-resident"):
        forward(sim.RUNTIME, args, None, False, {"path": "persistent", "blocks": 100000})


STOCK_SCRIPT = """
import numpy as np
from gpurnn.variants import LSTMForm
from gpurnn.backends import sim, numpy_lstm as ref
from gpurnn.testing import rel_err
form = LSTMForm(multiplicative=True)
rng = np.random.default_rng(3)
T, B, I, H = 3, 2, 3, 7
r = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float32)
params = {n: r(*s) for n, s in form.param_shapes(I, H, True)}
x, h0, c0, dy, dhn, dcn = r(T, B, I), r(B, H), r(B, H), r(T, B, H), r(B, H), r(B, H)
log = []
sim.RUNTIME.launch_hook = log.append
L = np.array([3, 2])
opts = {"simulator": "stock", "path": "persistent", "blocks": 3}
out = sim.lstm_forward(form, x, params, h0, c0, L, True, True, options=opts)
g = sim.lstm_backward(form, x, params, out[3], L, True, dy, dhn, dcn, options=opts)
want = ref.lstm_forward(form, x, params, h0, c0, L, True, True)
gw = ref.lstm_backward(form, x, params, want[3], L, True, dy, dhn, dcn)
errs = [rel_err(a, b) for a, b in zip(out[:3] + g[:3], want[:3] + gw[:3])]
errs += [rel_err(g[3][n], gw[3][n]) for n in gw[3]]
assert max(errs) < 1e-5, errs
fwd = [d["step_range"] for d in log if d["kind"] == "persistent_fwd"]
bwd = [d["step_range"] for d in log if d["kind"] == "persistent_bwd"]
assert fwd == [(q, q + 1) for q in range(2 * T)], fwd
assert bwd == [(q, q + 1) for q in range(2 * T + 1)], bwd
assert {d["simulator"] for d in log} == {"stock"}
print("STOCK-OK", max(errs))
"""


def test_stock_simulator_launches_once_per_half_step_in_a_fresh_process():
    # Numba's own simulator: its grid.sync() only synchronises a block, so with P > 1 the host
    # launches each half-step (forward) and half-phase (backward) on its own
    r = run_fresh(STOCK_SCRIPT, timeout=120)
    assert r.returncode == 0 and "STOCK-OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- mutants

SOURCE, LINES, BARRIER_LINES = kernel_source(kernels)
# (T, B, H, P, threads, batch_tile): tiles with L > 1 and with L = 1, one-unit blocks at 32
# lanes, idle blocks
MUTANT_CASES = [
    (3, 3, 7, 2, 32, 2),       # U 4, tiles 2+1: phase 1 / A / B L 2, phase 2 L 1
    (3, 3, 33, 1, 32, 2),      # tiles with L 1 everywhere
    (3, 1, 7, 7, 64, None),    # U 1: L 32 (phase 1, A, B), 16 (phase 2)
    (2, 3, 7, 6, 32, None),    # blocks 4 and 5 own no unit
]


def test_the_source_has_the_barriers_the_docstring_promises():
    kinds = barrier_kinds(LINES, BARRIER_LINES)
    assert kinds.count("_grid_group_sync(grid)") == 2          # one per persistent kernel
    # forward: phase 1 between tiles, staging, scratch; phase 2 staging, scratch, pre; grid.
    # backward: phase A between tiles, staging, scratch; phase B the same three; grid.
    assert barriers_before_and_after(LINES, BARRIER_LINES, "def make_bwd") == (6 + 1, 6 + 1)


def _build(module, spec):
    factory = {"persistent_fwd": module.make_fwd, "persistent_bwd": module.make_bwd,
               "pointwise_dm": module.make_pointwise_dm}[spec.kind]
    return factory(spec.dtype)


def mutant_runtime(source, tag):
    """The strict sim backend with the mLSTM kernels taken from `source` rebuilt as a module."""
    return MutantRuntime(mutant_module(source, tag, kernels, "mlstm"),
                         lambda spec: spec.cell == kernels.CELL, _build)


def _run_mutant_case(rt, case, seed):
    T, B, H, P, threads, bt = case
    args, cot = make_case(T, B, 3, H, np.float32, True, seed)
    lengths = staggered_lengths(T, B)
    options = _options(P, threads, bt)
    out = forward(rt, args, lengths, False, options)
    grads = backward(rt, args, out[3], lengths, False, cot, options)
    want = forward(None, args, lengths, False, None)
    want_grads = backward(None, args, want[3], lengths, False, cot, None)
    pairs = [("y", out[0], want[0]), ("dx", grads[0], want_grads[0]),
             ("dh0", grads[1], want_grads[1])]
    pairs += [(n, grads[3][n], want_grads[3][n]) for n in ("weight_hh", "weight_mh")]
    return first_difference(pairs)


def caught_by(source, tag):
    rt = mutant_runtime(source, tag)
    return first_catch(MUTANT_CASES, lambda n, case: _run_mutant_case(rt, case, seed=n))


# the unmutated source passes every case; deleting any one barrier is caught; an idle block
# returning early is caught as a hang
(test_unmutated_source_passes_every_mutant_case, test_deleting_any_barrier_is_caught,
 test_idle_blocks_returning_early_is_caught) = mutation_tests(
    caught_by, SOURCE, LINES, BARRIER_LINES, "mlstm.py", "u0, nu = _owned_units(units, H)",
    "nu == 0")
