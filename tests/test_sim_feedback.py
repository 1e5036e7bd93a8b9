"""The gated-feedback cells' kernels (gpurnn/kernels/feedback.py, host side
gpurnn/backends/cuda_feedback.py, plan gpurnn/planning/feedback.py): the strict simulator
against the NumPy reference (gpurnn.backends.numpy_feedback) with zero findings, static
compilation for sm_80 and sm_90, the plan, and barrier-deletion mutants that must be caught.

The persistent kernels run the whole stack with P > 1 blocks in ONE launch over all steps (the
strict simulator's grid barrier is real); sizes are awkward (H 5 and 7, P not dividing H, a
block that owns no unit, B 1 and 3, L 2 and 3, a length 0 and a full row, bias absent, dropout
masks between layers with one entry None).
"""
import inspect
import re
import types
import zlib

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import cuda_feedback
from gpurnn.backends import numpy_feedback as ref
from gpurnn.backends import sim
from gpurnn.backends.sim import SimRuntime
from gpurnn.feedback import CELLS, param_shapes
from gpurnn.kernels import compile as kcompile
from gpurnn.kernels import feedback as kernels
from gpurnn.kernels.layout import KERNEL_REGS_MAX, units_per_block
from gpurnn import planning as lstm_planning
from gpurnn.planning import feedback as planning

from gpurnn.testing import GRAD_TOL, TOL, assert_close

ARCHS = ("sm_80", "sm_90")
PROFILE = {"sm_80": "A100", "sm_90": "H100"}

needs_ptxas = pytest.mark.skipif(
    kcompile.find_toolkit() is None,
    reason="ptxas from the nvidia-cuda-nvcc wheel is not installed "
           "(pip install 'cuda-toolkit[nvcc]==13.*')")


# ---------------------------------------------------------------- parity with the reference

def make_case(cell, T, B, I, H, L, dtype, bias, masks, seed):
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (0.5 * rng.standard_normal(shape)).astype(dtype)
    params = {f"{n}_l{k}": rand(*s) for k in range(L)
              for n, s in param_shapes(cell, I, H, L, bias, k)}
    lstm = cell == "gf_lstm"
    args = dict(x=rand(T, B, I), params=params, h0=rand(L, B, H),
                c0=rand(L, B, H) if lstm else None)
    if masks:
        # a fixed dropout mask per layer but the first (the last entry None: no dropout there)
        args["masks"] = [((rng.random((T, B, H)) > 0.3) / 0.7).astype(dtype)
                         for _ in range(L - 1)]
        if L > 2:
            args["masks"][-1] = None
    else:
        args["masks"] = None
    cot = dict(dy=rand(T, B, H), dh_n=rand(L, B, H), dc_n=rand(L, B, H) if lstm else None)
    return args, cot


def forward(rt, cell, args, lengths, options, need_saved=True):
    a = (cell, args["x"], args["params"], args["h0"], args["c0"], lengths, args["masks"],
         need_saved)
    if rt is None:
        return ref.feedback_forward(*a)
    return cuda_feedback.run_forward(rt, *a, options)


def backward(rt, cell, args, saved, lengths, cot, options):
    a = (cell, args["x"], args["params"], saved, lengths, args["masks"], cot["dy"], cot["dh_n"],
         cot["dc_n"])
    if rt is None:
        return ref.feedback_backward(*a)
    return cuda_feedback.run_backward(rt, *a, options)


def assert_matches(out, want, grads, want_grads, dtype, lengths=None):
    tol, gtol = TOL[dtype], GRAD_TOL[dtype]
    for name, a, b in zip(("y", "h_n", "c_n"), out[:3], want[:3]):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == np.dtype(dtype) and a.shape == b.shape, name
        assert_close(a, b, tol, name)
    if want[3] is not None:
        assert len(out[3]) == len(want[3])
        for k, (a, b) in enumerate(zip(out[3], want[3])):
            assert a.shape == b.shape and a.dtype == b.dtype, k
            assert_close(a, b, tol, f"saved[{k}]")
    for name, a, b in zip(("dx", "dh0", "dc0"), grads[:3], want_grads[:3]):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == np.dtype(dtype) and a.shape == b.shape, name
        assert_close(a, b, gtol, name)
    assert list(grads[3]) == list(want_grads[3])
    for name, g in want_grads[3].items():
        assert grads[3][name].shape == g.shape, name
        assert_close(grads[3][name], g, gtol, name)
    if lengths is not None:
        T = out[0].shape[0]
        idle = np.arange(T)[:, None] >= np.asarray(lengths)[None, :]
        assert np.all(out[0][idle] == 0), "y must be exactly 0 at padded steps"


