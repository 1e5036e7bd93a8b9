"""The mLSTM layer wavefront (gpurnn/kernels/wavefront_mlstm.py, host
gpurnn/backends/cuda_wavefront_mlstm.py, plan gpurnn/planning/wavefront_mlstm.py): a stack of
multiplicative LSTM layers in one persistent launch each way.

In gpurnn's strict simulator (every block at once, a real grid barrier, race and bounds checks),
with P > 1 blocks per layer in ONE launch and zero findings, the wavefront is compared with the
per-layer persistent mLSTM launches (gpurnn.backends.cuda_mlstm, {"path": "persistent"} with the
same blocks per layer, threads and batch tile, so every dot product is split and summed in the
same order):
  * bit for bit (np.array_equal), layer by layer, given the same inputs: layer 0 end to end;
    each layer l > 0's recurrence (h, c, gates, y, the saved mx, mh) fed the gx and mx the
    wavefront formed; each layer's backward (dh0, dc0, every weight gradient; the stack's dx)
    fed the dy the wavefront formed (the top layer: the caller's dy);
  * within gpurnn.testing's TOL / GRAD_TOL where bit identity is not possible: a layer's input
    products and a lower layer's dy are one dot product per element in the kernel but a BLAS
    GEMM per layer, so the chained per-layer stack differs from layer 1 on in the last bits.
Sizes are awkward (H 7 and 9, B 1 and 3, T 3 and 4, L 1 to 3, blocks that own no unit, batch
tiles, dot products over 1 to 16 lanes), lengths with a 0 and a full row. Also: NaN padding,
the grid barriers per launch (2T+2L-3 forward, 2T+2L-2 backward) counted by the simulator, each
weight read once per launch, static compilation for sm_80 and sm_90 with no spills, each barrier
deleted in turn caught, an idle block's early return caught, the stock simulator, the plan.
"""
import zlib

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import cuda as host
from gpurnn.backends import cuda_mlstm
from gpurnn.backends import cuda_wavefront_mlstm as wf
from gpurnn.backends import sim
from gpurnn.kernels import mlstm as layer_kernels
from gpurnn.kernels import wavefront_mlstm as kernels
from gpurnn.kernels.layout import lanes_per_output, units_per_block
from gpurnn.planning import wavefront as lstm_wavefront
from gpurnn.planning import wavefront_mlstm as planning
from gpurnn.testing import GRAD_TOL, TOL, assert_close
from gpurnn.variants import LSTMForm

from simtools import (MutantRuntime, anchor_hits, barrier_kinds, barriers_before_and_after,
                      compile_errors, compile_rows, compiled_pairs, first_catch, kernel_source,
                      mutant_module, mutation_tests, nan_padded, needs_ptxas, normal_draws,
                      run_fresh, spilled, staggered_lengths, wanted_pairs, with_return)

RT = sim.RUNTIME
FORM = LSTMForm(multiplicative=True)
SAVED = ("h", "c", "gates", "mx", "mh")
WEIGHTS = ("w_mh", "w_hh", "w_mx", "w_ih")


# ---------------------------------------------------------------- cases

def make_case(T, B, I, H, L, dtype, bias, seed):
    rand = normal_draws(np.random.default_rng(seed), dtype)
    layers = [{n: rand(*s) for n, s in FORM.param_shapes(I if l == 0 else H, H, bias)}
              for l in range(L)]
    args = dict(x=rand(T, B, I), layers=layers, h0=rand(L, B, H), c0=rand(L, B, H))
    cot = dict(dy=rand(T, B, H), dh_n=rand(L, B, H), dc_n=rand(L, B, H))
    return args, cot


def _options(P, threads, bt):
    opts = {"blocks": P, "threads": threads}
    if bt:
        opts["batch_tile"] = bt
    return opts


def _layer_options(P, threads, bt, B):
    # the per-layer launch with the same grid, threads and tile (so the same lane split)
    return {"path": "persistent", "blocks": P, "threads": threads, "batch_tile": bt or B}


