"""The layer wavefront (gpurnn/kernels/wavefront.py, host gpurnn/backends/cuda_wavefront.py, plan
gpurnn/planning/wavefront.py): a whole stack in one persistent launch each way.

In gpurnn's strict simulator (every block at once, a real grid barrier, race and bounds checks),
with P > 1 blocks per layer in ONE launch and zero findings, the wavefront is compared with the
per-layer persistent launches (gpurnn.backends.sim / gpurnn.backends.cuda, {"path":
"persistent"} with the same blocks per layer, threads and batch tile, so every dot product is
split and summed in the same order):
  * bit for bit (np.array_equal), layer by layer, given the same inputs: layer 0 end to end;
    each layer l > 0's recurrence (h, c, gates, y) fed the input pre-activations the wavefront
    formed; each layer's backward (dh0, dc0, dW_ih, dW_hh, db; the stack's dx) fed the dy the
    wavefront formed (the top layer: the caller's dy);
  * within the per-dtype tolerance (gpurnn.testing.TOL / GRAD_TOL) where bit identity is not
    possible: a layer's input pre-activations and a lower layer's dy are one dot product per
    element in the kernel but a BLAS GEMM (NumPy's, its own blocking and summation order) per
    layer; so everything downstream of layer 0 in the chained per-layer stack differs in the
    last bits, and is checked end to end at TOL.
Sizes are awkward (H 7 and 9, B 1 and 3, T 3-5, L 2 and 3, blocks that own no unit, batch
tiles, dot products split over 1 to 16 lanes), lengths with a 0 and a full row. Also: one
grid barrier per stage (T+L-2 forward, T+L-1 backward) counted by the simulator, static
compilation of every specialization for sm_80 and sm_90 with no spills, each barrier deleted
in turn caught, an idle block's early return caught, and the plan.
"""
import zlib

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import Reserve
from gpurnn.backends import cuda as host
from gpurnn.backends import cuda_wavefront as wf
from gpurnn.backends import sim
from gpurnn.backends.numpy import input_bias
from gpurnn.cells import GATES, KERNEL_CELLS, PEEPHOLES, RESERVE_GATES, has_cell_state
from gpurnn.kernels import wavefront as kernels
from gpurnn.kernels.layout import KERNEL_REGS_MAX, lanes_per_output, units_per_block
from gpurnn.planning import wavefront as planning
from gpurnn.testing import GRAD_TOL, TOL, assert_close
from gpurnn.variants import form_of

from simtools import (MutantRuntime, anchor_hits, barrier_kinds, barriers_before_and_after,
                      compile_errors, compile_rows, compiled_pairs, first_catch, kernel_source,
                      mutant_module, mutation_tests, needs_ptxas, normal_draws, run_fresh, spilled,
                      staggered_lengths, wanted_pairs, with_return)

RT = sim.RUNTIME


# ---------------------------------------------------------------- cases

def make_case(cell, T, B, I, H, L, dtype, bias, seed):
    rand = normal_draws(np.random.default_rng(seed), dtype)
    G = GATES[cell]
    layers = []
    for l in range(L):
        p = {"weight_ih": rand(G * H, I if l == 0 else H), "weight_hh": rand(G * H, H)}
        if bias:
            p["bias_ih"], p["bias_hh"] = rand(G * H), rand(G * H)
        if PEEPHOLES.get(cell):
            p["weight_ch"] = rand(PEEPHOLES[cell] * H)
        layers.append(p)
    args = dict(x=rand(T, B, I), layers=layers, h0=rand(L, B, H),
                c0=rand(L, B, H) if has_cell_state(cell) else None)
    cot = dict(dy=rand(T, B, H), dh_n=rand(L, B, H),
               dc_n=rand(L, B, H) if has_cell_state(cell) else None)
    return args, cot


def _options(P, threads, bt):
    opts = {"blocks": P, "threads": threads}
    if bt:
        opts["batch_tile"] = bt
    return opts


def _layer_options(P, threads, bt, B):
    # the per-layer launch with the same grid, threads and tile (so the same lane split)
    return {"path": "persistent", "blocks": P, "threads": threads, "batch_tile": bt or B}


