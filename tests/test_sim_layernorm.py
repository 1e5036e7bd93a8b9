"""The LayerNormLSTM's kernels (gpurnn/kernels/layernorm.py, host side
gpurnn/backends/cuda_layernorm.py, plan gpurnn/planning/layernorm.py): static compilation for
sm_80 and sm_90, the strict simulator against a float64 reference with zero findings, and
barrier-deletion mutants that must be caught.

Two references, written independently of the kernels and of each other: the NumPy oracle
gpurnn.backends.numpy_layernorm (the whole saved tuple, masked steps included, compared too) and
a float64 torch autograd reference written here straight from gpurnn/layernorm.py's equations
(torch_reference; the saved per-step values compared where the step ran). Every parity case is
checked against both.
The persistent kernels run with P > 1 blocks in ONE launch over all steps (the strict
simulator's grid barrier is real); sizes are awkward (H 7 and 33, P not dividing H, a block
that owns no unit, B 1 and 3, a length 0, unsorted lengths, bias=False, batch tiles).
"""
import importlib
import zlib

import numpy as np
import pytest

from gpurnn import planning as lstm_planning
from gpurnn import sim as strict
from gpurnn.backends import cuda_layernorm
from gpurnn.backends import sim
from gpurnn.kernels import layernorm as kernels
from gpurnn.kernels.layout import KERNEL_REGS_MAX, lanes_per_output, units_per_block
from gpurnn.layernorm import EPS, LayerNormLSTMLayer
from gpurnn.planning import layernorm as planning
from gpurnn.testing import GRAD_TOL, TOL, assert_close

from simtools import (PROFILE, MutantRuntime, assert_close_with_finite_grads, barrier_kinds,
                      barriers_before_and_after, compile_errors, compile_rows, compiled_pairs,
                      devrt_mismatches, first_catch, first_difference, kernel_source,
                      launches_logged, mutant_module, mutation_tests, nan_padded, needs_ptxas,
                      normal_draws, over_budget, run_fresh, smem_overflows, spilled,
                      staggered_lengths, wanted_pairs)

LAYER = LayerNormLSTMLayer()
SAVED = ("h", "c", "gates", "xhat", "hhat", "stats")
PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "layernorm_x_weight",
          "layernorm_x_bias", "layernorm_h_weight", "layernorm_h_bias", "layernorm_c_weight",
          "layernorm_c_bias")


def _numpy_reference():
    try:
        return importlib.import_module("gpurnn.backends.numpy_layernorm")
    except ImportError:
        return None


NUMPY_REF = _numpy_reference()


# ---------------------------------------------------------------- static compilation

@pytest.fixture(scope="module")
def rows():
    # one compile subprocess per arch, side by side (the 24 compilations dominate the file)
    return compile_rows("gpurnn.kernels.layernorm:specializations", per_arch=True)


@needs_ptxas
def test_every_layernorm_kernel_compiles_for_every_arch_without_spills(rows):
    names = {sp.name for sp in kernels.specializations()}
    assert len(names) == 12
    assert compiled_pairs(rows) == wanted_pairs(names)
    assert compile_errors(rows) == []
    assert spilled(rows) == []
    assert devrt_mismatches(rows, lambda r: r.kind.startswith("persistent")) == []


@needs_ptxas
def test_registers_within_the_plans_budget(rows):
    assert over_budget(rows, lambda r: planning.plan(64, 512, 8, r.dtype, PROFILE[r.arch])) == []
    for r in rows:
        # the persistent ones above the plain kernels' cap, within the plan's own
        limit = planning.KERNEL_REGS if r.kind.startswith("persistent") else KERNEL_REGS_MAX
        assert r.registers <= limit, (r.kernel, r.arch, r.registers)


def test_the_plan_refuses_block_sizes_that_leave_too_few_registers():
    assert planning.KERNEL_REGS > KERNEL_REGS_MAX
    ok = planning.plan(64, 256, 8, "float32", "H100", threads=288)
    assert ok.regs_per_thread >= planning.KERNEL_REGS and ok.persistent_fits
    p = planning.plan(64, 256, 8, "float32", "H100", threads=320)
    assert KERNEL_REGS_MAX <= p.regs_per_thread < planning.KERNEL_REGS
    assert not p.persistent_fits and p.path == "stepwise"
    assert any("LayerNormLSTM kernels use up to" in r for r in p.reasons)


@needs_ptxas
def test_static_plus_planned_dynamic_smem_fits_at_capacity(rows):
    def at_capacity(r, dev, batch):
        h = planning.capacity(r.dtype, dev, batch=batch)
        return h, planning.plan(64, h, batch, r.dtype, dev)
    assert smem_overflows(rows, at_capacity) == []


