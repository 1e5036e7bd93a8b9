"""The layer wavefront of the LSTM with projection (gpurnn/kernels/wavefront_proj.py, host
gpurnn/backends/cuda_wavefront_proj.py, plan gpurnn/planning/wavefront_proj.py): a whole stack
of projected LSTM layers in one persistent launch each way.

In gpurnn's strict simulator (every block at once, a real grid barrier, race and bounds checks),
with P > 1 blocks per layer in ONE launch and zero findings, the wavefront is compared with the
per-layer persistent projection launches (gpurnn.backends.cuda_proj, {"path": "persistent"}
with the same blocks per layer, threads and batch tile, so every dot product is split and
summed in the same order):
  * bit for bit (np.array_equal), layer by layer, given the same inputs: layer 0 end to end;
    each layer l > 0's recurrence (h, c, gates, y) fed the input pre-activations the wavefront
    formed; each layer's backward (dh0, dc0 and every weight gradient; the stack's dx) fed the
    dy the wavefront formed (the top layer: the caller's dy);
  * within gpurnn.testing's TOL / GRAD_TOL where bit identity is not possible: a layer's input
    pre-activations and a lower layer's dy are one dot product per element in the kernel but a
    BLAS GEMM per layer, so the chained per-layer stack differs from layer 1 on in the last
    bits, and is checked end to end.
Sizes are awkward (H 7 and 9, R 3 and 5, B 1 and 3, T 3-4, L 2 and 3, blocks that own no unit or
no feature, batch tiles, dot products over 1 to 16 lanes), lengths with a 0 and a full row.
Also: grid barriers per launch (2T+2L-3 forward, 2T+2L-2 backward), the weights read once per
launch, the stock simulator's one launch per half-stage, the plan, static compilation for
sm_80 and sm_90 with no spills, and (`-m mutation`) each barrier deleted in turn caught.
"""
import zlib

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import cuda_proj, sim
from gpurnn.backends import cuda_wavefront_proj as wfp
from gpurnn.kernels import projection as kproj
from gpurnn.kernels import wavefront_proj as kernels
from gpurnn.kernels.layout import lanes_per_output
from gpurnn.planning import wavefront_proj as planning
from gpurnn.testing import GRAD_TOL, TOL, assert_close
from gpurnn.variants import form_of

from simtools import (MutantRuntime, barrier_kinds, barriers_before_and_after, compile_errors,
                      compile_rows, compiled_pairs, first_catch, kernel_source, mutant_module,
                      mutation_tests, needs_ptxas, normal_draws, run_fresh, spilled,
                      staggered_lengths, wanted_pairs)

pytestmark = pytest.mark.sim
RT = sim.RUNTIME


# ---------------------------------------------------------------- cases

def make_case(base, T, B, I, H, R, L, dtype, bias, seed):
    """(cell name, form, args, cot) of a random stack of L projected `base` layers."""
    cell = f"{base}_proj{R}"
    form = form_of(cell)
    rand = normal_draws(np.random.default_rng(seed), dtype)
    layers = [{name: rand(*shape) for name, shape in form.param_shapes(I if l == 0 else R, H,
                                                                      bias)}
              for l in range(L)]
    args = dict(x=rand(T, B, I), layers=layers, h0=rand(L, B, R), c0=rand(L, B, H))
    cot = dict(dy=rand(T, B, R), dh_n=rand(L, B, R), dc_n=rand(L, B, H))
    return cell, form, args, cot


def _options(P, threads, bt):
    opts = {"blocks": P, "threads": threads}
    if bt:
        opts["batch_tile"] = bt
    return opts


def _layer_options(P, threads, bt, B):
    # the per-layer launch with the same grid, threads and tile (so the same lane splits)
    return {"path": "persistent", "blocks": P, "threads": threads, "batch_tile": bt or B}