def _options(P, threads=None):
    opts = {"path": "stepwise"} if P == "stepwise" else {"path": "persistent", "blocks": P}
    if threads:
        opts["threads"] = threads
    return opts


# (T, B, I, H, L, P or "stepwise", lengths, bias, masks, dtype, threads)
SHAPES = [
    (3, 3, 4, 7, 2, 3, [3, 0, 2], True, True, np.float32, None),     # U 3: 3, 3, 1
    (2, 1, 3, 5, 3, 4, None, False, False, np.float64, 64),          # U 2: 2, 2, 1, 0 (idle)
    (3, 3, 3, 7, 3, "stepwise", [1, 3, 0], False, True, np.float64, None),
    (2, 1, 4, 5, 2, "stepwise", None, True, False, np.float32, None),
]
CASES = [(cell,) + s for cell in CELLS for s in SHAPES]


def _case_id(c):
    cell, T, B, I, H, L, P, lengths, bias, masks, dtype, threads = c
    return (f"{cell}-T{T}-B{B}-H{H}-L{L}-{'P%d' % P if P != 'stepwise' else 'stepwise'}"
            f"{'-len' if lengths else ''}{'' if bias else '-nobias'}{'-drop' if masks else ''}"
            f"{'-threads%d' % threads if threads else ''}-{np.dtype(dtype).name}")


def test_cases_cover_what_the_brief_asks():
    P_gt1 = [s for s in SHAPES if s[5] != "stepwise"]
    assert all(P > 1 and s[3] % P for s in P_gt1 for P in [s[5]])     # P does not divide H
    assert any(units_per_block(s[3], s[5]) * (s[5] - 1) >= s[3] for s in P_gt1)   # idle block
    for group in (P_gt1, [s for s in SHAPES if s[5] == "stepwise"]):
        assert {s[3] for s in group} == {5, 7} and {s[1] for s in group} == {1, 3}
        assert {s[4] for s in group} == {2, 3}
        assert {np.dtype(s[9]).name for s in group} == {"float32", "float64"}
        assert any(s[6] and 0 in s[6] and s[0] in s[6] for s in group)   # a 0 and a full row
        assert any(not s[7] for s in group) and any(s[8] for s in group)