# (cell, T, B, I, H, L, P, threads, batch_tile, lengths, bias, dtype)
CASES = [
    ("lstm", 4, 3, 4, 7, 2, 2, 32, None, [4, 0, 2], True, np.float32),     # U 4; bwd L 2
    ("gru", 3, 3, 5, 9, 3, 3, 32, 2, [3, 1, 0], True, np.float64),         # tiles 2+1
    ("rnn_tanh", 5, 1, 3, 7, 3, 2, 64, None, None, True, np.float32),      # B 1, 64 threads: lanes 16
    ("lstm", 3, 3, 3, 9, 3, 2, 32, 1, [0, 3, 2], False, np.float64),       # tiles of 1, no bias
    ("gru", 4, 1, 4, 7, 2, 6, 32, None, [4], False, np.float32),           # blocks 4, 5 idle
    ("rnn_tanh", 3, 3, 4, 9, 2, 3, 32, 2, [1, 3, 0], True, np.float64),
    ("lstm", 5, 1, 2, 7, 2, 7, 32, None, None, True, np.float32),          # U 1: lanes 8/16
    ("rnn_relu", 3, 3, 4, 7, 2, 2, 32, None, [3, 0, 2], True, np.float32),
    ("lstm", 3, 3, 4, 17, 2, 2, 32, 2, [3, 0, 1], True, np.float32),       # U 9: bwd lanes 1
    ("gru", 1, 3, 4, 7, 3, 2, 32, None, [1, 0, 1], True, np.float32),      # edges: T 1
    ("lstm", 4, 3, 4, 7, 1, 2, 32, None, [4, 2, 0], True, np.float64),     # L 1
    # the kernel-cell LSTM variants (each layer's own peephole vector in the stacked b_rec)
    ("lstm_peephole", 4, 3, 4, 7, 3, 2, 32, 2, [4, 0, 2], True, np.float32),
    ("cifg", 3, 3, 5, 9, 2, 3, 32, None, [3, 1, 0], False, np.float64),
    ("cifg_peephole", 4, 1, 3, 7, 2, 6, 32, None, [4], True, np.float32),   # blocks 4, 5 idle
    ("lstm_peephole", 3, 3, 3, 9, 2, 2, 64, None, None, False, np.float64),
]


def _case_id(c):
    cell, T, B, I, H, L, P, threads, bt, lengths, bias, dtype = c
    return (f"{cell}-T{T}-B{B}-H{H}-L{L}-P{P}-t{threads}{'-tile%d' % bt if bt else ''}"
            f"{'-len' if lengths else ''}{'' if bias else '-nobias'}-{np.dtype(dtype).name}")


def test_cases_cover_what_the_docstring_promises():
    cells, lanes_f, lanes_b, idle, tiles, zero, full = set(), set(), set(), False, False, 0, 0
    for cell, T, B, I, H, L, P, threads, bt, lengths, bias, dtype in CASES:
        cells.add(cell)
        U, tile = units_per_block(H, P), bt or B
        lanes_f.add(lanes_per_output(tile * GATES[cell] * U, threads))
        lanes_b.add(lanes_per_output(tile * U, threads))
        idle |= P * U - H >= U
        tiles |= tile < B
        assert P > 1 and 1 <= T <= 5 and 1 <= L <= 3 and H in (7, 9, 17) and B in (1, 3)
        if lengths:
            zero += 0 in lengths
            full += T in lengths
    assert {"lstm", "gru", "rnn_tanh", "rnn_relu", *KERNEL_CELLS} == cells
    assert 1 in lanes_f and max(lanes_f) >= 16 and 1 in lanes_b and max(lanes_b) >= 16
    assert idle and tiles and zero and full


def _b_rec(cell, p, H, dt):
    """What layer p's per-layer launch reads as b_rec (gpurnn.backends.cuda)."""
    if cell == "gru":
        return np.ascontiguousarray(p["bias_hh"]) if "bias_hh" in p else np.zeros(3 * H, dt)
    if PEEPHOLES.get(cell):
        return np.ascontiguousarray(p["weight_ch"])
    return np.zeros(1, dt)


def _names(cell):
    return ("h",) + (("c",) if has_cell_state(cell) else ()) + (
        ("gates",) if RESERVE_GATES[cell] else ())