# (base cell, T, B, I, H, R, L, P, threads, batch_tile, lengths, bias, dtype)
CASES = [
    ("lstm", 4, 3, 4, 7, 3, 2, 2, 32, None, [4, 0, 2], True, np.float32),
    ("lstm_peephole", 3, 3, 3, 9, 5, 3, 3, 32, 2, [3, 1, 0], True, np.float64),   # tiles 2+1
    ("cifg", 4, 1, 3, 7, 3, 2, 6, 32, None, [4], False, np.float32),    # blocks 4, 5 idle
    ("cifg_peephole", 3, 3, 4, 9, 3, 3, 2, 32, 1, [0, 3, 2], True, np.float64),  # tiles of 1
    ("lstm", 3, 3, 4, 7, 5, 2, 3, 64, None, None, True, np.float64),    # 64 threads
]


def _lanes(base, B, H, R, P, threads, bt):
    """(L1, L2, LA, LB) of the case (kernels docstring)."""
    G, tile = kproj.GATES[base], bt or B
    U, Q = kproj.slices(H, R, P)
    return (lanes_per_output(tile * G * U, threads), lanes_per_output(tile * Q, threads),
            lanes_per_output(tile * Q, threads), lanes_per_output(tile * U, threads))


def _case_id(c):
    base, T, B, I, H, R, L, P, threads, bt, lengths, bias, dtype = c
    return (f"{base}-T{T}-B{B}-H{H}-R{R}-L{L}-P{P}-t{threads}{'-tile%d' % bt if bt else ''}"
            f"{'-len' if lengths else ''}{'' if bias else '-nobias'}-{np.dtype(dtype).name}")


def test_cases_cover_what_the_docstring_promises():
    cells, lanes, idle_u, idle_q, tiles, zero, full, dts, nobias = (set(), set(), False, False,
                                                                    False, 0, 0, set(), False)
    for base, T, B, I, H, R, L, P, threads, bt, lengths, bias, dtype in CASES:
        cells.add(base)
        lanes |= set(_lanes(base, B, H, R, P, threads, bt))
        U, Q = kproj.slices(H, R, P)
        idle_u |= P * U - H >= U
        idle_q |= P * Q - R >= Q
        tiles |= (bt or B) < B
        dts.add(np.dtype(dtype).name)
        nobias |= not bias
        assert P > 1 and 3 <= T <= 4 and L in (2, 3) and H in (7, 9) and R in (3, 5)
        assert B in (1, 3)
        if lengths:
            zero += 0 in lengths
            full += T in lengths
    assert cells == set(kproj.CELLS) and dts == {"float32", "float64"} and nobias
    assert 1 in lanes and max(lanes) >= 16
    assert idle_u and idle_q and tiles and zero and full


# ---------------------------------------------------------------- per-layer launches