# ---------------------------------------------------------------- the plan

@pytest.mark.parametrize("device", ["H100", "A100"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_capacity_is_at_most_the_plain_lstms_and_is_an_edge(device, dtype):
    for batch in (1, 8):
        h = planning.capacity(dtype, device, batch)
        lstm = lstm_planning.capacity("lstm", dtype, device, batch)
        # the same weight slice; a few more elements per block (row statistics, cp)
        assert 0.95 * lstm <= h <= lstm, (h, lstm)
        assert planning.plan(64, h, batch, dtype, device).persistent_fits
        assert not planning.plan(64, h + 1, batch, dtype, device).persistent_fits


def test_plan_paths_reasons_and_traffic():
    p = planning.plan(256, 512, 8, "float32", "H100")
    assert p.persistent_fits and p.blocks <= p.max_cooperative_blocks
    assert p.units_per_block == units_per_block(512, p.blocks)
    assert p.smem_bytes_fwd == kernels.smem_bytes("fwd", 512, p.batch_tile, p.units_per_block,
                                                  "float32", threads=p.threads)
    assert p.smem_bytes_bwd == kernels.smem_bytes("bwd", 512, p.batch_tile, p.units_per_block,
                                                  "float32", threads=p.threads)
    assert any("two grid barriers per step" in r for r in p.reasons)
    big = planning.plan(256, 4096, 8, "float32", "H100")
    assert big.path == "stepwise" and not big.persistent_fits
    assert any("opt-in limit" in r for r in big.reasons)
    pers = planning.step_traffic(p, "persistent")
    step = planning.step_traffic(p, "stepwise")
    assert step["bytes"]["gemm read w_hh"] == 4 * 512 * 512 * 4
    assert pers["dram_bytes"] < step["dram_bytes"] and pers["launches"] == 1
    with pytest.raises(ValueError, match="dtype must be one of"):
        planning.plan(8, 8, 1, "float16", "H100")


def test_step_model_counts_the_second_grid_barrier():
    from gpurnn.planning import cost
    p = planning.plan(256, 512, 8, "float32", "H100")
    timing = cost.timing_for(p.device)
    f = planning.search(512, 8, "float32", p.blocks_per_sm, p.device, p.threads)
    for d in ("fwd", "bwd"):
        ln = planning.persistent_step(d, 512, 8, 4, f, p.device, timing)
        plain = cost.persistent_step(d, 4, 512, 8, 4, f.blocks, f.units, f.tile, 4, p.device,
                                     timing)
        assert ln.parts["barriers"] - plain.parts["barriers"] >= timing.grid_sync_s
        assert ln.total > plain.total


def test_smem_model():
    assert kernels.EPS == EPS           # the kernels' copy of the contract's constant
    for H, bt, U, threads in ((7, 3, 3, 32), (33, 2, 17, 64), (512, 8, 4, 256)):
        wf, rest_f = kernels.smem_regions("fwd", H, bt, U, threads)
        wb, rest_b = kernels.smem_regions("bwd", H, bt, U, threads)
        assert 4 * U * H <= wf < 4 * U * (H + 32) and U * 4 * H <= wb < U * (4 * H + 32)
        assert rest_f == bt * H + bt * 4 * U + threads + 2 * bt
        assert rest_b == bt * 4 * H + threads + 2 * bt * U + 2 * bt


# ---------------------------------------------------------------- the references

def torch_reference(args, lengths, reverse, noise, cot, bias):
    """Forward (y, h_n, c_n, saved) and backward (dx, dh0, dc0, grads) in float64 autograd,
    written from gpurnn/layernorm.py's equations (not from the kernels)."""
    import torch
    f64 = torch.float64
    P = {k: torch.tensor(np.asarray(v, np.float64), dtype=f64, requires_grad=True)
         for k, v in args["params"].items()}
    x = torch.tensor(np.asarray(args["x"], np.float64), requires_grad=True)
    h0 = torch.tensor(np.asarray(args["h0"], np.float64), requires_grad=True)
    c0 = torch.tensor(np.asarray(args["c0"], np.float64), requires_grad=True)
    T, B, _ = x.shape
    H = h0.shape[1]
    L = [T] * B if lengths is None else list(lengths)
    noise = noise or {}
    nz = {k: torch.tensor(np.asarray(v, np.float64)) for k, v in noise.items()}

    def ln(v, w, b):
        m = v.mean(-1, keepdim=True)
        r = 1.0 / torch.sqrt(((v - m) ** 2).mean(-1, keepdim=True) + EPS)
        vh = (v - m) * r
        return vh * w + b, vh, m[..., 0], r[..., 0]

    h, c = h0, c0
    hs = [None] * (T + 1)
    cs = [None] * (T + 1)
    hs[T if reverse else 0], cs[T if reverse else 0] = h0, c0
    ys, gates, xhats, hhats, stats = [None] * T, [None] * T, [None] * T, [None] * T, [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        act = torch.tensor([t < n for n in L])[:, None]
        xl, xh, mx, rx = ln(x[t] @ P["weight_ih"].T, P["layernorm_x_weight"],
                            P["layernorm_x_bias"])
        hm = h * nz["recurrent"] if "recurrent" in nz else h
        hl, hh, mh, rh = ln(hm @ P["weight_hh"].T, P["layernorm_h_weight"],
                            P["layernorm_h_bias"])
        z = xl + hl
        if bias:
            z = z + P["bias_ih"] + P["bias_hh"]
        i, f = torch.sigmoid(z[:, :H]), torch.sigmoid(z[:, H:2 * H])
        g, o = torch.tanh(z[:, 2 * H:3 * H]), torch.sigmoid(z[:, 3 * H:])
        ct = f * c + i * g
        cl, _, mc, rc = ln(ct, P["layernorm_c_weight"], P["layernorm_c_bias"])
        hn = o * torch.tanh(cl)
        if "zoneout_c" in nz:
            ct = nz["zoneout_c"][t] * c + (1 - nz["zoneout_c"][t]) * ct
        if "zoneout_h" in nz:
            hn = nz["zoneout_h"][t] * h + (1 - nz["zoneout_h"][t]) * hn
        c = torch.where(act, ct, c)
        h = torch.where(act, hn, h)
        ys[t] = torch.where(act, h, torch.zeros_like(h))
        hs[t if reverse else t + 1], cs[t if reverse else t + 1] = h, c
        gates[t] = torch.cat([i, f, g, o], 1)
        xhats[t], hhats[t] = xh, hh
        stats[t] = torch.stack([mx, rx, mh, rh, mc, rc], 1)
    y = torch.stack(ys)
    loss = ((y * torch.tensor(np.asarray(cot["dy"], np.float64))).sum()
            + (h * torch.tensor(np.asarray(cot["dh_n"], np.float64))).sum()
            + (c * torch.tensor(np.asarray(cot["dc_n"], np.float64))).sum())
    loss.backward()
    saved = tuple(torch.stack(a).detach().numpy() for a in (hs, cs, gates, xhats, hhats, stats))
    out = (y.detach().numpy(), h.detach().numpy(), c.detach().numpy(), saved)
    grads = (x.grad.numpy(), h0.grad.numpy(), c0.grad.numpy(),
             {k: v.grad.numpy() for k, v in P.items()})
    return out, grads


def make_case(T, B, I, H, dtype, bias, seed, noise_kinds=()):
    rng = np.random.default_rng(seed)
    rand = normal_draws(rng, dtype)
    params = {name: rand(*shape) for name, shape in LAYER.param_shapes(I, H, bias)}
    for name in params:
        if name.startswith("layernorm_") and name.endswith("_weight"):
            params[name] = (1 + 0.3 * rng.standard_normal(params[name].shape)).astype(dtype)
    args = dict(x=rand(T, B, I), params=params, h0=rand(B, H), c0=rand(B, H))
    cot = dict(dy=rand(T, B, H), dh_n=rand(B, H), dc_n=rand(B, H))
    noise = {}
    if "recurrent" in noise_kinds:
        noise["recurrent"] = (rng.random((B, H)) < 0.7).astype(dtype) / dtype(0.7)
    if "zoneout_h" in noise_kinds:
        noise["zoneout_h"] = (rng.random((T, B, H)) < 0.3).astype(dtype)
    if "zoneout_c" in noise_kinds:
        noise["zoneout_c"] = (rng.random((T, B, H)) < 0.4).astype(dtype)
    if "eval" in noise_kinds:       # evaluation: both zoneout masks filled with p
        noise["zoneout_h"] = np.full((T, B, H), 0.3, dtype)
        noise["zoneout_c"] = np.full((T, B, H), 0.4, dtype)
    return args, cot, noise or None


def forward(rt, args, lengths, reverse, noise, options, need_saved=True):
    return cuda_layernorm.run_forward(rt, args["x"], args["params"], args["h0"], args["c0"],
                                      lengths, reverse, need_saved, noise, options)


def backward(rt, args, saved, lengths, reverse, cot, noise, options):
    return cuda_layernorm.run_backward(rt, args["x"], args["params"], saved, lengths, reverse,
                                       cot["dy"], cot["dh_n"], cot["dc_n"], noise, options)


def numpy_reference(args, lengths, reverse, noise, cot):
    a = (args["x"], args["params"])
    out = NUMPY_REF.layernorm_forward(*a, args["h0"], args["c0"], lengths, reverse, True,
                                      noise=noise)
    grads = NUMPY_REF.layernorm_backward(*a, out[3], lengths, reverse, cot["dy"], cot["dh_n"],
                                         cot["dc_n"], noise=noise)
    return out, grads


def _active_mask(lengths, T, B):
    if lengths is None:
        return np.ones((T, B), bool)
    return np.arange(T)[:, None] < np.asarray(lengths)[None, :]


def assert_matches(out, grads, want, want_grads, dtype, lengths, what="", whole_saved=False):
    tol, gtol = TOL[dtype], GRAD_TOL[dtype]
    for name, a, b in zip(("y", "h_n", "c_n"), out[:3], want[:3]):
        assert a.dtype == np.dtype(dtype), name
        assert_close(a, b, tol, what + name)
    if out[3] is not None and want[3] is not None:
        T, B = out[0].shape[:2]
        act = _active_mask(lengths, T, B)
        assert len(out[3]) == len(want[3]) == 6
        for name, a, b in zip(SAVED, out[3], want[3]):
            assert a.shape == b.shape, name
            if name in ("h", "c") or whole_saved:
                assert_close(a, b, tol, f"{what}saved {name}")
            else:               # per-step values: compared where the step ran
                assert_close(a[act], np.asarray(b)[act], tol, f"{what}saved {name}")
    for name, a, b in zip(("dx", "dh0", "dc0"), grads[:3], want_grads[:3]):
        assert a.dtype == np.dtype(dtype), name
        assert_close(a, b, gtol, what + name)
    assert set(grads[3]) == set(want_grads[3])
    for name in want_grads[3]:
        assert grads[3][name].shape == want_grads[3][name].shape, name
        assert grads[3][name].dtype == np.dtype(dtype), name
        assert_close(grads[3][name], want_grads[3][name], gtol, what + name)
    if lengths is not None:
        assert np.all(out[0][~_active_mask(lengths, *out[0].shape[:2])] == 0), "y at masked"


# ---------------------------------------------------------------- parity

# (T, B, I, H, P or "stepwise", lengths, reverse, bias, dtype, noise, threads, batch_tile)
CASES = [
    (3, 3, 4, 7, 3, [3, 1, 2], False, True, np.float32, (), None, None),          # U 3, 3, 1
    (3, 1, 5, 33, 2, None, True, False, np.float64, ("zoneout_h", "zoneout_c"), None, None),
    (2, 3, 3, 7, 6, [2, 0, 1], True, True, np.float64, ("recurrent",), None, None),  # idle
    (3, 3, 4, 7, 2, [1, 3, 2], False, True, np.float32,
     ("recurrent", "zoneout_h", "zoneout_c"), None, 2),                          # tiles 2+1
    (1, 3, 3, 7, 2, [1, 0, 1], False, False, np.float32, ("eval",), None, None),  # T 1
    (3, 1, 3, 7, 7, None, False, True, np.float64, ("zoneout_c",), 64, None),     # L 32/16
    (3, 3, 4, 33, "stepwise", [3, 1, 2], True, True, np.float32,
     ("recurrent", "zoneout_h"), None, None),
    (2, 1, 3, 7, "stepwise", None, False, False, np.float64, (), None, None),
    (3, 3, 3, 7, "stepwise", [2, 0, 3], False, True, np.float64,
     ("recurrent", "zoneout_h", "zoneout_c"), None, None),
]


def _case_id(c):
    T, B, I, H, P, lengths, reverse, bias, dtype, noise, threads, bt = c
    return (f"T{T}-B{B}-H{H}-{'P%d' % P if P != 'stepwise' else 'stepwise'}"
            f"{'-len' if lengths else ''}{'-rev' if reverse else ''}{'' if bias else '-nobias'}"
            f"{''.join('-' + n for n in noise)}"
            f"{'-threads%d' % threads if threads else ''}{'-tile%d' % bt if bt else ''}"
            f"-{np.dtype(dtype).name}")


def _options(P, threads=None, batch_tile=None):
    opts = {"path": "stepwise"} if P == "stepwise" else {"path": "persistent", "blocks": P}
    if threads:
        opts["threads"] = threads
    if batch_tile:
        opts["batch_tile"] = batch_tile
    return opts


def test_cases_cover_paths_noise_lanes_tiles_and_idle_blocks():
    seen = set()
    for T, B, I, H, P, lengths, reverse, bias, dtype, noise, threads, bt in CASES:
        path = "stepwise" if P == "stepwise" else ("P>1" if P > 1 else "P=1")
        seen |= {(path, "len", bool(lengths)), (path, "rev", reverse), (path, "bias", bias),
                 (path, np.dtype(dtype).name)}
        seen |= {(path, n) for n in noise} | {(path, "noise", bool(noise))}
        seen |= {("H", H), ("B", B)}
        if P != "stepwise":
            U, n, tile = units_per_block(H, P), threads or 32, bt or B
            seen.add(("lanes fwd", lanes_per_output(tile * 4 * U, n) > 1))
            seen.add(("lanes bwd", lanes_per_output(tile * U, n) > 1))
            seen.add(("P divides H", H % P == 0))
            if bt and B % bt:
                seen.add("uneven tiles")
            if P * U - H >= U:
                seen.add("idle block")
    for path in ("P>1", "stepwise"):
        for key in ("len", "rev", "bias", "noise"):
            assert {(path, key, True), (path, key, False)} <= seen, (path, key)
        for dt in ("float32", "float64"):
            assert (path, dt) in seen
        for n in ("recurrent", "zoneout_h", "zoneout_c"):
            assert (path, n) in seen
    assert {("H", 7), ("H", 33), ("B", 1), ("B", 3), ("P divides H", False)} <= seen
    assert {("lanes fwd", True), ("lanes fwd", False), ("lanes bwd", True),
            ("lanes bwd", False), "uneven tiles", "idle block"} <= seen


@pytest.mark.parametrize("T,B,I,H,P,lengths,reverse,bias,dtype,noise_kinds,threads,bt", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_matches_the_reference(request, T, B, I, H, P, lengths, reverse, bias, dtype,
                               noise_kinds, threads, bt):
    seed = zlib.crc32(request.node.callspec.id.encode())
    args, cot, noise = make_case(T, B, I, H, dtype, bias, seed, noise_kinds)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    options = _options(P, threads, bt)
    with launches_logged() as launches, strict.record() as reports:
        out = forward(sim.RUNTIME, args, lengths, reverse, noise, options)
        grads = backward(sim.RUNTIME, args, out[3], lengths, reverse, cot, noise, options)
    assert all(r.findings == [] for r in reports)
    want, want_grads = torch_reference(args, lengths, reverse, noise, cot, bias)
    assert_matches(out, grads, want, want_grads, dtype, lengths, "torch reference: ")
    if NUMPY_REF is not None:
        want, want_grads = numpy_reference(args, lengths, reverse, noise, cot)
        # the same saved values at every step, masked ones included
        assert_matches(out, grads, want, want_grads, dtype, lengths, "numpy_layernorm: ",
                       whole_saved=True)
    kinds = [d["kind"] for d in launches]
    if P == "stepwise":
        assert kinds == (["pointwise_fwd_gates", "pointwise_fwd_out"] * T
                         + ["pointwise_bwd_c", "pointwise_bwd_gates"] * T)
    else:
        # one launch each way, P blocks, two grid barriers a step (2T+1 half-phases each way)
        assert kinds == ["persistent_fwd", "persistent_bwd"]
        assert [(d["blocks"], d["step_range"]) for d in launches] == [(P, (0, 2 * T + 1))] * 2
        assert [(r.grid[0], r.grid_barriers) for r in reports] == [(P, 2 * T), (P, 2 * T)]


@pytest.mark.parametrize("P", [3, "stepwise"])
def test_nan_in_padded_inputs_reaches_no_gradient(P):
    T, B, I, H = 3, 3, 4, 7
    args, cot, noise = make_case(T, B, I, H, np.float32, True, 31, ("zoneout_h", "recurrent"))
    lengths = np.array([3, 1, 0], np.int64)
    clean = nan_padded(args, lengths)
    options = _options(P)
    with strict.record() as reports:
        out = forward(sim.RUNTIME, args, lengths, False, noise, options)
        grads = backward(sim.RUNTIME, args, out[3], lengths, False, cot, noise, options)
    assert all(r.findings == [] for r in reports)
    want, want_grads = torch_reference(clean, lengths, False, noise, cot, True)
    if NUMPY_REF is not None:       # the reference keeps padding's NaN out too
        ref_out, ref_grads = numpy_reference(args, lengths, False, noise, cot)
        for a, b in zip(ref_out[:3] + ref_grads[:3], want[:3] + want_grads[:3]):
            assert_close(a, b, TOL[np.float32])
    assert_close_with_finite_grads(out, grads, want, want_grads, np.float32)


@pytest.mark.parametrize("P", [2, "stepwise"])
def test_inference_forward_keeps_nothing_and_matches(P):
    args, cot, noise = make_case(3, 2, 3, 7, np.float32, True, 32, ("eval",))
    lengths = np.array([3, 2], np.int64)
    y, h_n, c_n, saved = forward(sim.RUNTIME, args, lengths, True, noise, _options(P),
                                 need_saved=False)
    want, _ = torch_reference(args, lengths, True, noise, cot, True)
    assert saved is None
    for name, a, b in zip(("y", "h_n", "c_n"), (y, h_n, c_n), want[:3]):
        assert_close(a, b, TOL[np.float32], name)


@pytest.mark.parametrize("P", [3, "stepwise"])
def test_results_are_deterministic(P):
    args, cot, noise = make_case(3, 3, 4, 7, np.float32, True, 33, ("zoneout_c",))
    lengths = np.array([3, 1, 2], np.int64)
    options = _options(P)
    out = forward(sim.RUNTIME, args, lengths, False, noise, options)
    again = forward(sim.RUNTIME, args, lengths, False, noise, options)
    for a, b in zip(out[:3] + out[3], again[:3] + again[3]):
        assert np.array_equal(a, b)
    first = backward(sim.RUNTIME, args, out[3], lengths, False, cot, noise, options)
    second = backward(sim.RUNTIME, args, out[3], lengths, False, cot, noise, options)
    for a, b in zip(first[:3], second[:3]):
        assert np.array_equal(a, b)
    for name in first[3]:
        assert np.array_equal(first[3][name], second[3][name]), name


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_persistent_kernels_read_w_hh_once_per_launch(direction):
    # persistence, measured: every element of W_hh is loaded from global memory once per
    # launch, however many steps it runs; nothing writes it
    for T in (2, 5):
        args, cot, noise = make_case(T, 2, 3, 7, np.float32, True, 36)
        opts = {"path": "persistent", "blocks": 3}
        with strict.record() as reports:
            out = forward(sim.RUNTIME, args, None, False, noise, opts)
            if direction == "bwd":
                backward(sim.RUNTIME, args, out[3], None, False, cot, noise, opts)
        report = [r for r in reports if r.kernel == f"layernorm_lstm_persistent_{direction}_f32"]
        assert len(report) == 1 and report[0].grid == (3, 1, 1)
        reads = report[0].traffic["w_hh"].reads
        assert reads.shape == args["params"]["weight_hh"].shape
        assert (reads == 1).all(), reads
        assert report[0].traffic["w_hh"].total_writes == 0


def test_the_saved_tuple_of_either_path_feeds_the_other():
    args, cot, noise = make_case(3, 3, 4, 7, np.float64, True, 37, ("recurrent", "zoneout_c"))
    lengths = np.array([2, 3, 1], np.int64)
    pers = forward(sim.RUNTIME, args, lengths, True, noise, _options(2))
    step = forward(sim.RUNTIME, args, lengths, True, noise, _options("stepwise"))
    g1 = backward(sim.RUNTIME, args, step[3], lengths, True, cot, noise, _options(3))
    g2 = backward(sim.RUNTIME, args, pers[3], lengths, True, cot, noise, _options("stepwise"))
    for a, b in zip(g1[:3], g2[:3]):
        assert_close(a, b, GRAD_TOL[np.float64])
    for name in g1[3]:
        assert_close(g1[3][name], g2[3][name], GRAD_TOL[np.float64], name)


@pytest.mark.skipif(NUMPY_REF is None, reason="gpurnn.backends.numpy_layernorm not there yet")
@pytest.mark.parametrize("P", [3, "stepwise"])
def test_the_numpy_references_saved_tuple_feeds_the_kernels_backward(P):
    args, cot, noise = make_case(3, 3, 4, 7, np.float64, False, 38, ("recurrent", "zoneout_h"))
    lengths = np.array([3, 0, 2], np.int64)
    want, want_grads = numpy_reference(args, lengths, True, noise, cot)
    with strict.record() as reports:
        grads = backward(sim.RUNTIME, args, want[3], lengths, True, cot, noise, _options(P))
    assert all(r.findings == [] for r in reports)
    for name, a, b in zip(("dx", "dh0", "dc0"), grads[:3], want_grads[:3]):
        assert_close(a, b, GRAD_TOL[np.float64], name)
    assert set(grads[3]) == set(want_grads[3])
    for name in want_grads[3]:
        assert_close(grads[3][name], want_grads[3][name], GRAD_TOL[np.float64], name)


@pytest.mark.skipif(not hasattr(sim, "layernorm_forward"),
                    reason="gpurnn.backends.sim.layernorm_forward not there yet")
def test_the_sim_backends_entry_points_dispatch_here():
    # gpurnn.backends.sim.layernorm_forward / layernorm_backward (the contract's entry points)
    # reach cuda_layernorm's kernels with the options split as the sim backend splits them
    args, cot, noise = make_case(2, 2, 3, 7, np.float64, True, 34, ("zoneout_h", "recurrent"))
    opts = {"simulator": "strict", "path": "persistent", "blocks": 2}
    with launches_logged() as launches:
        out = sim.layernorm_forward(args["x"], args["params"], args["h0"], args["c0"], None,
                                    False, True, noise=noise, options=opts)
        grads = sim.layernorm_backward(args["x"], args["params"], out[3], None, False,
                                       cot["dy"], cot["dh_n"], cot["dc_n"], noise=noise,
                                       options=opts)
    assert [d["name"] for d in launches] == ["layernorm_lstm_persistent_fwd_f64",
                                             "layernorm_lstm_persistent_bwd_f64"]
    want, want_grads = torch_reference(args, None, False, noise, cot, True)
    assert_matches(out, grads, want, want_grads, np.float64, None)


@pytest.mark.parametrize("P", [2, "stepwise"])
def test_no_steps_hands_the_states_and_cotangents_through(P):
    args, cot, _ = make_case(0, 2, 3, 7, np.float64, True, 39)
    out = forward(sim.RUNTIME, args, None, False, None, _options(P))
    grads = backward(sim.RUNTIME, args, out[3], None, False, cot, None, _options(P))
    assert out[0].shape == (0, 2, 7)
    assert np.array_equal(out[1], args["h0"]) and np.array_equal(out[2], args["c0"])
    assert np.array_equal(grads[1], cot["dh_n"]) and np.array_equal(grads[2], cot["dc_n"])
    assert grads[0].shape == (0, 2, 3)
    assert all(not g.any() for g in grads[3].values())


def test_bad_noise_and_a_grid_the_plan_cannot_run_are_refused_before_launch():
    args, _, _ = make_case(2, 1, 3, 7, np.float32, True, 35)
    with pytest.raises(ValueError, match=r"options\['blocks'\]=100000: the persistent path cannot "
                                         r"run layernorm_lstm .*cannot be co-resident"):
        forward(sim.RUNTIME, args, None, False, None, {"path": "persistent", "blocks": 100000})
    with pytest.raises(ValueError, match="unknown keys"):
        forward(sim.RUNTIME, args, None, False, {"zoneout": np.zeros((2, 1, 7), np.float32)},
                _options(2))
    with pytest.raises(ValueError, match=r"noise\['recurrent'\] must have shape \(1, 7\)"):
        forward(sim.RUNTIME, args, None, False, {"recurrent": np.ones((2, 7), np.float32)},
                _options(2))


# ---------------------------------------------------------------- mutants

SOURCE, LINES, BARRIER_LINES = kernel_source(kernels)
# (T, B, H, P, threads, batch_tile): tiles with L = 1 and L > 1 forward and backward, one-unit
# blocks at 16-32 lanes, idle blocks
MUTANT_CASES = [
    (3, 3, 7, 2, 32, 2),       # U 4, tiles 2+1: forward L 1, backward L 4
    (3, 3, 33, 1, 32, 2),      # tiles with L 1 everywhere
    (3, 3, 7, 7, 64, 2),       # U 1, tiles 2+1: forward L 8, backward L 32
    (3, 1, 7, 7, 64, None),    # U 1: forward L 16, backward L 32
    (2, 3, 7, 6, 32, None),    # blocks 4 and 5 own no unit
]


def test_the_source_has_the_barriers_the_docstring_promises():
    kinds = barrier_kinds(LINES, BARRIER_LINES)
    assert kinds.count("_grid_group_sync(grid)") == 2          # one per persistent kernel
    # forward: phase 1 tail between tiles, row stats, staging, scratch, pre; phase 2 row stats,
    # c~; grid. backward: phase A between tiles, row means, staging, scratch, cp; phase B row
    # means, cp; grid.
    assert barriers_before_and_after(LINES, BARRIER_LINES, "def make_bwd") == (7 + 1, 7 + 1)


def mutant_runtime(source, tag):
    """The strict sim backend with the LayerNormLSTM kernels taken from `source` rebuilt as a
    module."""
    return MutantRuntime(mutant_module(source, tag, kernels, "layernorm"),
                         lambda spec: spec.cell == kernels.CELL,
                         lambda module, spec: module._FACTORIES[spec.kind](spec.dtype))


def _run_mutant_case(rt, case, seed):
    T, B, H, P, threads, bt = case
    args, cot, noise = make_case(T, B, 3, H, np.float32, True, seed,
                                 ("recurrent", "zoneout_h", "zoneout_c") if seed % 2 else ())
    lengths = staggered_lengths(T, B)
    options = _options(P, threads, bt)
    out = forward(rt, args, lengths, False, noise, options)
    grads = backward(rt, args, out[3], lengths, False, cot, noise, options)
    want, want_grads = torch_reference(args, lengths, False, noise, cot, True)
    pairs = [("y", out[0], want[0]), ("c_n", out[2], want[2]), ("dx", grads[0], want_grads[0]),
             ("dh0", grads[1], want_grads[1]), ("dc0", grads[2], want_grads[2])]
    pairs += [(n, grads[3][n], want_grads[3][n]) for n in PARAMS]
    return first_difference(pairs)


def caught_by(source, tag):
    rt = mutant_runtime(source, tag)
    return first_catch(MUTANT_CASES, lambda n, case: _run_mutant_case(rt, case, seed=n))


# the unmutated source passes every case; deleting any one barrier is caught; an idle block
# returning early is caught as a hang
(test_unmutated_source_passes_every_mutant_case, test_deleting_any_barrier_is_caught,
 test_idle_blocks_returning_early_is_caught) = mutation_tests(
    caught_by, SOURCE, LINES, BARRIER_LINES, "layernorm.py", "u0, nu = _owned_units(units, H)",
    "nu == 0")


STOCK_SCRIPT = """
import numpy as np
from gpurnn.backends import sim
sim.enable_stock_simulator()        # before numba.cuda is first imported (by the kernels)
from gpurnn.backends import cuda_layernorm, numpy_layernorm as ref
from gpurnn.layernorm import LayerNormLSTMLayer
from gpurnn.testing import rel_err
rng = np.random.default_rng(3)
T, B, I, H = 3, 2, 3, 7
r = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float32)
params = {n: r(*s) for n, s in LayerNormLSTMLayer().param_shapes(I, H, True)}
x, h0, c0, dy, dhn, dcn = r(T, B, I), r(B, H), r(B, H), r(T, B, H), r(B, H), r(B, H)
noise = {"zoneout_h": (rng.random((T, B, H)) < 0.3).astype(np.float32),
         "recurrent": (rng.random((B, H)) < 0.7).astype(np.float32) / np.float32(0.7)}
log = []
sim.RUNTIME.launch_hook = log.append
L = np.array([3, 2])
opts = {"path": "persistent", "blocks": 3}
rt = sim.STOCK_RUNTIME
out = cuda_layernorm.run_forward(rt, x, params, h0, c0, L, True, True, noise, opts)
g = cuda_layernorm.run_backward(rt, x, params, out[3], L, True, dy, dhn, dcn, noise, opts)
want = ref.layernorm_forward(x, params, h0, c0, L, True, True, noise=noise)
gw = ref.layernorm_backward(x, params, want[3], L, True, dy, dhn, dcn, noise=noise)
errs = [rel_err(a, b) for a, b in zip(out[:3] + g[:3], want[:3] + gw[:3])]
errs += [rel_err(g[3][n], gw[3][n]) for n in gw[3]]
assert max(errs) < 1e-5, errs
fwd = [d["step_range"] for d in log if d["kind"] == "persistent_fwd"]
bwd = [d["step_range"] for d in log if d["kind"] == "persistent_bwd"]
assert fwd == [(q, q + 1) for q in range(2 * T + 1)], fwd
assert bwd == [(q, q + 1) for q in range(2 * T + 1)], bwd
assert {d["simulator"] for d in log} == {"stock"}
print("STOCK-OK", max(errs))
"""


@pytest.mark.skipif(NUMPY_REF is None, reason="gpurnn.backends.numpy_layernorm not there yet")
def test_stock_simulator_launches_once_per_half_phase_in_a_fresh_process():
    # Numba's own simulator: its grid.sync() only synchronises a block, so with P > 1 the host
    # launches each half-phase on its own (everything a phase hands on is in global memory)
    r = run_fresh(STOCK_SCRIPT, timeout=300)
    assert r.returncode == 0 and "STOCK-OK" in r.stdout, r.stdout + r.stderr
