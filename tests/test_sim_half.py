"""16-bit storage (float16, bfloat16) with fp32 compute: the kernels in the strict simulator
against the float32 NumPy reference run on the same rounded inputs.

Tolerance budget, per dtype, from its unit roundoff u (float16 2^-11 = 4.9e-4, bfloat16
2^-8 = 3.9e-3): the kernels store h, y and the reserve gates in 16 bits every step (each a
relative error <= u), and the reference keeps them in float32. Over the T <= 5 steps here,
with saturating activations and weights of scale 0.5, an output or state differs by a few u
(budget 8u); a gradient multiplies several stored gates and states (budget 16u): the 16-bit rows
of gpurnn.testing.TOL and GRAD_TOL. Inputs are rounded to the 16-bit dtype before both runs, so
what remains is the kernels' own rounding.
"""
import zlib

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import numpy as ref
from gpurnn.backends import sim
from gpurnn.cells import CELLS, GATES
from gpurnn.kernels import layout
from gpurnn.kernels.cellmath import codec
from gpurnn.testing import GRAD_TOL, TOL, rel_err
from numba import cuda

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 arrays need the ml_dtypes package")

pytestmark = pytest.mark.sim

_LOAD_BF16, _STORE_BF16 = codec("bfloat16")

DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def case(cell, T, B, I, H, dtype, seed):
    rng = np.random.default_rng(seed)
    G, dt = GATES[cell], DTYPES[dtype]

    def r(*shape):
        return (0.5 * rng.standard_normal(shape)).astype(dt)
    args = dict(x=r(T, B, I), w_ih=r(G * H, I), w_hh=r(G * H, H), b_ih=r(G * H), b_hh=r(G * H),
                h0=r(B, H), c0=r(B, H) if cell == "lstm" else None)
    cot = dict(dy=r(T, B, H), dh_n=r(B, H), dc_n=r(B, H) if cell == "lstm" else None)
    return args, cot


def widen(d):
    return {k: None if v is None else v.astype(np.float32) for k, v in d.items()}


def fwd(backend, cell, a, lengths, reverse, **kw):
    return backend.forward(cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"],
                           a["c0"], lengths, reverse, True, **kw)


# (cell, T, B, H, options): persistent with several blocks (one with batch tiles that do not
# divide B) and stepwise, over the cells
PATHS = [({"path": "persistent", "blocks": 2}, "P2"),
         ({"path": "persistent", "blocks": 3, "batch_tile": 2}, "P3-tile2"),
         ({"path": "stepwise"}, "stepwise")]
CASES = [(cell, dtype, opts, tag) for cell in CELLS for dtype in DTYPES for opts, tag in PATHS
         if not (tag == "P3-tile2" and cell.startswith("rnn_relu"))]


@pytest.mark.parametrize("cell,dtype,options,tag", CASES,
                         ids=[f"{c}-{d}-{t}" for c, d, _, t in CASES])