def _per_layer_forward_fed(form, p, gx_l, h0, c0, lengths, opts):
    """Layer p's per-layer persistent projection recurrence (cuda_proj.run_forward's launch)
    fed the input pre-activations gx_l: (h, c, gates, y)."""
    T, B, GH = gx_l.shape
    H, R, G = GH // form.gates, form.proj_size, form.gates
    dtype, dt = gx_l.dtype.name, gx_l.dtype
    cfg = cuda_proj.choose(RT, form, R, H, B, dtype, opts)
    assert cfg.path == "persistent"
    b_rec = np.ascontiguousarray(p["weight_ch"]) if form.peephole else np.zeros(1, dt)
    h = np.empty((T + 1, B, R), dt)
    h[0] = h0
    c = np.empty((T + 1, B, H), dt)
    c[0] = c0
    gates = np.empty((T, B, GH), dt)
    y = np.empty((T, B, R), dt)
    m = np.empty((T + 1, B, H), dt)
    m_y = np.empty((T, B, H), dt)
    lengths_k = np.full(B, T, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    smem = kproj.smem_bytes("fwd", G, H, R, cfg.batch_tile, cfg.blocks, dtype,
                            threads=cfg.threads)
    cuda_proj._launch_persistent(RT, form.kernel_cell, "proj_persistent_fwd", dtype, cfg, smem,
                                 (np.ascontiguousarray(gx_l), p["weight_hh"], p["weight_hr"],
                                  b_rec, h, c, gates, y, m, m_y, lengths_k, 0, 0, T,
                                  cfg.units_per_block, cfg.feats_per_block, 1, cfg.batch_tile),
                                 (0, T))
    return h, c, gates, y


def _chain(form, args, cot, lengths, opts):
    """The per-layer stack end to end: forward layer by layer (y of one is x of the next), then
    backward from the top (dx of one is dy of the one below)."""
    L = len(args["layers"])
    inp, outs = args["x"], []
    for l, p in enumerate(args["layers"]):
        outs.append(cuda_proj.run_forward(RT, form, inp, p, args["h0"][l], args["c0"][l],
                                          lengths, False, True, opts))
        inp = outs[-1][0]
    dy, grads = cot["dy"], [None] * L
    for l in range(L - 1, -1, -1):
        x_l = args["x"] if l == 0 else outs[l - 1][0]
        grads[l] = cuda_proj.run_backward(RT, form, x_l, args["layers"][l], outs[l][3], lengths,
                                          False, dy, cot["dh_n"][l], cot["dc_n"][l], opts)
        dy = grads[l][0]
    return outs, grads


@pytest.mark.parametrize("base,T,B,I,H,R,L,P,threads,bt,lengths,bias,dtype", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_wavefront_equals_the_per_layer_launches(request, base, T, B, I, H, R, L, P, threads,
                                                 bt, lengths, bias, dtype):
    seed = zlib.crc32(request.node.callspec.id.encode())
    cell, form, args, cot = make_case(base, T, B, I, H, R, L, dtype, bias, seed)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    opts = _options(P, threads, bt)
    launches = []
    RT.launch_hook = launches.append
    try:
        with strict.record() as reports:
            st = wfp._stack_forward(RT, cell, args["x"], args["layers"], args["h0"], args["c0"],
                                    lengths, True, opts)
            out = wfp._forward_results(np, st, args["x"], L, True)
            saved = (out[3], out[4])
            bst = wfp._stack_backward(RT, cell, args["x"], args["layers"], saved, lengths,
                                      cot["dy"], cot["dh_n"], cot["dc_n"], opts)
            grads = wfp._backward_results(np, cell, bst, args["x"], args["layers"], saved,
                                          lengths)
    finally:
        RT.launch_hook = None
    # one launch each way, L*P blocks, one grid barrier per half-stage, zero findings
    assert all(r.findings == [] for r in reports)
    assert [d["kind"] for d in launches] == ["wavefront_proj_fwd", "wavefront_proj_bwd"]
    assert {(d["blocks"], d["threads"]) for d in launches} == {(L * P, threads)}
    assert [(r.grid[0], r.grid_barriers) for r in reports] == (
        [(L * P, 2 * T + 2 * L - 3), (L * P, 2 * T + 2 * L - 2)])

    y, h_n, c_n, reserves, outputs = out
    sdt = np.dtype(dtype)
    assert y.dtype == sdt and h_n.shape == (L, B, R) and c_n.shape == (L, B, H)
    assert len(reserves) == L == len(outputs) and np.array_equal(y, outputs[-1])
    for r_ in reserves:
        assert [a.shape for a in r_] == [s for _, s, _ in form.saved_specs(T, B, I, H, dtype)]
    masked = (None if lengths is None
              else np.arange(T)[:, None] >= np.asarray(lengths)[None, :])

    # ---- forward, bit for bit, layer by layer
    lopts = _layer_options(P, threads, bt, B)
    chain, chain_grads = _chain(form, args, cot, lengths, lopts)
    for l in range(L):
        p = args["layers"][l]
        if l == 0:
            want_y, want_hn, want_cn, want_saved = chain[0]
            assert np.array_equal(outputs[0], want_y), "layer 0 y"
            assert np.array_equal(h_n[0], want_hn) and np.array_equal(c_n[0], want_cn)
            for name, a, b in zip(("h", "c", "gates"), reserves[0], want_saved):
                assert np.array_equal(a, b), f"layer 0 reserve {name}"
        else:
            gx_l = st.gx[:, l * B:(l + 1) * B]
            gemm = outputs[l - 1].astype(np.float64) @ p["weight_ih"].T.astype(np.float64)
            if bias:
                gemm = gemm + p["bias_ih"] + p["bias_hh"]
            assert_close(gx_l, gemm, TOL[dtype], f"layer {l} gx")
            h, c, g, yl = _per_layer_forward_fed(form, p, gx_l, args["h0"][l], args["c0"][l],
                                                 lengths, lopts)
            assert np.array_equal(outputs[l], yl), f"layer {l} y"
            for name, a, b in zip(("h", "c", "gates"), reserves[l], (h, c, g)):
                assert np.array_equal(a, b), f"layer {l} reserve {name}"
            assert np.array_equal(h_n[l], h[T]) and np.array_equal(c_n[l], c[T])
        if masked is not None:
            assert np.all(outputs[l][masked] == 0), f"layer {l}: y must be 0 at masked steps"
    assert_close(y, chain[-1][0], TOL[dtype], "y vs the per-layer stack")
    assert_close(h_n, np.stack([c_[1] for c_ in chain]), TOL[dtype], "h_n")
    assert_close(c_n, np.stack([c_[2] for c_ in chain]), TOL[dtype], "c_n")

    # ---- backward, bit for bit, layer by layer (each fed the dy the wavefront formed)
    dx, dh0, dc0, wgrads = grads
    assert dx.dtype == sdt and dx.shape == (T, B, I) and dh0.shape == (L, B, R)
    assert dc0.shape == (L, B, H) and len(wgrads) == L
    assert np.array_equal(bst.dy[:, (L - 1) * B:], cot["dy"])
    for l in range(L - 1, -1, -1):
        dy_l = np.ascontiguousarray(bst.dy[:, l * B:(l + 1) * B])
        x_l = args["x"] if l == 0 else outputs[l - 1]
        g_dx, g_dh0, g_dc0, want = cuda_proj.run_backward(
            RT, form, x_l, args["layers"][l], reserves[l], lengths, False, dy_l,
            cot["dh_n"][l], cot["dc_n"][l], lopts)
        assert np.array_equal(dh0[l], g_dh0), f"layer {l} dh0"
        assert np.array_equal(dc0[l], g_dc0), f"layer {l} dc0"
        assert set(wgrads[l]) == set(want) == set(args["layers"][l])
        for name in want:
            assert wgrads[l][name].dtype == sdt
            assert np.array_equal(wgrads[l][name], want[name]), f"layer {l} {name}"
        if l == 0:
            assert np.array_equal(dx, g_dx), "dx"
        else:   # the lower layer's dy: a dot product here, a GEMM per layer
            assert_close(bst.dy[:, (l - 1) * B:l * B], g_dx, GRAD_TOL[dtype], f"layer {l} dx")
    gtol = GRAD_TOL[dtype]
    assert_close(dx, chain_grads[0][0], gtol, "dx vs the per-layer stack")
    assert_close(dh0, np.stack([g[1] for g in chain_grads]), gtol, "dh0")
    assert_close(dc0, np.stack([g[2] for g in chain_grads]), gtol, "dc0")
    for l in range(L):
        for name, want in chain_grads[l][3].items():
            assert_close(wgrads[l][name], want, gtol, f"layer {l} {name} vs the per-layer stack")


def test_inference_forward_keeps_nothing_and_weights_are_read_once_per_launch():
    cell, _, args, cot = make_case("lstm", 3, 2, 4, 7, 3, 3, np.float32, True, 5)
    lengths = np.array([3, 1])
    a = (RT, cell, args["x"], args["layers"], args["h0"], args["c0"], lengths)
    opts = _options(2, 32, None)
    y, h_n, c_n, reserves, _ = wfp.run_stack_forward(*a, False, opts)
    assert reserves is None
    with strict.record() as reports:
        want = wfp.run_stack_forward(*a, True, opts)
        wfp.run_stack_backward(RT, cell, args["x"], args["layers"], (want[3], want[4]), lengths,
                               cot["dy"], cot["dh_n"], cot["dc_n"], opts)
    for got, exp in zip((y, h_n, c_n), want[:3]):
        assert np.array_equal(got, exp)
    # persistence, measured: every element of the stacked W_hh, W_ih and W_hr is loaded from
    # global memory once per launch, whatever T is
    assert len(reports) == 2
    for r in reports:
        for name in ("w_hh", "w_ih", "w_hr"):
            assert (r.traffic[name].reads == 1).all(), (r.kernel, name)
            assert r.traffic[name].total_writes == 0


def test_none_states_and_cotangents_are_zeros_and_backward_is_deterministic():
    cell, _, args, cot = make_case("cifg", 3, 1, 4, 7, 3, 2, np.float32, True, 9)
    opts = _options(2, 32, None)
    a = (RT, cell, args["x"], args["layers"])
    got = wfp.run_stack_forward(*a, None, None, None, True, opts)
    z_h, z_c = np.zeros_like(args["h0"]), np.zeros_like(args["c0"])
    want = wfp.run_stack_forward(*a, z_h, z_c, None, True, opts)
    assert all(np.array_equal(g, w) for g, w in zip(got[:3], want[:3]))
    saved = (got[3], got[4])
    first = wfp.run_stack_backward(*a, saved, None, cot["dy"], cot["dh_n"], None, opts)
    second = wfp.run_stack_backward(*a, saved, None, cot["dy"], cot["dh_n"], None, opts)
    assert all(np.array_equal(f, s) for f, s in zip(first[:3], second[:3]))
    for f, s in zip(first[3], second[3]):
        assert all(np.array_equal(f[n], s[n]) for n in f)
    zeros = wfp.run_stack_backward(*a, saved, None, None, None, None, opts)
    assert not zeros[0].any() and not zeros[1].any() and not zeros[2].any()


def test_bad_inputs_are_refused():
    cell, _, args, _ = make_case("lstm", 3, 2, 4, 7, 3, 2, np.float32, True, 8)
    rest = (args["h0"], args["c0"], None, True)

    def run(cell_, layers, opts=None):
        return wfp.run_stack_forward(RT, cell_, args["x"], layers, *rest, opts)
    with pytest.raises(ValueError, match="cannot be co-resident"):
        run(cell, args["layers"], {"blocks": 100000, "threads": 32})
    with pytest.raises(ValueError, match="one persistent launch"):
        run(cell, args["layers"], {"path": "stepwise"})
    with pytest.raises(ValueError, match="the projection wavefront runs"):
        run("lstm", args["layers"])
    with pytest.raises(ValueError, match="the projection wavefront runs"):
        run("mlstm", args["layers"])
    with pytest.raises(ValueError, match="needs R = 4 rows"):
        run("lstm_proj4", args["layers"])
    wide = [args["layers"][0], {**args["layers"][1], "weight_ih": np.zeros((28, 7), np.float32)}]
    with pytest.raises(ValueError, match=r"layer 1: weight_ih has shape \(28, 7\); expected "
                                         r"\(28, 3\) \(one H = 7 and R = 3"):
        run(cell, wide)
    other_h = [args["layers"][0], {**args["layers"][1],
                                   "weight_hr": np.zeros((3, 9), np.float32)}]
    with pytest.raises(ValueError, match="layer 1: weight_hr has shape"):
        run(cell, other_h)
    with pytest.raises(ValueError, match=r"layer 0: weight_ch has shape None"):
        run("lstm_peephole_proj3", args["layers"])
    mixed = [args["layers"][0], {k: v for k, v in args["layers"][1].items()
                                 if not k.startswith("bias")}]
    with pytest.raises(ValueError, match="layer 1: bias_ih has shape None"):
        run(cell, mixed)
    with pytest.raises(ValueError, match="must be the .reserves, outputs. of a training"):
        wfp.run_stack_backward(RT, cell, args["x"], args["layers"], (None, None), None, None,
                               None, None, None)


STOCK_SCRIPT = """
import os
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"     # before numba.cuda's first import
import numpy as np
from gpurnn.backends import sim, cuda_wavefront_proj as wfp
rng = np.random.default_rng(3)
T, B, I, H, R, L = 3, 2, 3, 7, 3, 2
r = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float32)
layers = [{"weight_ih": r(28, I if l == 0 else R), "weight_hh": r(28, R), "weight_hr": r(R, H)}
          for l in range(L)]
x, h0, c0, dy, dhn, dcn = r(T, B, I), r(L, B, R), r(L, B, H), r(T, B, R), r(L, B, R), r(L, B, H)
opts = {"blocks": 2, "threads": 32}
lengths = np.array([3, 1])
log = []
sim.STOCK_RUNTIME.launch_hook = log.append
sim.RUNTIME.launch_hook = log.append
out = wfp.run_stack_forward(sim.STOCK_RUNTIME, "lstm_proj3", x, layers, h0, c0, lengths, True,
                            opts)
g = wfp.run_stack_backward(sim.STOCK_RUNTIME, "lstm_proj3", x, layers, (out[3], out[4]), lengths,
                           dy, dhn, dcn, opts)
ref = wfp.run_stack_forward(sim.RUNTIME, "lstm_proj3", x, layers, h0, c0, lengths, True, opts)
gr = wfp.run_stack_backward(sim.RUNTIME, "lstm_proj3", x, layers, (ref[3], ref[4]), lengths,
                            dy, dhn, dcn, opts)
# within float32 rounding (Numba's simulator runs math.tanh in float64, DESIGN.md section 4)
assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(out[:3], ref[:3]))
assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g[:3], gr[:3]))
stock = [d for d in log if d["simulator"] == "stock"]
fwd = [d["step_range"] for d in stock if d["kind"] == "wavefront_proj_fwd"]
bwd = [d["step_range"] for d in stock if d["kind"] == "wavefront_proj_bwd"]
strict = [d["step_range"] for d in log if d["simulator"] != "stock"]
assert strict == [(0, 2 * (T + L - 1)), (0, 2 * (T + L) - 1)], strict
assert fwd == [(q, q + 1) for q in range(2 * (T + L - 1))], fwd
assert bwd == [(q, q + 1) for q in range(2 * (T + L) - 1)], bwd
print("STOCK-OK")
"""


def test_stock_simulator_launches_once_per_half_stage_in_a_fresh_process():
    # Numba's own simulator: its grid.sync() only synchronises a block, so the host launches
    # each half-stage on its own (the launch boundary is the grid barrier)
    r = run_fresh(STOCK_SCRIPT, timeout=300)
    assert r.returncode == 0 and "STOCK-OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- the plan

def test_fit_uses_the_kernels_smem_model():
    f = planning.fit("lstm_proj128", 512, 8, 2, "float32", "H100")
    assert f.fits and f.blocks <= f.coop and f.proj == 128
    assert (f.units, f.feats) == kproj.slices(512, 128, f.blocks_per_layer)
    for d, got in (("fwd", f.smem_fwd), ("bwd", f.smem_bwd)):
        assert got == kernels.smem_bytes(d, 4, 512, 128, f.batch_tile, f.blocks_per_layer,
                                         "float32", threads=f.threads)
    assert f.smem <= f.device.smem_per_block_optin
    # more layers share the SMs: fewer blocks per layer
    f4 = planning.fit("lstm_proj128", 512, 8, 4, "float32", "H100")
    assert f4.fits and f4.blocks_per_layer <= f.blocks_per_layer
    with pytest.raises(ValueError, match="projected LSTM variant"):
        planning.fit("lstm", 512, 8, 2)
    with pytest.raises(ValueError, match="proj_size must be < hidden"):
        planning.fit("lstm_proj9", 9, 1, 2)
    big = planning.fit("lstm_proj2048", 8192, 8, 4, "float32", "H100")
    assert not big.fits and big.reasons


def test_smem_regions_hold_every_slice():
    for G, H, R, bt, P, threads in ((4, 7, 3, 3, 2, 32), (3, 9, 5, 2, 3, 32),
                                    (4, 19, 17, 2, 2, 64)):
        U, Q = kproj.slices(H, R, P)
        wf_, rf = kernels.smem_regions("fwd", G, H, R, bt, P, threads)
        wb, rb = kernels.smem_regions("bwd", G, H, R, bt, P, threads)
        assert 2 * G * U * R + Q * H <= wf_ < 2 * G * U * (R + 32) + Q * (H + 32)
        assert 2 * Q * G * H + U * R <= wb < 2 * Q * (G * H + 32) + U * (R + 32)
        assert rf == bt * max(R, H) + bt * R + bt * G * U + 2 * threads
        assert rb == bt * max(G * H, R) + bt * G * H + 2 * threads


def test_fit_refuses_blocks_that_leave_too_few_registers():
    f = planning.fit("cifg_peephole_proj16", 64, 1, 2, "float32", "H100", threads=512)
    assert not f.fits and any("registers per thread" in r for r in f.reasons), f.reasons
    assert planning.fit("cifg_peephole_proj16", 64, 1, 2, "float32", "H100", threads=256).fits


def test_choose_says_which_and_why():
    c = planning.choose("lstm_proj64", 256, 256, 1, 4, 128, "float32", "H100")
    assert c.choice in ("wavefront", "per_layer") and c.wavefront_s and c.per_layer_s
    assert any("model (unmeasured)" in r for r in c.reasons)
    assert (c.choice == "wavefront") == (c.wavefront_s[1] < c.per_layer_s[1])
    assert "wavefront" in str(c) or "per_layer" in str(c)
    assert planning.choose("lstm_proj64", 256, 256, 1, 4, 128, "float32", "H100",
                           dropout=0.1).choice == "per_layer"
    big = planning.choose("lstm_proj2048", 8192, 8192, 8, 4, 128, "float32", "H100")
    assert big.choice == "per_layer" and big.wavefront_s is None and not big.fit.fits
    s = planning.choose("cifg_proj3", 4, 7, 3, 2, 4, "float32", "sim")
    assert s.choice == "wavefront" and s.wavefront_s is None


# ---------------------------------------------------------------- static compilation

@pytest.fixture(scope="module")
def rows():
    return compile_rows("gpurnn.kernels.wavefront_proj:specializations", per_arch=True)


@needs_ptxas
def test_every_kernel_compiles_without_spills_within_regs_max(rows):
    names = {sp.name for sp in kernels.specializations()}
    assert len(names) == len(kproj.CELLS) * len(kernels.DTYPES) * 2 == 16
    assert compiled_pairs(rows) == wanted_pairs(names)
    assert compile_errors(rows) == []
    assert spilled(rows) == []
    for r in rows:
        assert r.linked_cudadevrt and r.grid_sync, r.kernel
        assert 0 < r.registers <= kernels.REGS_MAX, (r.kernel, r.arch, r.registers)


@needs_ptxas
def test_static_plus_planned_dynamic_smem_fits(rows):
    for r in rows:
        dev = "A100" if r.arch == "sm_80" else "H100"
        base = r.kernel.split("_wavefront_proj_")[0]
        f = planning.fit(f"{base}_proj64", 256, 1, 2, r.dtype, dev)
        assert f.fits
        dyn = f.smem_fwd if r.kind == "wavefront_proj_fwd" else f.smem_bwd
        assert r.static_smem + dyn <= f.device.smem_per_block_optin, r.kernel


# ---------------------------------------------------------------- mutants

SOURCE, LINES, BARRIER_LINES = kernel_source(kernels)
# (base, T, B, H, R, L, P, threads, batch_tile): every phase's lanes 1 and > 1, with tiles;
# idle blocks
MUTANT_CASES = [
    ("lstm", 3, 3, 7, 3, 2, 2, 32, 2),      # L1 1, L2 4, LA 4, LB 2; tiles 2+1
    ("cifg", 3, 3, 7, 3, 2, 4, 32, 1),      # L1 2, L2 16, LA 16, LB 8; the last block no feature
    ("lstm", 3, 3, 19, 17, 2, 2, 32, 2),    # every phase lanes 1, tiles 2+1
    ("lstm", 3, 1, 7, 3, 2, 6, 32, None),   # blocks 4, 5 idle
]


def test_mutant_cases_cover_both_lane_modes_tiles_and_idle_blocks():
    lanes = [_lanes(c[0], c[2], c[3], c[4], c[6], c[7], c[8]) for c in MUTANT_CASES]
    for phase in range(4):
        assert any(ls[phase] == 1 for ls in lanes) and any(ls[phase] > 1 for ls in lanes), phase
    assert any(all(v == 1 for v in ls) and c[8] and c[8] < c[2]
               for c, ls in zip(MUTANT_CASES, lanes))
    assert any(c[6] * kproj.slices(c[3], c[4], c[6])[0] - c[3] >= kproj.slices(c[3], c[4],
                                                                              c[6])[0]
               for c in MUTANT_CASES)


def test_the_source_has_the_barriers_the_docstring_promises():
    kinds = barrier_kinds(LINES, BARRIER_LINES)
    assert kinds.count("_grid_group_sync(grid)") == 2      # one per half-stage, each kernel
    # forward: phase 1 staging, scratch, pre; phase 2 between tiles, staging, scratch; grid.
    # backward: phase A between tiles, staging, scratch; phase B the same; grid.
    assert barriers_before_and_after(LINES, BARRIER_LINES, "def make_bwd") == (7, 7)


def _build(module, spec):
    factory = module.make_fwd if spec.kind == "wavefront_proj_fwd" else module.make_bwd
    return factory(spec.cell, spec.dtype)


def _run(rt, case, seed):
    base, T, B, H, R, L, P, threads, bt = case
    cell, _, args, cot = make_case(base, T, B, 3, H, R, L, np.float32, True, seed)
    lengths = staggered_lengths(T, B)
    opts = _options(P, threads, bt)
    out = wfp.run_stack_forward(rt, cell, args["x"], args["layers"], args["h0"], args["c0"],
                                lengths, True, opts)
    g = wfp.run_stack_backward(rt, cell, args["x"], args["layers"], (out[3], out[4]), lengths,
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
    rt = MutantRuntime(mutant_module(source, tag, kernels, "wavefront_proj"),
                       lambda spec: spec.kind.startswith("wavefront_proj"), _build)
    return first_catch(MUTANT_CASES, lambda n, case: _differs(rt, n, case), prepare=_reference)


# the unmutated source passes every case; deleting any one barrier is caught; a block that owns
# no unit returning early is caught as a hang
(test_unmutated_source_passes_every_mutant_case, test_deleting_any_barrier_is_caught,
 test_idle_blocks_returning_early_is_caught) = mutation_tests(
    caught_by, SOURCE, LINES, BARRIER_LINES, "wavefront_proj.py",
    "nu = max(0, min(units, H - u0))", "nu == 0")