@pytest.mark.parametrize("cell,T,B,I,H,L,P,lengths,bias,masks,dtype,threads", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_matches_numpy_reference(request, cell, T, B, I, H, L, P, lengths, bias, masks, dtype,
                                 threads):
    seed = zlib.crc32(request.node.callspec.id.encode())
    args, cot = make_case(cell, T, B, I, H, L, dtype, bias, masks, seed)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    options = _options(P, threads)
    given = {k: v.copy() for k, v in {**args, **cot, **args["params"]}.items()
             if isinstance(v, np.ndarray)}
    launches = []
    sim.RUNTIME.launch_hook = launches.append
    try:
        with strict.record() as reports:
            out = forward(sim.RUNTIME, cell, args, lengths, options)
            grads = backward(sim.RUNTIME, cell, args, out[3], lengths, cot, options)
    finally:
        sim.RUNTIME.launch_hook = None
    for k, v in {**args, **cot, **args["params"]}.items():     # nothing given is written into
        if k in given:
            assert np.array_equal(v, given[k]), k
    want = forward(None, cell, args, lengths, None)
    want_grads = backward(None, cell, args, want[3], lengths, cot, None)
    assert_matches(out, want, grads, want_grads, dtype, lengths)
    assert reports and all(r.findings == [] for r in reports)
    kinds = [d["kind"] for d in launches]
    if P == "stepwise":
        assert kinds == ["pointwise_fwd"] * (T * L) + ["pointwise_bwd"] * (T * L)
    else:
        # one launch each way for the whole stack; 1 + L grid barriers a forward step (the
        # h* products, then each layer), L a backward step
        assert kinds == ["persistent_fwd", "persistent_bwd"]
        assert [(d["blocks"], d["step_range"]) for d in launches] == [
            (P, (0, T * (L + 1))), (P, (0, T * (L + 1)))]
        assert [(r.grid[0], r.grid_barriers) for r in reports] == [
            (P, T * (L + 1) - 1), (P, T * L)]


@pytest.mark.parametrize("P", [2, "stepwise"])
def test_a_single_layer_stack_matches(P):
    # L = 1: no layer phase reads weight_ih/weight_gx (their buffers are placeholders), the
    # feedback is U^{1->1} alone; 2 grid barriers a forward step, 1 a backward step
    cell = "gf_lstm"
    args, cot = make_case(cell, 3, 2, 3, 5, 1, np.float64, True, False, 48)
    lengths = np.array([3, 1], np.int64)
    with strict.record() as reports:
        out = forward(sim.RUNTIME, cell, args, lengths, _options(P))
        grads = backward(sim.RUNTIME, cell, args, out[3], lengths, cot, _options(P))
    assert all(r.findings == [] for r in reports)
    if P != "stepwise":
        assert [r.grid_barriers for r in reports] == [3 * 2 - 1, 3 * 1]
    want = forward(None, cell, args, lengths, None)
    assert_matches(out, want, grads, backward(None, cell, args, want[3], lengths, cot, None),
                   np.float64, lengths)


@pytest.mark.parametrize("P", [3, "stepwise"])
def test_either_backward_takes_either_forwards_saved_tuple(P):
    cell, dtype = "gf_gru", np.float64
    args, cot = make_case(cell, 3, 3, 4, 7, 2, dtype, True, True, 41)
    lengths = np.array([2, 3, 0], np.int64)
    options = _options(P)
    ours = forward(sim.RUNTIME, cell, args, lengths, options)
    want = forward(None, cell, args, lengths, None)
    want_grads = backward(None, cell, args, want[3], lengths, cot, None)
    from_ref = backward(sim.RUNTIME, cell, args, want[3], lengths, cot, options)
    from_ours = backward(None, cell, args, ours[3], lengths, cot, None)
    assert_matches(ours, want, from_ref, want_grads, dtype, lengths)
    assert_matches(ours, want, from_ours, want_grads, dtype, lengths)


@pytest.mark.parametrize("P", [2, "stepwise"])
def test_nan_in_padded_inputs_reaches_nothing(P):
    cell = "gf_lstm"
    args, cot = make_case(cell, 3, 3, 4, 5, 2, np.float32, True, False, 42)
    lengths = np.array([3, 1, 0], np.int64)
    clean = {**args, "x": args["x"].copy()}
    for b, n in enumerate(lengths):
        clean["x"][n:, b] = 0
        args["x"][n:, b] = np.nan
    options = _options(P)
    with strict.record() as reports:
        out = forward(sim.RUNTIME, cell, args, lengths, options)
        grads = backward(sim.RUNTIME, cell, args, out[3], lengths, cot, options)
    assert all(r.findings == [] for r in reports)
    want = forward(None, cell, clean, lengths, None)
    want_grads = backward(None, cell, clean, want[3], lengths, cot, None)
    for name, g in grads[3].items():
        assert np.all(np.isfinite(g)), name
    assert_matches(out, want, grads, want_grads, np.float32, lengths)


@pytest.mark.parametrize("P", [3, "stepwise"])
def test_inference_forward_keeps_nothing_and_matches(P):
    cell = "gf_rnn_tanh"
    args, _ = make_case(cell, 3, 3, 3, 7, 3, np.float32, True, True, 43)
    lengths = np.array([3, 2, 0], np.int64)
    out = forward(sim.RUNTIME, cell, args, lengths, _options(P), need_saved=False)
    want = forward(None, cell, args, lengths, None, need_saved=False)
    assert out[3] is None and out[2] is None
    for name, a, b in zip(("y", "h_n"), out[:2], want[:2]):
        assert_close(a, b, TOL[np.float32], name)


@pytest.mark.parametrize("P", [3, "stepwise"])
def test_backward_is_deterministic(P):
    # fixed-order sums, no atomics: the same saved tuple gives bit-identical gradients
    cell = "gf_lstm"
    args, cot = make_case(cell, 2, 3, 3, 7, 2, np.float32, True, True, 47)
    lengths = np.array([2, 1, 0], np.int64)
    options = _options(P)
    out = forward(sim.RUNTIME, cell, args, lengths, options)
    first = backward(sim.RUNTIME, cell, args, out[3], lengths, cot, options)
    second = backward(sim.RUNTIME, cell, args, out[3], lengths, cot, options)
    for a, b in zip(first[:3], second[:3]):
        assert np.array_equal(a, b)
    for name in first[3]:
        assert np.array_equal(first[3][name], second[3][name]), name


def test_persistent_kernels_read_each_weight_once_per_launch():
    # persistence, measured: every weight element a block holds is loaded from global memory
    # once per launch, whatever T; nothing writes the weights
    cell = "gf_lstm"
    for T in (1, 3):
        args, cot = make_case(cell, T, 2, 3, 5, 2, np.float32, True, False, 44)
        opts = {"path": "persistent", "blocks": 2}
        with strict.record() as reports:
            out = forward(sim.RUNTIME, cell, args, None, opts)
            backward(sim.RUNTIME, cell, args, out[3], None, cot, opts)
        assert [r.kernel for r in reports] == ["gf_lstm_persistent_fwd_f32",
                                               "gf_lstm_persistent_bwd_f32"]
        for r in reports:
            for name in ("w_fb", "w_hh", "w_gh"):
                reads = r.traffic[name].reads
                assert (reads == 1).all(), (r.kernel, name, reads)
                assert r.traffic[name].total_writes == 0
            # layer 2's input rows (layer 1's are the host's GEMM): w_ih[0] is layer 2's
            assert (r.traffic["w_ih"].reads == 1).all(), r.kernel


def test_a_grid_the_plan_cannot_run_is_refused_before_launch():
    args, _ = make_case("gf_gru", 2, 1, 3, 5, 2, np.float32, True, False, 45)
    with pytest.raises(ValueError, match=r"options\['blocks'\]=100000: the persistent path cannot "
                                         r"run gf_gru L=2 .*cannot be co-resident"):
        forward(sim.RUNTIME, "gf_gru", args, None, {"path": "persistent", "blocks": 100000})
    with pytest.raises(ValueError, match=r"options\['batch_tile'\] is not taken"):
        forward(sim.RUNTIME, "gf_gru", args, None, {"batch_tile": 1})


def test_the_plans_own_choice_runs_and_matches():
    cell = "gf_gru"
    args, cot = make_case(cell, 2, 3, 3, 7, 2, np.float64, True, True, 46)
    lengths = np.array([2, 0, 1], np.int64)
    out = forward(sim.RUNTIME, cell, args, lengths, None)
    grads = backward(sim.RUNTIME, cell, args, out[3], lengths, cot, None)
    want = forward(None, cell, args, lengths, None)
    assert_matches(out, want, grads, backward(None, cell, args, want[3], lengths, cot, None),
                   np.float64, lengths)


STOCK_SCRIPT = """
import numpy as np
from gpurnn.backends import sim, numpy_feedback as ref
sim.enable_stock_simulator()          # before numba.cuda is first imported
from gpurnn.backends import cuda_feedback as cf
from gpurnn.feedback import param_shapes
from gpurnn.testing import rel_err
rng = np.random.default_rng(3)
T, B, I, H, L = 2, 2, 3, 5, 2
r = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float32)
errs = []
log = []
sim.STOCK_RUNTIME.launch_hook = None
sim.RUNTIME.launch_hook = log.append
for cell in ("gf_gru", "gf_lstm"):
    lstm = cell == "gf_lstm"
    params = {f"{n}_l{k}": r(*s) for k in range(L) for n, s in param_shapes(cell, I, H, L, True, k)}
    x, h0, dy, dhn = r(T, B, I), r(L, B, H), r(T, B, H), r(L, B, H)
    c0, dcn = (r(L, B, H), r(L, B, H)) if lstm else (None, None)
    masks = [((rng.random((T, B, H)) > 0.3) / 0.7).astype(np.float32)]
    lengths = np.array([2, 1])
    opts = {"path": "persistent", "blocks": 3}
    out = cf.run_forward(sim.STOCK_RUNTIME, cell, x, params, h0, c0, lengths, masks, True, opts)
    g = cf.run_backward(sim.STOCK_RUNTIME, cell, x, params, out[3], lengths, masks, dy, dhn,
                        dcn, opts)
    want = ref.feedback_forward(cell, x, params, h0, c0, lengths, masks, True)
    gw = ref.feedback_backward(cell, x, params, want[3], lengths, masks, dy, dhn, dcn)
    errs += [rel_err(a, b) for a, b in zip(out[:3] + g[:3], want[:3] + gw[:3]) if b is not None]
    errs += [rel_err(g[3][n], gw[3][n]) for n in gw[3]]
fwd = [d["step_range"] for d in log if d["kind"] == "persistent_fwd"]
bwd = [d["step_range"] for d in log if d["kind"] == "persistent_bwd"]
n = T * (L + 1)
assert fwd == [(q, q + 1) for q in range(n)] * 2, fwd
assert bwd == [(q, q + 1) for q in range(n)] * 2, bwd
assert {d["simulator"] for d in log} == {"stock"}
assert max(errs) < 1e-5, errs
print("STOCK-OK", max(errs))
"""


def test_stock_simulator_launches_once_per_phase_in_a_fresh_process():
    # Numba's own simulator: its grid.sync() only synchronises a block, so with P > 1 the host
    # launches each phase on its own (each launch reloads the weights and starts at any phase)
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", STOCK_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "STOCK-OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- the plan

@pytest.mark.parametrize("device", ["H100", "A100"])
def test_capacity_is_an_edge_below_the_plain_cells(device):
    for L in (2, 3):
        for dtype in ("float32", "float64"):
            h = planning.capacity("gf_lstm", L, dtype, device, 8)
            lstm = lstm_planning.capacity("lstm", dtype, device, 8)
            # about L*(L + 3 + 4) H weights per unit against the LSTM's 4 H
            assert 0 < h < lstm * (4 / (L * (L + 7))) ** 0.5 * 1.3, (L, dtype, h, lstm)
            assert planning.plan("gf_lstm", 64, h, L, 8, dtype, device).persistent_fits
            assert not planning.plan("gf_lstm", 64, h + 1, L, 8, dtype, device).persistent_fits


def test_plan_model_reasons_and_paths():
    p = planning.plan("gf_lstm", 64, 256, 3, 8, "float32", "H100")
    assert p.persistent_fits and p.blocks <= p.max_cooperative_blocks
    assert p.grid_barriers_per_step == (4, 3)
    assert any("4 grid barriers per forward step" in r for r in p.reasons)
    assert p.smem_bytes_fwd == kernels.smem_bytes("fwd", "gf_lstm", 256, 3, 8,
                                                  p.units_per_block, p.blocks, "float32")
    fwd = p.predicted["persistent"][0]
    assert fwd.parts["barriers"] > 4 * 0.8e-6 - 1e-12
    big = planning.plan("gf_lstm", 64, 4096, 3, 8, "float32", "H100")
    assert big.path == "stepwise" and not big.persistent_fits
    assert any("opt-in limit" in r for r in big.reasons)
    with pytest.raises(ValueError, match="dtype must be one of"):
        planning.plan("gf_gru", 8, 8, 2, 1, "float16", "H100")
    with pytest.raises(ValueError, match="cell must be one of"):
        planning.plan("lstm", 8, 8, 2, 1, "float32", "H100")


def test_smem_model_counts_the_whole_stacks_weights():
    # forward rows and backward columns of weight_fb, weight_hh, weight_ih/gx of layers > 1
    # and weight_gh: L*(L + HH + G)*U*H + (L-1)*L*H (+ gate rows) at least, padding < 32 a row
    for cell in CELLS:
        G, HH = kernels.GATES[cell], kernels.HH_GATES[cell]
        for H, L, U, P, B in ((7, 2, 3, 3, 3), (512, 3, 4, 128, 8)):
            core = L * L * U * H + L * HH * U * H + (L - 1) * G * U * H
            f = kernels.smem_elements("fwd", cell, H, L, B, U, P)
            b = kernels.smem_elements("bwd", cell, H, L, B, U, P)
            ng = kernels.gate_rows(L, P)
            assert core + (L - 1) * L * H + ng * L * H + B * L <= f
            rows_f = L * U + L * HH * U + (L - 1) * G * U + (L - 1) * L + ng
            assert f < core + (L - 1) * L * H + ng * L * H + B * L + 32 * rows_f
            assert core + L * L * U * L + (L - 1) * U * L + B * L <= b
            rows_b = L * L * U + L * U + (L - 1) * U
            assert b < core + L * L * U * L + (L - 1) * U * L + B * L + 32 * rows_b


# ---------------------------------------------------------------- static compilation

@pytest.fixture(scope="module")
def rows():
    # 64 compiles: the float32 and float64 halves in two processes side by side (wall time)
    from concurrent.futures import ThreadPoolExecutor
    halves = [f"gpurnn.kernels.feedback:specializations_{d}" for d in ("f32", "f64")]
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda specs: kcompile.check_kernels(ARCHS, specs), halves))
    return parts[0] + parts[1]