def test_16bit_kernels_match_fp32_reference(request, cell, dtype, options, tag):
    T, B, I, H = 4, 3, 4, 7
    args, cot = case(cell, T, B, I, H, dtype, zlib.crc32(request.node.callspec.id.encode()))
    lengths = np.array([4, 1, 3], np.int64)
    reverse = cell == "gru"
    with strict.record() as reports:
        out = fwd(sim, cell, args, lengths, reverse, options=options)
        grads = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    assert all(not r.findings for r in reports)
    want = fwd(ref, cell, widen(args), lengths, reverse)
    wcot = widen(cot)
    want_grads = ref.backward(want[3], wcot["dy"], wcot["dh_n"], wcot["dc_n"])

    sdt = DTYPES[dtype]
    assert out[0].dtype == sdt and out[1].dtype == sdt
    assert out[3].h.dtype == sdt and out[3].w_hh.dtype == sdt
    if cell == "lstm":
        assert out[2].dtype == sdt and out[3].c.dtype == np.float32     # the cell state: fp32
    if out[3].gates is not None:
        assert out[3].gates.dtype == sdt
    for name, a, b in (("y", out[0], want[0]), ("h_n", out[1], want[1]),
                       ("c_n", out[2], want[2])):
        if b is not None:
            assert rel_err(a, b) <= TOL[dtype], (name, rel_err(a, b))
    masked = np.arange(T)[:, None] >= lengths[None, :]
    assert np.all(np.asarray(out[0], np.float32)[masked] == 0)
    for name in grads._fields:
        a, b = getattr(grads, name), getattr(want_grads, name)
        if b is None:
            assert a is None
            continue
        assert a.dtype == sdt, (name, a.dtype)          # parameter / input dtype
        assert rel_err(a, b) <= GRAD_TOL[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_16bit_weights_take_half_the_shared_memory_and_are_read_once(dtype):
    cell, T, B, I, H, P = "lstm", 3, 2, 4, 9, 2
    args, cot = case(cell, T, B, I, H, dtype, 7)
    with strict.record() as reports:
        out = fwd(sim, cell, args, None, False, options={"path": "persistent", "blocks": P})
        sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    U = layout.units_per_block(H, P)
    for r, direction in zip(reports, ("fwd", "bwd")):
        assert r.shared_bytes == layout.smem_bytes_for(direction, 4, H, B, U, dtype,
                                                       threads=r.block[0])
        assert r.shared_bytes < layout.smem_bytes_for(direction, 4, H, B, U, "float32",
                                                      threads=r.block[0])
        assert (r.traffic["w_hh"].reads == 1).all()


def _roundtrip(vals, words, back):
    i = cuda.threadIdx.x
    if i < vals.shape[0]:
        words[i] = _STORE_BF16(vals[i])
        back[i] = _LOAD_BF16(words[i])


def test_bfloat16_rounding_is_nearest_even_like_ml_dtypes():
    vals = np.array([1.0, -2.7, 3.0e38, -1e-40, np.inf, -np.inf, 1.00390625, 1.01171875,
                     1.0078125, 65504.0, -0.0, np.nan], np.float32)
    words = np.zeros(vals.shape, np.uint16)
    back = np.zeros(vals.shape, np.float32)
    strict.launch(_roundtrip, 1, 32, (vals, words, back))
    want = vals[:-1].astype(ml_dtypes.bfloat16)
    assert np.array_equal(words[:-1], want.view(np.uint16))
    assert np.array_equal(back[:-1], want.astype(np.float32))
    assert words[-1] == 0x7FC0 and np.isnan(back[-1])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_functional_api_takes_16bit_on_numpy_and_sim(dtype):
    from gpurnn import functional as F
    args, cot = case("lstm", 3, 2, 4, 7, dtype, 11)
    outs = {}
    for backend in ("numpy", "sim"):
        y, h_n, c_n, res = F.lstm_forward(args["x"], args["w_ih"], args["w_hh"], args["b_ih"],
                                          args["b_hh"], args["h0"], args["c0"], backend=backend)
        grads = F.lstm_backward(res, cot["dy"], cot["dh_n"], cot["dc_n"])
        assert y.dtype == DTYPES[dtype] and grads.dw_hh.dtype == DTYPES[dtype]
        outs[backend] = (y, grads)
    assert rel_err(outs["sim"][0], outs["numpy"][0]) <= TOL[dtype]
    for name in outs["numpy"][1]._fields:
        assert rel_err(getattr(outs["sim"][1], name), getattr(outs["numpy"][1], name)) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_modules_in_16bit_on_the_strict_simulator(dtype):
    import gpurnn
    x = np.random.default_rng(12).standard_normal((3, 2, 4)).astype(DTYPES[dtype])
    mods = {b: gpurnn.GRU(4, 7, num_layers=2, bidirectional=True, dtype=dtype, seed=3, backend=b)
            for b in ("numpy", "sim")}
    outs = {b: m(x, lengths=np.array([3, 2])) for b, m in mods.items()}
    assert outs["sim"][0].dtype == DTYPES[dtype]
    assert rel_err(outs["sim"][0], outs["numpy"][0]) <= TOL[dtype]
    dy = np.ones(outs["sim"][0].shape, DTYPES[dtype])
    for m in mods.values():
        m.backward(dy)
    for name, g in mods["numpy"].grads.items():
        assert mods["sim"].grads[name].dtype == DTYPES[dtype]
        assert rel_err(mods["sim"].grads[name], g) <= GRAD_TOL[dtype], name