def _per_layer_forward_fed(cell, args, l, gx_l, lengths, P, threads, bt):
    """Layer l's per-layer persistent recurrence (gpurnn.backends.cuda._recur_forward) fed the
    input pre-activations gx_l: (h, c, gates, y)."""
    x, p = args["x"], args["layers"][l]
    T, B, _ = x.shape
    H = p["weight_hh"].shape[1]
    dtype = np.dtype(x.dtype).name
    cfg = host.choose_launch(cell, H, H, B, dtype, RT.device, _layer_options(P, threads, bt, B))
    c0 = args["c0"][l] if args["c0"] is not None else None
    return host._recur_forward(RT, cell, cfg, np.ascontiguousarray(gx_l), p["weight_hh"],
                               _b_rec(cell, p, H, x.dtype), args["h0"][l], c0, lengths, 0, True,
                               x.dtype)


def _layer_forward(cell, x, p, h0, c0, lengths, opts):
    """One layer's per-layer launches: (y, h_n, c_n, {reserve name: array}); the variants by
    gpurnn.variants' lstm_forward on the sim runtime, the other cells by the sim backend."""
    if cell in KERNEL_CELLS:
        y, h_n, c_n, saved = host.run_lstm_forward(RT, form_of(cell), x, p, h0, c0, lengths,
                                                   False, True, opts)
        return y, h_n, c_n, dict(zip(("h", "c", "gates"), saved))
    y, h_n, c_n, res = sim.forward(cell, x, p["weight_ih"], p["weight_hh"], p.get("bias_ih"),
                                   p.get("bias_hh"), h0, c0, lengths, False, True, options=opts)
    return y, h_n, c_n, {name: getattr(res, name) for name in _names(cell)}


def _layer_backward(cell, x, p, kept, lengths, dy, dh_n, dc_n, opts):
    """One layer's per-layer backward: (dx, dh0, dc0, {param name: gradient})."""
    if cell in KERNEL_CELLS:
        return host.run_lstm_backward(RT, form_of(cell), x, p, tuple(kept[n] for n in
                                                                     _names(cell)),
                                      lengths, False, dy, dh_n, dc_n, opts)
    res = Reserve(cell=cell, backend="sim", reverse=False, x=x, w_ih=p["weight_ih"],
                  w_hh=p["weight_hh"], has_bias="bias_ih" in p, lengths=lengths, h=kept["h"],
                  c=kept.get("c"), gates=kept.get("gates"))
    g = sim.backward(res, dy, dh_n, dc_n, options=opts)
    grads = {"weight_ih": g.dw_ih, "weight_hh": g.dw_hh}
    if g.db_ih is not None:
        grads.update(bias_ih=g.db_ih, bias_hh=g.db_hh)
    return g.dx, g.dh0, g.dc0, grads


def _per_layer_backward(cell, args, l, x_l, kept, lengths, dy_l, dh_n, dc_n, P, threads, bt):
    return _layer_backward(cell, x_l, args["layers"][l], dict(zip(_names(cell), kept)),
                           lengths, dy_l, dh_n, dc_n, _layer_options(P, threads, bt,
                                                                     x_l.shape[1]))


def _chain(cell, args, cot, lengths, P, threads, bt):
    """The per-layer stack end to end: forward layer by layer (y of one is x of the next), then
    backward from the top (dx of one is dy of the one below)."""
    L = len(args["layers"])
    B = args["x"].shape[1]
    opts = _layer_options(P, threads, bt, B)
    inp, outs = args["x"], []
    for l, p in enumerate(args["layers"]):
        c0 = args["c0"][l] if args["c0"] is not None else None
        outs.append(_layer_forward(cell, inp, p, args["h0"][l], c0, lengths, opts))
        inp = outs[-1][0]
    dy, grads = cot["dy"], [None] * L
    for l in range(L - 1, -1, -1):
        dc = cot["dc_n"][l] if cot["dc_n"] is not None else None
        x_l = args["x"] if l == 0 else outs[l - 1][0]
        grads[l] = _layer_backward(cell, x_l, args["layers"][l], outs[l][3], lengths, dy,
                                   cot["dh_n"][l], dc, opts)
        dy = grads[l][0]
    return outs, grads