@needs_ptxas
def test_every_feedback_kernel_compiles_for_every_arch_without_spills(rows):
    names = {sp.name for sp in kernels.specializations()}
    assert len(names) == 4 * 2 * 4
    assert {(r.kernel, r.arch) for r in rows} == {(n, a) for n in names for a in ARCHS}
    assert [(r.kernel, r.arch, r.error) for r in rows if r.error] == []
    assert [(r.kernel, r.arch) for r in rows if r.spill_bytes or r.local_bytes] == []
    for r in rows:
        assert r.registers is not None and 0 < r.registers <= KERNEL_REGS_MAX, (r.kernel, r.arch)
        assert r.linked_cudadevrt == r.grid_sync == r.kind.startswith("persistent"), r.kernel


@needs_ptxas
def test_static_plus_planned_dynamic_smem_fits_at_capacity(rows):
    for r in rows:
        if not r.kind.startswith("persistent"):
            continue
        dev = lstm_planning.device_profile(PROFILE[r.arch])
        h = planning.capacity(r.cell, 3, r.dtype, dev, 8)
        p = planning.plan(r.cell, 64, h, 3, 8, r.dtype, dev)
        dyn = p.smem_bytes_fwd if r.kind == "persistent_fwd" else p.smem_bytes_bwd
        assert r.static_smem + dyn <= dev.smem_per_block_optin, (r.kernel, r.arch, h)