# (T, B, I, H, L, P, threads, batch_tile, lengths, bias, dtype)
CASES = [
    (4, 3, 4, 7, 2, 2, 32, None, [4, 0, 2], True, np.float32),     # U 4: lanes 2 / 1 / 2
    (3, 3, 5, 9, 3, 3, 32, 2, [3, 1, 0], False, np.float64),       # tiles 2+1, no bias
    (3, 1, 3, 7, 2, 6, 32, None, None, True, np.float32),          # B 1, blocks 4, 5 idle
    (4, 3, 3, 9, 2, 2, 32, 1, [0, 4, 3], True, np.float64),        # tiles of 1
    (3, 3, 4, 7, 2, 7, 64, None, [2, 3, 0], True, np.float32),     # U 1: lanes 16 / 4 / 16
    (3, 3, 4, 7, 1, 2, 32, 2, [3, 0, 1], True, np.float32),        # L 1: the per-layer kernel
]


def _case_id(c):
    T, B, I, H, L, P, threads, bt, lengths, bias, dtype = c
    return (f"T{T}-B{B}-H{H}-L{L}-P{P}-t{threads}{'-tile%d' % bt if bt else ''}"
            f"{'-len' if lengths else ''}{'' if bias else '-nobias'}-{np.dtype(dtype).name}")


def test_cases_cover_what_the_docstring_promises():
    lanes, dtypes, Ls, Bs = set(), set(), set(), set()
    idle = tiles = zero = full = nobias = 0
    for T, B, I, H, L, P, threads, bt, lengths, bias, dtype in CASES:
        U, tile = units_per_block(H, P), bt or B
        lanes |= {lanes_per_output(tile * U, threads), lanes_per_output(tile * 4 * U, threads)}
        idle += P * U - H >= U
        tiles += tile < B
        assert P > 1 and 3 <= T <= 4 and H in (7, 9)
        Ls.add(L)
        Bs.add(B)
        dtypes.add(np.dtype(dtype).name)
        nobias += not bias
        if lengths:
            zero += 0 in lengths
            full += T in lengths
    assert 1 in lanes and max(lanes) >= 16
    assert idle and tiles and zero and full and nobias
    assert dtypes == {"float32", "float64"} and Ls == {1, 2, 3} and Bs == {1, 3}


def _per_layer_forward_fed(args, l, gx_l, mx_l, lengths, P, threads, bt):
    """Layer l's per-layer persistent mLSTM forward kernel (cuda_mlstm's launch) fed the input
    products gx_l, mx_l the wavefront formed: {saved name: array} and y."""
    x, p = args["x"], args["layers"][l]
    T, B, _ = x.shape
    H = p["weight_mh"].shape[0]
    dt = x.dtype
    dtype = np.dtype(dt).name
    cfg = cuda_mlstm.choose_launch(H, H, B, dtype, RT.device, _layer_options(P, threads, bt, B),
                                   RT.name)
    h = np.empty((T + 1, B, H), dt)
    c = np.empty((T + 1, B, H), dt)
    h[0], c[0] = args["h0"][l], args["c0"][l]
    gates = np.empty((T, B, 4 * H), dt)
    y = np.empty((T, B, H), dt)
    mh = np.empty((T, B, H), dt)
    m = np.empty((B, H), dt)
    mx = np.ascontiguousarray(mx_l)
    U, tile = cfg.units_per_block, cfg.batch_tile
    smem = layer_kernels.smem_bytes("fwd", H, tile, U, dtype, threads=cfg.threads)
    cuda_mlstm._launch_persistent(
        RT, "persistent_fwd", dtype, cfg, smem,
        (np.ascontiguousarray(gx_l), mx, np.ascontiguousarray(p["weight_mh"]),
         np.ascontiguousarray(p["weight_hh"]), np.zeros(1, dt), h, c, gates, y, mh, m,
         host._kernel_lengths(np, lengths, T, B), 0, 0, 2 * T, U, 1, tile), (0, 2 * T))
    return dict(zip(SAVED, (h, c, gates, mx, mh))), y