@pytest.mark.parametrize("cell,T,B,I,H,L,P,threads,bt,lengths,bias,dtype", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_wavefront_equals_the_per_layer_launches(request, cell, T, B, I, H, L, P, threads, bt,
                                                 lengths, bias, dtype):
    seed = zlib.crc32(request.node.callspec.id.encode())
    args, cot = make_case(cell, T, B, I, H, L, dtype, bias, seed)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    opts = _options(P, threads, bt)
    launches = []
    RT.launch_hook = launches.append
    try:
        with strict.record() as reports:
            # run_stack_forward / run_stack_backward, split where the launch's arrays show
            st = wf._stack_forward(RT, cell, args["x"], args["layers"], args["h0"], args["c0"],
                                   lengths, True, opts)
            out = wf._forward_results(np, cell, st, args["x"], L, True)
            saved = (out[3], out[4])
            bst = wf._stack_backward(RT, cell, args["x"], args["layers"], saved, lengths,
                                     cot["dy"], cot["dh_n"], cot["dc_n"], opts)
            grads = wf._backward_results(np, cell, bst, args["x"], args["layers"], saved,
                                         lengths)
    finally:
        RT.launch_hook = None
    # one launch each way, L*P blocks, one grid barrier per stage, zero findings
    assert all(r.findings == [] for r in reports)
    assert [d["kind"] for d in launches] == ["wavefront_fwd", "wavefront_bwd"]
    assert {(d["blocks"], d["threads"]) for d in launches} == {(L * P, threads)}
    assert [(r.grid[0], r.grid_barriers) for r in reports] == (
        [(L * P, T + L - 2), (L * P, T + L - 1)])

    y, h_n, c_n, reserves, outputs = out
    sdt = np.dtype(dtype)
    assert y.dtype == sdt and h_n.shape == (L, B, H) and len(reserves) == L == len(outputs)
    assert np.array_equal(y, outputs[-1])
    masked = (None if lengths is None
              else np.arange(T)[:, None] >= np.asarray(lengths)[None, :])

    # ---- forward, bit for bit, layer by layer
    chain, chain_grads = _chain(cell, args, cot, lengths, P, threads, bt)
    names = _names(cell)
    for l in range(L):
        gx_l = st.gx[:, l * B:(l + 1) * B]
        if l == 0:
            want = chain[0]
            assert np.array_equal(outputs[0], want[0]), "layer 0 y"
            assert np.array_equal(h_n[0], want[1]), "layer 0 h_n"
            if c_n is not None:
                assert np.array_equal(c_n[0], want[2]), "layer 0 c_n"
            for name, a in zip(names, reserves[0]):
                assert np.array_equal(a, want[3][name]), f"layer 0 reserve {name}"
        else:
            # the input pre-activations: a dot product here, a BLAS GEMM per layer (TOL)
            p = args["layers"][l]
            gemm = outputs[l - 1].astype(np.float64) @ p["weight_ih"].T.astype(np.float64)
            b = input_bias(cell, p.get("bias_ih"), p.get("bias_hh"))
            if b is not None:
                gemm = gemm + b
            assert_close(gx_l, gemm, TOL[dtype], f"layer {l} gx")
            h, c, g, yl = _per_layer_forward_fed(cell, args, l, gx_l, lengths, P, threads, bt)
            fed = {"h": h, "c": c, "gates": g}
            assert np.array_equal(outputs[l], yl), f"layer {l} y"
            for name, a in zip(names, reserves[l]):
                assert np.array_equal(a, fed[name]), f"layer {l} reserve {name}"
            assert np.array_equal(h_n[l], h[T]), f"layer {l} h_n"
        if masked is not None:
            assert np.all(outputs[l][masked] == 0), f"layer {l}: y must be 0 at masked steps"
    # the chained per-layer stack, end to end (differs from layer 1 on in the last bits)
    assert_close(y, chain[-1][0], TOL[dtype], "y vs the per-layer stack")
    assert_close(h_n, np.stack([c_[1] for c_ in chain]), TOL[dtype], "h_n")
    if c_n is not None:
        assert_close(c_n, np.stack([c_[2] for c_ in chain]), TOL[dtype], "c_n")

    # ---- backward, bit for bit, layer by layer (each fed the dy the wavefront formed)
    dx, dh0, dc0, wgrads = grads
    assert dx.dtype == sdt and dh0.shape == (L, B, H) and len(wgrads) == L
    assert np.array_equal(dh0, bst.dh0.astype(sdt))
    for l in range(L - 1, -1, -1):
        dy_l = bst.dy[:, l * B:(l + 1) * B]
        if l == L - 1:
            assert np.array_equal(dy_l, cot["dy"])
        x_l = args["x"] if l == 0 else outputs[l - 1]
        dc_n_l = cot["dc_n"][l] if cot["dc_n"] is not None else None
        g_dx, g_dh0, g_dc0, want = _per_layer_backward(
            cell, args, l, x_l, reserves[l], lengths, np.ascontiguousarray(dy_l), cot["dh_n"][l],
            dc_n_l, P, threads, bt)
        assert np.array_equal(dh0[l], g_dh0), f"layer {l} dh0"
        if dc0 is not None:
            assert np.array_equal(dc0[l], g_dc0), f"layer {l} dc0"
        assert set(wgrads[l]) == set(want) == (
            {"weight_ih", "weight_hh"} | ({"bias_ih", "bias_hh"} if bias else set())
            | ({"weight_ch"} if PEEPHOLES.get(cell) else set()))
        for name in want:
            assert wgrads[l][name].dtype == sdt
            assert np.array_equal(wgrads[l][name], want[name]), f"layer {l} {name}"
        if l == 0:
            assert np.array_equal(dx, g_dx), "dx"
        else:
            # the lower layer's dy: a dot product here, a GEMM per layer (TOL)
            assert_close(bst.dy[:, (l - 1) * B:l * B], g_dx, GRAD_TOL[dtype], f"layer {l} dx")
    # the chained per-layer stack's gradients, end to end
    gtol = GRAD_TOL[dtype]
    assert_close(dx, chain_grads[0][0], gtol, "dx vs the per-layer stack")
    assert_close(dh0, np.stack([g[1] for g in chain_grads]), gtol, "dh0")
    if dc0 is not None:
        assert_close(dc0, np.stack([g[2] for g in chain_grads]), gtol, "dc0")
    for l in range(L):
        for name, want in chain_grads[l][3].items():
            assert_close(wgrads[l][name], want, gtol, f"layer {l} {name} vs the per-layer stack")


def test_inference_forward_keeps_nothing_and_matches_training():
    args, _ = make_case("lstm", 3, 3, 4, 7, 2, np.float32, True, 5)
    lengths = np.array([3, 1, 2])
    a = (RT, "lstm", args["x"], args["layers"], args["h0"], args["c0"], lengths)
    y, h_n, c_n, reserves, outputs = wf.run_stack_forward(*a, False, _options(2, 32, None))
    want = wf.run_stack_forward(*a, True, _options(2, 32, None))
    assert reserves is None
    for got, exp in zip((y, h_n, c_n), want[:3]):
        assert np.array_equal(got, exp)


def test_backward_is_deterministic_and_none_cotangents_are_zero():
    args, cot = make_case("gru", 3, 3, 4, 7, 2, np.float32, True, 6)
    lengths = np.array([3, 0, 2])
    opts = _options(2, 32, None)
    out = wf.run_stack_forward(RT, "gru", args["x"], args["layers"], args["h0"], None, lengths,
                               True, opts)
    saved = (out[3], out[4])
    first = wf.run_stack_backward(RT, "gru", args["x"], args["layers"], saved, lengths,
                                  cot["dy"], cot["dh_n"], None, opts)
    second = wf.run_stack_backward(RT, "gru", args["x"], args["layers"], saved, lengths,
                                   cot["dy"], cot["dh_n"], None, opts)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    for a, b in zip(first[3], second[3]):
        assert all(np.array_equal(a[n], b[n]) for n in a)
    zeros = wf.run_stack_backward(RT, "gru", args["x"], args["layers"], saved, lengths,
                                  None, None, None, opts)
    assert not zeros[0].any() and not zeros[1].any()


def test_none_initial_states_are_zeros():
    args, _ = make_case("lstm", 3, 1, 4, 7, 2, np.float32, True, 9)
    opts = _options(2, 32, None)
    a = (RT, "lstm", args["x"], args["layers"])
    got = wf.run_stack_forward(*a, None, None, None, False, opts)
    z = np.zeros_like(args["h0"])
    want = wf.run_stack_forward(*a, z, z, None, False, opts)
    assert all(np.array_equal(g, w) for g, w in zip(got[:3], want[:3]))


def test_weights_are_read_once_per_launch():
    # persistence, measured: every element of the stacked W_hh and W_ih is loaded from global
    # memory once per launch (per layer that holds it), whatever T is
    for T in (3, 5):
        args, cot = make_case("lstm", T, 2, 3, 7, 3, np.float32, True, 7)
        opts = _options(2, 32, None)
        with strict.record() as reports:
            out = wf.run_stack_forward(RT, "lstm", args["x"], args["layers"], args["h0"],
                                       args["c0"], None, True, opts)
            wf.run_stack_backward(RT, "lstm", args["x"], args["layers"], (out[3], out[4]), None,
                                  cot["dy"], cot["dh_n"], cot["dc_n"], opts)
        assert len(reports) == 2
        for r in reports:
            for name in ("w_hh", "w_ih"):
                reads = r.traffic[name].reads
                assert (reads == 1).all(), (r.kernel, name, T)
                assert r.traffic[name].total_writes == 0


def test_bad_inputs_are_refused():
    args, _ = make_case("lstm", 3, 2, 4, 7, 2, np.float32, True, 8)
    a = (RT, "lstm", args["x"], args["layers"], args["h0"], args["c0"], None, True)
    with pytest.raises(ValueError, match="cannot be co-resident"):
        wf.run_stack_forward(*a, {"blocks": 100000, "threads": 32})
    with pytest.raises(ValueError, match="one persistent launch"):
        wf.run_stack_forward(*a, {"path": "stepwise"})
    bad = [dict(args["layers"][0]), {**args["layers"][1],
                                     "weight_hh": np.zeros((28, 5), np.float32)}]
    with pytest.raises(ValueError, match="one hidden size"):
        wf.run_stack_forward(RT, "lstm", args["x"], bad, args["h0"], args["c0"], None, True, None)
    with pytest.raises(ValueError, match="the wavefront runs"):
        wf.run_stack_forward(RT, "mlstm", args["x"], args["layers"], args["h0"], args["c0"], None,
                             True, None)
    # a peephole stack without (or with a wrong) peephole vector
    with pytest.raises(ValueError, match=r"layer 0: lstm_peephole needs weight_ch of shape \(21,\); "
                                         r"got None"):
        wf.run_stack_forward(RT, "lstm_peephole", *a[2:], None)
    short = [{**p, "weight_ch": np.zeros(14, np.float32)} for p in args["layers"]]
    with pytest.raises(ValueError, match=r"layer 0: lstm_peephole needs weight_ch .* got \(14,\)"):
        wf.run_stack_forward(RT, "lstm_peephole", args["x"], short, *a[4:], None)


STOCK_SCRIPT = """
import os
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"     # before numba.cuda's first import
import numpy as np
from gpurnn.backends import sim, cuda_wavefront as wf
rng = np.random.default_rng(3)
T, B, I, H, L = 3, 2, 3, 7, 2
r = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float32)
layers = [{"weight_ih": r(28, I if l == 0 else H), "weight_hh": r(28, H)} for l in range(L)]
x, h0, c0, dy, dhn, dcn = r(T, B, I), r(L, B, H), r(L, B, H), r(T, B, H), r(L, B, H), r(L, B, H)
opts = {"blocks": 2, "threads": 32}
log = []
sim.STOCK_RUNTIME.launch_hook = log.append
sim.RUNTIME.launch_hook = log.append
out = wf.run_stack_forward(sim.STOCK_RUNTIME, "lstm", x, layers, h0, c0, np.array([3, 1]), True,
                           opts)
g = wf.run_stack_backward(sim.STOCK_RUNTIME, "lstm", x, layers, (out[3], out[4]), np.array([3, 1]),
                          dy, dhn, dcn, opts)
ref = wf.run_stack_forward(sim.RUNTIME, "lstm", x, layers, h0, c0, np.array([3, 1]), True, opts)
gr = wf.run_stack_backward(sim.RUNTIME, "lstm", x, layers, (ref[3], ref[4]), np.array([3, 1]),
                           dy, dhn, dcn, opts)
# forward: the same bits here; backward: within float32 rounding (Numba's simulator runs
# math.tanh in float64, /work/shared/DESIGN.md section 4; the strict one keeps float32 math)
assert all(np.array_equal(a, b) for a, b in zip(out[:3], ref[:3]))
assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g[:3], gr[:3]))
fwd = [d["step_range"] for d in log if d["kind"] == "wavefront_fwd" and d["simulator"] == "stock"]
bwd = [d["step_range"] for d in log if d["kind"] == "wavefront_bwd" and d["simulator"] == "stock"]
assert fwd == [(s, s + 1) for s in range(T + L - 1)], fwd
assert bwd == [(s, s + 1) for s in range(T + L)], bwd
print("STOCK-OK")
"""


def test_stock_simulator_launches_once_per_stage_in_a_fresh_process():
    # Numba's own simulator: its grid.sync() only synchronises a block, so the host launches
    # each stage on its own (the launch boundary is the grid barrier); same bits as the strict
    r = run_fresh(STOCK_SCRIPT, timeout=120)
    assert r.returncode == 0 and "STOCK-OK" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- the plan

def test_fit_uses_the_kernels_smem_model_and_fills_the_device():
    f = planning.fit("lstm", 512, 8, 2, "float32", "H100")
    assert f.fits and f.blocks <= f.coop
    assert f.units == units_per_block(512, f.blocks_per_layer)
    assert f.smem_fwd == kernels.smem_bytes("fwd", 4, 512, f.batch_tile, f.units, "float32",
                                            threads=f.threads)
    assert f.smem_bwd == kernels.smem_bytes("bwd", 4, 512, f.batch_tile, f.units, "float32",
                                            threads=f.threads)
    assert f.smem <= f.device.smem_per_block_optin
    # the stack's weights cost twice a layer's per block: the wavefront's capacity is below a
    # single layer's, and falls with L (more blocks share the SMs)
    from gpurnn import planning as lstm_planning
    one = lstm_planning.capacity("lstm", "float32", "H100", 1)
    c2 = planning.capacity("lstm", 2, "float32", "H100", 1)
    c4 = planning.capacity("lstm", 4, "float32", "H100", 1)
    assert 0 < c4 < c2 < one, (c4, c2, one)
    assert planning.fit("lstm", c2, 1, 2, "float32", "H100").fits
    assert not planning.fit("lstm", c2 + 1, 1, 2, "float32", "H100").fits


def test_fit_refuses_blocks_that_leave_too_few_registers():
    # 512 threads leave 128 registers a thread, under the kernels' kernels.REGS_MAX
    f = planning.fit("cifg_peephole", 64, 1, 2, "float32", "H100", threads=512)
    assert not f.fits and any("registers per thread" in r for r in f.reasons), f.reasons
    assert planning.fit("cifg_peephole", 64, 1, 2, "float32", "H100", threads=256).fits
    c = planning.choose("lstm_peephole", 64, 64, 1, 2, 16, "float32", "H100", threads=512)
    assert c.choice == "per_layer"


def test_smem_regions_hold_both_weight_slices():
    for G, H, bt, U, threads in ((4, 7, 3, 4, 32), (3, 9, 2, 3, 32), (1, 7, 1, 1, 64)):
        wf_, rf = kernels.smem_regions("fwd", G, H, bt, U, threads)
        wb, rb = kernels.smem_regions("bwd", G, H, bt, U, threads)
        assert 2 * G * U * H <= wf_ < 2 * G * U * (H + 32)
        assert 2 * U * G * H <= wb < 2 * U * (G * H + 32)
        assert rf == 2 * bt * H + bt * G * U + 2 * threads and rb == 2 * bt * G * H + 2 * threads


def test_choose_says_which_and_why():
    c = planning.choose("lstm", 256, 256, 1, 4, 128, "float32", "H100")
    assert c.choice in ("wavefront", "per_layer") and c.wavefront_s and c.per_layer_s
    assert any("model (unmeasured)" in r for r in c.reasons)
    assert (c.choice == "wavefront") == (c.wavefront_s[1] < c.per_layer_s[1])
    # small batch, many layers: T+L-1 stages against L*T steps wins
    assert c.choice == "wavefront"
    assert planning.choose("lstm", 256, 256, 1, 4, 128, "float32", "H100",
                           dropout=0.1).choice == "per_layer"
    big = planning.choose("lstm", 4096, 4096, 8, 4, 128, "float32", "H100")
    assert big.choice == "per_layer" and big.wavefront_s is None and not big.fit.fits
    s = planning.choose("lstm", 4, 7, 3, 2, 4, "float32", "sim")
    assert s.choice == "wavefront" and s.wavefront_s is None


def test_the_table_has_every_row(capsys):
    planning.print_table()
    text = capsys.readouterr().out.strip()
    assert text == planning.table()
    rows = [line.split() for line in text.splitlines()[2:]]
    assert len(rows) == 2 * 2 * 3
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (str(L), str(H), str(B)) for L in (2, 4) for H in (256, 512) for B in (1, 8, 64)}
    assert all(r[-1] in ("wavefront", "per_layer") for r in rows)