# ---------------------------------------------------------------- mutants

SOURCE = inspect.getsource(kernels)
LINES = SOURCE.splitlines()
BARRIER = re.compile(r"^\s*(cuda\.syncthreads\(\)|_grid_group_sync\(grid\))\s*(#.*)?$")
ALL_BARRIERS = [i for i, line in enumerate(LINES) if BARRIER.match(line)]
# the backward's weight-load barrier orders nothing (deleting it is no race and no wrong
# value: checked once, by this file's mutant test, before it was marked); it keeps sm_80 at
# 178 registers instead of 232, which test_every_feedback_kernel_compiles... checks
FENCES = [i for i in ALL_BARRIERS if LINES[i].rstrip().endswith("# register fence")]
BARRIER_LINES = [i for i in ALL_BARRIERS if i not in FENCES]
# (cell, T, B, H, L, P, threads): different thread mappings per phase, an idle block
MUTANT_CASES = [
    ("gf_gru", 3, 3, 7, 2, 3, 32),
    ("gf_lstm", 2, 3, 5, 3, 4, 32),
]


def test_the_source_has_the_barriers_the_docstring_promises():
    assert len(FENCES) == 1
    kinds = [BARRIER.match(LINES[i]).group(1) for i in BARRIER_LINES]
    assert kinds.count("_grid_group_sync(grid)") == 2          # one per persistent kernel
    bwd_start = next(i for i, line in enumerate(LINES) if line.startswith("def make_bwd"))
    in_fwd = [i for i in BARRIER_LINES if i < bwd_start]
    # forward: weights loaded, reset gates formed; grid. backward: ds of the layer above, ds
    # of layer 1 (phase Z), carry_h after phase Z; grid
    assert len(in_fwd) == 2 + 1 and len(BARRIER_LINES) - len(in_fwd) == 3 + 1