def _chain(args, cot, lengths, opts):
    """The per-layer stack end to end: forward layer by layer (y of one is x of the next), then
    backward from the top (dx of one is dy of the one below)."""
    L = len(args["layers"])
    inp, outs = args["x"], []
    for l, p in enumerate(args["layers"]):
        outs.append(cuda_mlstm.run_forward(RT, FORM, inp, p, args["h0"][l], args["c0"][l],
                                           lengths, False, True, opts))
        inp = outs[-1][0]
    dy, grads = cot["dy"], [None] * L
    for l in range(L - 1, -1, -1):
        x_l = args["x"] if l == 0 else outs[l - 1][0]
        grads[l] = cuda_mlstm.run_backward(RT, FORM, x_l, args["layers"][l], outs[l][3], lengths,
                                           False, dy, cot["dh_n"][l], cot["dc_n"][l], opts)
        dy = grads[l][0]
    return outs, grads


@pytest.mark.parametrize("T,B,I,H,L,P,threads,bt,lengths,bias,dtype", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_wavefront_equals_the_per_layer_launches(request, T, B, I, H, L, P, threads, bt,
                                                 lengths, bias, dtype):
    seed = zlib.crc32(request.node.callspec.id.encode())
    args, cot = make_case(T, B, I, H, L, dtype, bias, seed)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    opts = _options(P, threads, bt)
    launches = []
    RT.launch_hook = launches.append
    try:
        with strict.record() as reports:
            st = wf._stack_forward(RT, "mlstm", args["x"], args["layers"], args["h0"],
                                   args["c0"], lengths, True, opts)
            out = wf._forward_results(np, st, args["x"], L, True)
            saved = (out[3], out[4])
            bst = wf._stack_backward(RT, "mlstm", args["x"], args["layers"], saved, lengths,
                                     cot["dy"], cot["dh_n"], cot["dc_n"], opts)
            grads = wf._backward_results(np, bst, args["x"], args["layers"], saved, lengths)
    finally:
        RT.launch_hook = None
    # one launch each way, L*P blocks, two grid barriers a stage, zero findings
    assert all(r.findings == [] for r in reports)
    assert [d["kind"] for d in launches] == ["wavefront_fwd", "wavefront_bwd"]
    assert {(d["blocks"], d["threads"]) for d in launches} == {(L * P, threads)}
    assert [d["step_range"] for d in launches] == [(0, 2 * (T + L - 1)), (0, 2 * (T + L) - 1)]
    assert [(r.grid[0], r.grid_barriers) for r in reports] == (
        [(L * P, 2 * T + 2 * L - 3), (L * P, 2 * T + 2 * L - 2)])
    # persistence: every weight element is loaded from global memory once per launch
    for r in reports:
        for name in WEIGHTS:
            if L == 1 and name in ("w_mx", "w_ih"):
                continue
            assert (r.traffic[name].reads == 1).all(), (r.kernel, name)
            assert r.traffic[name].total_writes == 0

    y, h_n, c_n, reserves, outputs = out
    sdt = np.dtype(dtype)
    assert y.dtype == sdt and h_n.shape == c_n.shape == (L, B, H) and len(reserves) == L
    assert np.array_equal(y, outputs[-1])
    masked = (None if lengths is None
              else np.arange(T)[:, None] >= np.asarray(lengths)[None, :])

    # ---- forward, bit for bit, layer by layer
    opts_l = _layer_options(P, threads, bt, B)
    chain, chain_grads = _chain(args, cot, lengths, opts_l)
    for l in range(L):
        assert [a.shape for a in reserves[l]] == [(T + 1, B, H), (T + 1, B, H), (T, B, 4 * H),
                                                  (T, B, H), (T, B, H)]
        if l == 0:
            want_y, want_hn, want_cn, want_saved = chain[0]
            assert np.array_equal(outputs[0], want_y), "layer 0 y"
            assert np.array_equal(h_n[0], want_hn) and np.array_equal(c_n[0], want_cn)
            for name, a, b in zip(SAVED, reserves[0], want_saved):
                assert np.array_equal(a, b), f"layer 0 saved {name}"
        else:
            # the input products: a dot product here, a BLAS GEMM per layer (TOL)
            p = args["layers"][l]
            gx_l, mx_l = st.gx[:, l * B:(l + 1) * B], st.mx[:, l * B:(l + 1) * B]
            y64 = outputs[l - 1].astype(np.float64)
            gemm = y64 @ p["weight_ih"].T.astype(np.float64)
            if bias:
                gemm = gemm + p["bias_ih"] + p["bias_hh"]
            assert_close(gx_l, gemm, TOL[dtype], f"layer {l} gx")
            assert_close(mx_l, y64 @ p["weight_mx"].T.astype(np.float64), TOL[dtype],
                         f"layer {l} mx")
            fed, yl = _per_layer_forward_fed(args, l, gx_l, mx_l, lengths, P, threads, bt)
            assert np.array_equal(outputs[l], yl), f"layer {l} y"
            for name, a in zip(SAVED, reserves[l]):
                assert np.array_equal(a, fed[name]), f"layer {l} saved {name}"
            assert np.array_equal(h_n[l], fed["h"][T]) and np.array_equal(c_n[l], fed["c"][T])
        if masked is not None:
            assert np.all(outputs[l][masked] == 0), f"layer {l}: y must be 0 at masked steps"
    # the chained per-layer stack, end to end (differs from layer 1 on in the last bits)
    assert_close(y, chain[-1][0], TOL[dtype], "y vs the per-layer stack")
    assert_close(h_n, np.stack([c_[1] for c_ in chain]), TOL[dtype], "h_n")
    assert_close(c_n, np.stack([c_[2] for c_ in chain]), TOL[dtype], "c_n")

    # ---- backward, bit for bit, layer by layer (each fed the dy the wavefront formed)
    dx, dh0, dc0, wgrads = grads
    assert dx.dtype == sdt and dh0.shape == dc0.shape == (L, B, H) and len(wgrads) == L
    names = {"weight_ih", "weight_hh", "weight_mx", "weight_mh"} | (
        {"bias_ih", "bias_hh"} if bias else set())
    for l in range(L - 1, -1, -1):
        dy_l = bst.dy[:, l * B:(l + 1) * B]
        if l == L - 1:
            assert np.array_equal(dy_l, cot["dy"])
        x_l = args["x"] if l == 0 else outputs[l - 1]
        g_dx, g_dh0, g_dc0, want = cuda_mlstm.run_backward(
            RT, FORM, x_l, args["layers"][l], reserves[l], lengths, False,
            np.ascontiguousarray(dy_l), cot["dh_n"][l], cot["dc_n"][l], opts_l)
        assert np.array_equal(dh0[l], g_dh0), f"layer {l} dh0"
        assert np.array_equal(dc0[l], g_dc0), f"layer {l} dc0"
        assert set(wgrads[l]) == set(want) == names
        for name in want:
            assert wgrads[l][name].dtype == sdt
            assert np.array_equal(wgrads[l][name], want[name]), f"layer {l} {name}"
        if l == 0:
            assert np.array_equal(dx, g_dx), "dx"
        else:
            # the lower layer's dy: a dot product here, two GEMMs per layer (GRAD_TOL)
            assert_close(bst.dy[:, (l - 1) * B:l * B], g_dx, GRAD_TOL[dtype], f"layer {l} dx")
    # the chained per-layer stack's gradients, end to end
    gtol = GRAD_TOL[dtype]
    assert_close(dx, chain_grads[0][0], gtol, "dx vs the per-layer stack")
    assert_close(dh0, np.stack([g[1] for g in chain_grads]), gtol, "dh0")
    assert_close(dc0, np.stack([g[2] for g in chain_grads]), gtol, "dc0")
    for l in range(L):
        for name, want in chain_grads[l][3].items():
            assert_close(wgrads[l][name], want, gtol, f"layer {l} {name} vs the per-layer stack")


def test_inference_none_states_and_none_cotangents():
    # inference keeps nothing and gives training's bits; None states are zeros; None
    # cotangents give zero gradients
    args, cot = make_case(3, 2, 4, 7, 2, np.float32, True, 5)
    lengths = np.array([3, 1])
    opts = _options(2, 32, None)
    a = (RT, "mlstm", args["x"], args["layers"])
    train = wf.run_stack_forward(*a, args["h0"], args["c0"], lengths, True, opts)
    infer = wf.run_stack_forward(*a, args["h0"], args["c0"], lengths, False, opts)
    assert infer[3] is None
    assert all(np.array_equal(g, w) for g, w in zip(infer[:3], train[:3]))
    z = np.zeros_like(args["h0"])
    assert all(np.array_equal(g, w) for g, w in zip(
        wf.run_stack_forward(*a, None, None, lengths, False, opts)[:3],
        wf.run_stack_forward(*a, z, z, lengths, False, opts)[:3]))
    zeros = wf.run_stack_backward(*a, (train[3], train[4]), lengths, None, None, None, opts)
    assert not zeros[0].any() and not zeros[1].any() and not zeros[2].any()
    assert not any(g[n].any() for g in zeros[3] for n in g)


def test_nan_in_padded_inputs_reaches_nothing():
    # a NaN in x past a sequence's length (padding) changes no output and no gradient
    args, cot = make_case(3, 3, 4, 7, 2, np.float32, True, 7)
    lengths = np.array([3, 1, 0], np.int64)
    clean = nan_padded(args, lengths)
    opts = _options(2, 32, None)

    def run(a):
        out = wf.run_stack_forward(RT, "mlstm", a["x"], a["layers"], a["h0"], a["c0"], lengths,
                                   True, opts)
        g = wf.run_stack_backward(RT, "mlstm", a["x"], a["layers"], (out[3], out[4]), lengths,
                                  cot["dy"], cot["dh_n"], cot["dc_n"], opts)
        return list(out[:3]) + list(g[:3]) + [d[n] for d in g[3] for n in sorted(d)]
    with strict.record() as reports:
        got = run(args)
    assert all(r.findings == [] for r in reports)
    want = run(clean)
    for a, b in zip(got, want):
        assert np.all(np.isfinite(a)) and np.array_equal(a, b)


def test_bad_inputs_are_refused():
    args, _ = make_case(3, 2, 4, 7, 2, np.float32, True, 8)
    x, layers = args["x"], args["layers"]
    rest = (args["h0"], args["c0"], None, True)
    with pytest.raises(ValueError, match="cannot be co-resident"):
        wf.run_stack_forward(RT, "mlstm", x, layers, *rest, {"blocks": 100000, "threads": 32})
    with pytest.raises(ValueError, match="one persistent launch"):
        wf.run_stack_forward(RT, "mlstm", x, layers, *rest, {"path": "stepwise"})
    with pytest.raises(ValueError, match="the mLSTM wavefront runs"):
        wf.run_stack_forward(RT, "lstm", x, layers, *rest, None)
    with pytest.raises(ValueError, match="layers must hold"):
        wf.run_stack_forward(RT, "mlstm", x, [], *rest, None)
    no_mx = [layers[0], {k: v for k, v in layers[1].items() if k != "weight_mx"}]
    with pytest.raises(ValueError, match=r"layer 1: mlstm needs \['weight_mx'\]"):
        wf.run_stack_forward(RT, "mlstm", x, no_mx, *rest, None)
    wide = [layers[0], {**layers[1], "weight_mh": np.zeros((9, 9), np.float32)}]
    with pytest.raises(ValueError, match="layer 1: .*one hidden size H=7"):
        wf.run_stack_forward(RT, "mlstm", x, wide, *rest, None)
    half = [layers[0], {k: v for k, v in layers[1].items() if k != "bias_hh"}]
    with pytest.raises(ValueError, match="layer 1: bias_ih and bias_hh go together"):
        wf.run_stack_forward(RT, "mlstm", x, half, *rest, None)
    with pytest.raises(ValueError, match="saved must be"):
        wf.run_stack_backward(RT, "mlstm", x, layers, (None, None), None, None, None, None, None)


STOCK_SCRIPT = """
import os
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"     # before numba.cuda's first import
import numpy as np
from gpurnn.backends import sim, cuda_wavefront_mlstm as wf
from gpurnn.variants import LSTMForm
form = LSTMForm(multiplicative=True)
rng = np.random.default_rng(3)
T, B, I, H, L = 3, 2, 3, 7, 2
r = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float64)
layers = [{n: r(*s) for n, s in form.param_shapes(I if l == 0 else H, H, True)} for l in range(L)]
x, h0, c0, dy, dhn, dcn = r(T, B, I), r(L, B, H), r(L, B, H), r(T, B, H), r(L, B, H), r(L, B, H)
lengths = np.array([3, 1])
opts = {"blocks": 2, "threads": 32}
log = []
sim.STOCK_RUNTIME.launch_hook = log.append
sim.RUNTIME.launch_hook = log.append
out = wf.run_stack_forward(sim.STOCK_RUNTIME, "mlstm", x, layers, h0, c0, lengths, True, opts)
g = wf.run_stack_backward(sim.STOCK_RUNTIME, "mlstm", x, layers, (out[3], out[4]), lengths, dy,
                          dhn, dcn, opts)
ref = wf.run_stack_forward(sim.RUNTIME, "mlstm", x, layers, h0, c0, lengths, True, opts)
gr = wf.run_stack_backward(sim.RUNTIME, "mlstm", x, layers, (ref[3], ref[4]), lengths, dy, dhn,
                           dcn, opts)
# float64: the stock simulator's float64 math is the strict one's
assert all(np.allclose(a, b, rtol=1e-12, atol=1e-13) for a, b in zip(out[:3], ref[:3]))
assert all(np.allclose(a, b, rtol=1e-12, atol=1e-13) for a, b in zip(g[:3], gr[:3]))
assert all(np.allclose(a[n], b[n], rtol=1e-12, atol=1e-13) for a, b in zip(g[3], gr[3]) for n in a)
stock = [d for d in log if d["simulator"] == "stock"]
fwd = [d["step_range"] for d in stock if d["kind"] == "wavefront_fwd"]
bwd = [d["step_range"] for d in stock if d["kind"] == "wavefront_bwd"]
assert fwd == [(q, q + 1) for q in range(2 * (T + L - 1))], fwd
assert bwd == [(q, q + 1) for q in range(2 * (T + L) - 1)], bwd
print("STOCK-OK")
"""


def test_stock_simulator_launches_once_per_half_stage_in_a_fresh_process():
    # Numba's own simulator: its grid.sync() only synchronises a block, so the host launches
    # each half-stage on its own (the launch boundary is the grid barrier)
    r = run_fresh(STOCK_SCRIPT, timeout=240)
    assert r.returncode == 0 and "STOCK-OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- the plan

def test_fit_uses_the_kernels_smem_model():
    f = planning.fit("mlstm", 512, 8, 2, "float32", "H100")
    assert f.fits and f.blocks <= f.coop
    assert f.units == units_per_block(512, f.blocks_per_layer)
    assert f.smem_fwd == kernels.smem_bytes("fwd", 512, f.batch_tile, f.units, "float32",
                                            threads=f.threads)
    assert f.smem_bwd == kernels.smem_bytes("bwd", 512, f.batch_tile, f.units, "float32",
                                            threads=f.threads)
    assert f.smem <= f.device.smem_per_block_optin
    # 5 H^2 weights a layer against the LSTM's 4 H^2: below the plain LSTM wavefront's capacity
    c2 = planning.capacity(2, "float32", "H100")
    assert 0 < planning.capacity(4, "float32", "H100") < c2 < lstm_wavefront.capacity(
        "lstm", 2, "float32", "H100")
    assert planning.fit("mlstm", c2, 1, 2, "float32", "H100").fits
    assert not planning.fit("mlstm", c2 + 1, 1, 2, "float32", "H100").fits
    with pytest.raises(ValueError, match="cell must be 'mlstm'"):
        planning.fit("lstm", 64, 1, 2)


def test_smem_regions_hold_every_weight_slice():
    for H, bt, U, threads in ((7, 3, 4, 32), (9, 2, 3, 32), (7, 1, 1, 64)):
        wf_, rf = kernels.smem_regions("fwd", H, bt, U, threads)
        wb, rb = kernels.smem_regions("bwd", H, bt, U, threads)
        assert 2 * 5 * U * H <= wf_ < 2 * 5 * U * (H + 32)
        assert 2 * 5 * U * H <= wb < U * (10 * H + 96)
        assert rf == 2 * bt * H + bt * 4 * U + 2 * threads and rb == bt * 9 * H + 2 * threads


def test_fit_refuses_blocks_that_leave_too_few_registers():
    f = planning.fit("mlstm", 64, 1, 2, "float32", "H100", threads=512)
    assert not f.fits and any("registers per thread" in r for r in f.reasons), f.reasons
    assert planning.fit("mlstm", 64, 1, 2, "float32", "H100", threads=256).fits


def test_choose_says_which_and_why():
    c = planning.choose("mlstm", 256, 256, 1, 4, 128, "float32", "H100")
    assert c.wavefront_s and c.per_layer_s and any("model (unmeasured)" in r for r in c.reasons)
    assert (c.choice == "wavefront") == (c.wavefront_s[1] < c.per_layer_s[1])
    assert c.choice == "wavefront"      # small batch, many layers: T+L-1 stages against L*T
    assert planning.choose("mlstm", 256, 256, 1, 4, 128, "float32", "H100",
                           dropout=0.1).choice == "per_layer"
    big = planning.choose("mlstm", 4096, 4096, 8, 4, 128, "float32", "H100")
    assert big.choice == "per_layer" and big.wavefront_s is None and not big.fit.fits
    s = planning.choose("mlstm", 4, 7, 3, 2, 4, "float32", "sim")
    assert s.choice == "wavefront" and s.wavefront_s is None
    assert "two grid barriers a stage" in str(s)


# ---------------------------------------------------------------- static compilation

@pytest.fixture(scope="module")
def rows():
    return compile_rows("gpurnn.kernels.wavefront_mlstm:specializations")


@needs_ptxas
def test_every_kernel_compiles_without_spills_within_regs_max(rows):
    names = {sp.name for sp in kernels.specializations()}
    assert len(names) == len(kernels.DTYPES) * 2 == 4
    assert compiled_pairs(rows) == wanted_pairs(names)
    assert compile_errors(rows) == []
    assert spilled(rows) == []
    for r in rows:
        assert r.linked_cudadevrt and r.grid_sync, r.kernel
        assert 0 < r.registers <= kernels.REGS_MAX, (r.kernel, r.arch, r.registers)


@needs_ptxas
def test_static_plus_planned_dynamic_smem_fits(rows):
    for r in rows:
        f = planning.fit("mlstm", 256, 1, 2, r.dtype, "A100" if r.arch == "sm_80" else "H100")
        assert f.fits
        dyn = f.smem_fwd if r.kind == "wavefront_fwd" else f.smem_bwd
        assert r.static_smem + dyn <= f.device.smem_per_block_optin, r.kernel


# ---------------------------------------------------------------- mutants

SOURCE, LINES, BARRIER_LINES = kernel_source(kernels)
# (T, B, H, L, P, threads, batch_tile): tiles with lanes > 1 and lanes 1 in every phase, one-unit
# blocks, idle blocks
MUTANT_CASES = [
    (3, 3, 7, 2, 2, 32, 2),     # U 4, tiles 2+1: phase 1 / A / B lanes 2, phase 2 lanes 1
    (3, 3, 17, 2, 2, 32, 2),    # U 9, tiles: lanes 1 in every phase
    (3, 1, 7, 2, 6, 32, None),  # blocks 4, 5 own no unit; lanes 16 / 4
]


def test_the_source_has_the_barriers_the_docstring_promises():
    kinds = barrier_kinds(LINES, BARRIER_LINES)
    assert kinds.count("_grid_group_sync(grid)") == 2      # one per half-stage, each kernel
    # forward: phase 1 between tiles, staging, scratch; phase 2 staging, scratch, pre; grid.
    # backward: phase A between tiles, staging, scratch; phase B the same three; grid.
    assert barriers_before_and_after(LINES, BARRIER_LINES, "def make_bwd") == (6 + 1, 6 + 1)


def _build(module, spec):
    return (module.make_fwd if spec.kind == "wavefront_fwd" else module.make_bwd)(spec.dtype)


def mutant_runtime(source, tag):
    """The strict sim backend with the mLSTM wavefront kernels taken from `source`."""
    return MutantRuntime(mutant_module(source, tag, kernels, "wavefront_mlstm"),
                         lambda spec: spec.cell == "mlstm" and spec.kind.startswith("wavefront"),
                         _build)


def _run(rt, case, seed):
    T, B, H, L, P, threads, bt = case
    args, cot = make_case(T, B, 3, H, L, np.float32, True, seed)
    lengths = staggered_lengths(T, B)
    opts = _options(P, threads, bt)
    out = wf.run_stack_forward(rt, "mlstm", args["x"], args["layers"], args["h0"], args["c0"],
                               lengths, True, opts)
    g = wf.run_stack_backward(rt, "mlstm", args["x"], args["layers"], (out[3], out[4]), lengths,
                              cot["dy"], cot["dh_n"], cot["dc_n"], opts)
    return [out[0], out[1], out[2], g[0], g[1], g[2]] + [a[n] for a in g[3] for n in sorted(a)]


_REFERENCE = {}


def _reference(n, case):
    if n not in _REFERENCE:
        _REFERENCE[n] = _run(RT, case, n)


def _differs(rt, n, case):
    got = _run(rt, case, n)
    if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, _REFERENCE[n])):
        return "results differ"
    return None