# ---------------------------------------------------------------- static compilation

@pytest.fixture(scope="module")
def rows():
    return compile_rows("gpurnn.kernels.wavefront:specializations")


@needs_ptxas
def test_every_wavefront_kernel_compiles_without_spills(rows):
    names = {sp.name for sp in kernels.specializations()}
    assert len(names) == len(kernels.WAVEFRONT_CELLS) * len(kernels.DTYPES) * 2 == 7 * 2 * 2
    assert compiled_pairs(rows) == wanted_pairs(names)
    assert compile_errors(rows) == []
    assert spilled(rows) == []
    for r in rows:
        assert r.linked_cudadevrt and r.grid_sync, r.kernel
        assert 0 < r.registers <= kernels.REGS_MAX, (r.kernel, r.arch, r.registers)
    # the plain cells stay within the registry kernels' budget
    assert max(r.registers for r in rows if r.cell in ("lstm", "rnn_tanh", "rnn_relu", "gru")
               ) <= KERNEL_REGS_MAX


@needs_ptxas
def test_static_plus_planned_dynamic_smem_fits(rows):
    for r in rows:
        dev = "A100" if r.arch == "sm_80" else "H100"
        cell = r.kernel.split("_wavefront_")[0]
        f = planning.fit(cell, 256, 1, 2, r.dtype, dev)
        assert f.fits
        dyn = f.smem_fwd if r.kind == "wavefront_fwd" else f.smem_bwd
        assert r.static_smem + dyn <= f.device.smem_per_block_optin, r.kernel