class MutantRuntime(SimRuntime):
    """The strict sim backend with the gated-feedback kernels taken from a rebuilt module."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def compile(self, spec):
        if spec.cell not in kernels.CELLS:
            return super().compile(spec)
        factory = {"persistent_fwd": self.module.make_fwd, "persistent_bwd": self.module.make_bwd,
                   "pointwise_fwd": self.module.make_pointwise_fwd,
                   "pointwise_bwd": self.module.make_pointwise_bwd}[spec.kind]
        return strict.jit(factory(spec.cell, spec.dtype), name=spec.name)


def _module(source, tag):
    mod = types.ModuleType(f"gpurnn.kernels._feedback_mutant_{tag}")
    mod.__package__ = "gpurnn.kernels"
    mod.__file__ = kernels.__file__
    exec(compile(source, f"<feedback.py {tag}>", "exec"), mod.__dict__)
    return mod


def _run_mutant_case(rt, case, seed):
    cell, T, B, H, L, P, threads = case
    args, cot = make_case(cell, T, B, 3, H, L, np.float32, True, True, seed)
    lengths = np.arange(B, dtype=np.int64) % T + 1
    options = _options(P, threads)
    out = forward(rt, cell, args, lengths, options)
    grads = backward(rt, cell, args, out[3], lengths, cot, options)
    want = forward(None, cell, args, lengths, None)
    want_grads = backward(None, cell, args, want[3], lengths, cot, None)
    pairs = [("y", out[0], want[0]), ("h_n", out[1], want[1]), ("dx", grads[0], want_grads[0]),
             ("dh0", grads[1], want_grads[1])]
    pairs += [(n, grads[3][n], want_grads[3][n]) for n in want_grads[3]]
    for name, a, b in pairs:
        if not np.allclose(a, b, rtol=1e-4, atol=1e-5):
            return f"{name} differs from the reference"
    return None


def caught_by(source, tag):
    rt = MutantRuntime(_module(source, tag))
    for n, case in enumerate(MUTANT_CASES):
        try:
            wrong = _run_mutant_case(rt, case, seed=n)
        except strict.SimulatorError as err:
            return f"{case}: {type(err).__name__}: {str(err).splitlines()[0]}"
        if wrong:
            return f"{case}: {wrong}"
    return None


@pytest.mark.mutation
def test_unmutated_source_passes_every_mutant_case():
    assert caught_by(SOURCE, "original") is None


def _delete(line_no):
    lines = list(LINES)
    indent = lines[line_no][: len(lines[line_no]) - len(lines[line_no].lstrip())]
    lines[line_no] = indent + "pass  # mutant: barrier deleted"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("line_no", BARRIER_LINES,
                         ids=[f"L{i + 1}-{LINES[i].split('#')[0].strip()}" for i in BARRIER_LINES])
@pytest.mark.mutation
def test_deleting_any_barrier_is_caught(line_no):
    found = caught_by(_delete(line_no), f"L{line_no + 1}")
    assert found is not None, (f"deleting line {line_no + 1} ({LINES[line_no].strip()}) of "
                               f"feedback.py went unnoticed: redundant, or a gap in the checks")


@pytest.mark.mutation
@pytest.mark.parametrize("kernel", ["fwd", "bwd"])
def test_idle_blocks_returning_early_is_caught(kernel):
    # `if nu == 0: return` after the unit slice: a GPU would hang at the next grid barrier,
    # which the other blocks still reach (MUTANT_CASES[1] has a block that owns no unit)
    anchor = "u0, nu = _owned_units(units, H)"
    hits = [i for i, line in enumerate(LINES) if line.strip() == anchor]
    assert len(hits) == 2
    i = hits[0 if kernel == "fwd" else 1]
    indent = LINES[i][: len(LINES[i]) - len(LINES[i].lstrip())]
    lines = LINES[: i + 1] + [indent + "if nu == 0:", indent + "    return"] + LINES[i + 1:]
    found = caught_by("\n".join(lines) + "\n", f"early-return-{kernel}")
    assert found is not None and "a GPU would hang here" in found, found