def caught_by(source, tag):
    rt = mutant_runtime(source, tag)
    return first_catch(MUTANT_CASES, lambda n, case: _differs(rt, n, case), prepare=_reference)


# the unmutated source passes every case; deleting any one barrier is caught; an idle block
# returning early is caught as a hang
(test_unmutated_source_passes_every_mutant_case, test_deleting_any_barrier_is_caught,
 test_idle_blocks_returning_early_is_caught) = mutation_tests(
    caught_by, SOURCE, LINES, BARRIER_LINES, "wavefront_mlstm.py",
    "nu = max(0, min(units, H - u0))", "nu == 0")


@pytest.mark.mutation
@pytest.mark.parametrize("anchor", ["if t >= 0 and t < T:            # uniform over the block",
                                    "if kk >= 0 and kk <= T:             # uniform over the block"])
def test_a_layer_skipping_a_stage_barrier_is_caught(anchor):
    # a layer with no step at a half-stage leaving the loop instead of joining the barrier:
    # forward a layer done with its steps, backward a lower layer not yet started
    hits = anchor_hits(LINES, anchor)
    assert len(hits) == 1
    cond = "t >= T" if anchor.startswith("if t") else "kk < 0"
    found = caught_by(with_return(LINES, hits[0], cond, before=True), f"skip-{cond[:2]}")
    assert found is not None and "hang" in found, found