# ---------------------------------------------------------------- mutants

SOURCE, LINES, BARRIER_LINES = kernel_source(kernels)
# (cell, T, B, H, L, P, threads, batch_tile): tiles with lanes > 1 (forward and backward) and
# lanes 1 (forward), one-unit blocks, idle blocks
MUTANT_CASES = [
    ("lstm", 3, 3, 7, 2, 2, 32, 2),    # fwd lanes 1 with tiles; bwd lanes 4 with tiles
    ("gru", 3, 3, 9, 3, 3, 32, 1),     # tiles of 1: fwd lanes 2, bwd lanes 8
    ("rnn_tanh", 3, 1, 7, 2, 6, 32, None),
    ("lstm", 3, 3, 17, 2, 2, 32, 2),   # lanes 1 both ways, with tiles
]


def test_the_source_has_the_barriers_the_docstring_promises():
    kinds = barrier_kinds(LINES, BARRIER_LINES)
    assert kinds.count("_grid_group_sync(grid)") == 2      # one per stage, each kernel
    # forward: between tiles, staging, scratch, pre; grid. backward: between tiles, staging,
    # scratch; grid.
    assert barriers_before_and_after(LINES, BARRIER_LINES, "def make_bwd") == (4 + 1, 3 + 1)


def _build(module, spec):
    factory = module.make_fwd if spec.kind == "wavefront_fwd" else module.make_bwd
    return factory(spec.cell, spec.dtype)


def mutant_runtime(source, tag):
    """The strict sim backend with the wavefront kernels taken from `source` rebuilt as a
    module."""
    return MutantRuntime(mutant_module(source, tag, kernels, "wavefront"),
                         lambda spec: spec.kind.startswith("wavefront"), _build)


def _run(rt, case, seed):
    cell, T, B, H, L, P, threads, bt = case
    args, cot = make_case(cell, T, B, 3, H, L, np.float32, True, seed)
    lengths = staggered_lengths(T, B)
    opts = _options(P, threads, bt)
    out = wf.run_stack_forward(rt, cell, args["x"], args["layers"], args["h0"], args["c0"],
                               lengths, True, opts)
    g = wf.run_stack_backward(rt, cell, args["x"], args["layers"], (out[3], out[4]), lengths,
                              cot["dy"], cot["dh_n"], cot["dc_n"], opts)
    return [out[0], out[1], g[0], g[1]] + [a[n] for a in g[3] for n in sorted(a)]


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
    caught_by, SOURCE, LINES, BARRIER_LINES, "wavefront.py", "nu = max(0, min(units, H - u0))",
    "nu == 0")


@pytest.mark.mutation
def test_a_layer_skipping_a_stage_barrier_is_caught():
    # a layer with no step at a stage leaving the loop instead of joining the barrier
    hits = anchor_hits(LINES, "if t >= 0 and t < T:            # uniform over the block")
    assert len(hits) == 1
    found = caught_by(with_return(LINES, hits[0], "t >= T", before=True), "skip-stage")
    assert found is not None and "hang" in found, found
