"""Zoneout and variational recurrent dropout (gpurnn/layernorm.py's contract) in the kernel
backends: the four kernel cells' regularised specializations in gpurnn's strict simulator,
against the NumPy reference with the same fixed masks — outputs, h_n, c_n, the reserve (c holds
c_t after zoneout) and every gradient, zero findings.

The strict simulator runs every block of a launch at once with a real grid barrier, so the
persistent cases run P > 1 blocks (P not dividing H) in ONE launch over all steps; any race,
barrier error, out-of-bounds index or uninitialised shared read fails the call. The cases are a
covering set: each cell meets the persistent path with several blocks and the stepwise path,
with zoneout and recurrent dropout together and separately, lengths (a length 0 and a length T)
and reverse; H 7 and 33, B 1 and 3, bias=False, float32/float64 and 16-bit storage. Every case
also checks that its masks matter (the reference with them differs from the reference without),
so a kernel that ignored a mask could not pass.
"""
import zlib

import numpy as np
import pytest

from gpurnn import sim as strict
from gpurnn.backends import numpy as ref
from gpurnn.backends import sim
from gpurnn.cells import CELLS, GATES
from gpurnn.kernels import registry
from gpurnn.kernels.cellmath import REGULARISED_CELLS
from gpurnn.testing import GRAD_TOL, TOL, assert_close, rel_err

pytestmark = pytest.mark.sim

ALL = ("recurrent", "zoneout_h", "zoneout_c")


def make_case(cell, T, B, I, H, dtype, bias, seed):
    rng = np.random.default_rng(seed)
    G = GATES[cell]

    def r(*shape):
        return (0.5 * rng.standard_normal(shape)).astype(dtype)
    args = dict(x=r(T, B, I), w_ih=r(G * H, I), w_hh=r(G * H, H),
                b_ih=r(G * H) if bias else None, b_hh=r(G * H) if bias else None,
                h0=r(B, H), c0=r(B, H) if cell == "lstm" else None)
    cot = dict(dy=r(T, B, H), dh_n=r(B, H), dc_n=r(B, H) if cell == "lstm" else None)
    return args, cot, rng


def make_noise(cell, keys, T, B, H, cdt, rng, p=0.4):
    """Training masks: recurrent 0 or 1/(1-p) per (row, unit), zoneout Bernoulli(p); each
    holds both of its values (so that every branch of the kernels' mask use is taken)."""
    noise = {}
    for key in keys:
        if key == "zoneout_c" and cell != "lstm":
            continue
        shape = (B, H) if key == "recurrent" else (T, B, H)
        keep = rng.random(shape) < (1 - p if key == "recurrent" else p)
        keep.flat[0], keep.flat[-1] = True, False
        if key == "recurrent":
            noise[key] = (keep / (1 - p)).astype(cdt)
        else:
            noise[key] = keep.astype(cdt)
    return noise


def fwd(backend, cell, a, lengths, reverse, **kw):
    return backend.forward(cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"],
                           a["c0"], lengths, reverse, True, **kw)


def _options(P, threads=32):
    if P == "stepwise":
        return {"path": "stepwise", "threads": threads}
    return {"path": "persistent", "blocks": P, "threads": threads}


# (cell, T, B, I, H, P or "stepwise", lengths, reverse, bias, dtype, keys)
CASES = []
for _cell in CELLS:
    _z = ("zoneout_h", "zoneout_c") if _cell == "lstm" else ("zoneout_h",)
    CASES += [
        (_cell, 4, 3, 3, 7, 3, [4, 0, 2], False, True, np.float32, ALL),      # P=3: 3, 3, 1
        (_cell, 3, 1, 3, 33, 2, None, True, False, np.float64, ALL),          # P=2: 17, 16
        (_cell, 4, 3, 3, 7, "stepwise", [1, 4, 3], True, True, np.float32, ALL),
        (_cell, 3, 3, 3, 7, 2, [3, 1, 2], True, True, np.float64, ("recurrent",)),
        (_cell, 3, 1, 3, 33, "stepwise", None, True, True, np.float32, ("recurrent",)),
        (_cell, 3, 3, 3, 33, 4, [2, 3, 1], False, True, np.float32, _z),     # P=4: 9, 9, 9, 6
        (_cell, 3, 3, 3, 7, "stepwise", None, False, False, np.float64, _z),
    ]
CASES += [
    ("lstm", 3, 3, 3, 7, 2, [2, 3, 0], False, True, np.float32, ("zoneout_c",)),
    ("lstm", 3, 3, 3, 7, "stepwise", [3, 1, 2], True, True, np.float32, ("zoneout_h",)),
]


def _case_id(case):
    cell, T, B, I, H, P, lengths, reverse, bias, dtype, keys = case
    where = "stepwise" if P == "stepwise" else f"P{P}"
    noise = "+".join({"recurrent": "rec", "zoneout_h": "zh", "zoneout_c": "zc"}[k] for k in keys)
    return (f"{cell}-B{B}-H{H}-{where}{'-len' if lengths else ''}{'-rev' if reverse else ''}"
            f"{'' if bias else '-nobias'}-{np.dtype(dtype).name}-{noise}")


@pytest.fixture
def launches(monkeypatch):
    log = []
    monkeypatch.setattr(sim.RUNTIME, "launch_hook", log.append)
    return log


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_numpy_reference_with_fixed_masks(request, case, launches):
    cell, T, B, I, H, P, lengths, reverse, bias, dtype, keys = case
    args, cot, rng = make_case(cell, T, B, I, H, dtype, bias,
                               zlib.crc32(request.node.callspec.id.encode()))
    noise = make_noise(cell, keys, T, B, H, dtype, rng)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    tol = TOL[dtype]
    with strict.record() as reports:
        out = fwd(sim, cell, args, lengths, reverse, options=_options(P), noise=noise)
        grads = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    want = fwd(ref, cell, args, lengths, reverse, noise=noise)
    want_grads = ref.backward(want[3], cot["dy"], cot["dh_n"], cot["dc_n"])

    # zero findings, only the regularised kernels ran, persistent: P blocks, ONE launch each way
    assert reports and all(r.findings == [] for r in reports)
    assert all("_reg_" in r.kernel for r in reports), [r.kernel for r in reports]
    if P != "stepwise":
        assert [(d["kind"], d["blocks"], d["step_range"]) for d in launches] == [
            ("persistent_fwd", P, (0, T)), ("persistent_bwd", P, (0, T + 1))]
        assert H % P != 0

    y, h_n, c_n, res = out
    assert res.noise is noise                   # the Reserve keeps the forward's masks
    assert_close(y, want[0], tol, "y")
    assert_close(h_n, want[1], tol, "h_n")
    if cell == "lstm":
        assert_close(c_n, want[2], tol, "c_n")
        assert_close(res.c, want[3].c, tol, "reserve.c (c_t after zoneout)")
    else:
        assert c_n is None
    assert_close(res.h, want[3].h, tol, "reserve.h")
    if want[3].gates is not None:
        assert_close(res.gates, want[3].gates, tol, "reserve.gates")
    if lengths is not None:
        padded = np.arange(T)[:, None] >= lengths[None, :]
        assert np.all(y[padded] == 0), "y must be exactly 0 at padded steps"
    for name in want_grads._fields:
        a, b = getattr(grads, name), getattr(want_grads, name)
        assert (a is None) == (b is None), name
        if b is not None:
            assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
            assert_close(a, b, tol, name)

    # the masks matter: without them the reference is a different function
    plain = fwd(ref, cell, args, lengths, reverse)
    plain_grads = ref.backward(plain[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    assert not np.allclose(plain[0], want[0]) or not np.allclose(plain_grads.dw_hh,
                                                                   want_grads.dw_hh)


def test_cases_cover_every_cell_path_and_mask_combination():
    seen = {(c[0], "stepwise" if c[5] == "stepwise" else "persistent", c[10]) for c in CASES}
    for cell in CELLS:
        for path in ("persistent", "stepwise"):
            assert (cell, path, ALL) in seen, (cell, path)
            assert any(s[0] == cell and s[1] == path and s[2] == ("recurrent",) for s in seen)
            assert any(s[0] == cell and s[1] == path and "recurrent" not in s[2] for s in seen)
    for keys in (("zoneout_h",), ("zoneout_c",)):  # each LSTM zoneout mask alone, somewhere
        assert any(s[0] == "lstm" and s[2] == keys for s in seen), keys
    assert any(c[6] and 0 in c[6] for c in CASES) and any(c[6] and c[1] in c[6] for c in CASES)
    assert {c[2] for c in CASES} == {1, 3} and {c[4] for c in CASES} == {7, 33}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("P", [2, "stepwise"])
def test_neutral_masks_give_the_plain_kernels_results_bit_for_bit(cell, P):
    # all-zero zoneout and an all-one recurrent mask: the regularised specialization computes
    # exactly what the plain one does (multiplying by 1 and adding 0 * x are exact)
    T, B, I, H = 3, 2, 3, 7
    args, cot, _ = make_case(cell, T, B, I, H, np.float32, True, 5)
    lengths = np.array([3, 2], np.int64)
    noise = {"recurrent": np.ones((B, H), np.float32),
             "zoneout_h": np.zeros((T, B, H), np.float32)}
    if cell == "lstm":
        noise["zoneout_c"] = np.zeros((T, B, H), np.float32)
    with strict.record() as reports:
        out = fwd(sim, cell, args, lengths, False, options=_options(P), noise=noise)
        grads = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
        plain = fwd(sim, cell, args, lengths, False, options=_options(P))
        plain_grads = sim.backward(plain[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    names = [r.kernel for r in reports]
    half = len(names) // 2
    assert all("_reg_" in n for n in names[:half]) and not any("_reg_" in n for n in names[half:])
    for a, b in zip(out[:3], plain[:3]):
        assert (a is None and b is None) or np.array_equal(a, b)
    for name in grads._fields:
        a, b = getattr(grads, name), getattr(plain_grads, name)
        assert (a is None and b is None) or np.array_equal(a, b), name


@pytest.mark.parametrize("noise", [None, {}], ids=["None", "empty"])
def test_no_regulariser_runs_the_plain_kernels(noise):
    args, cot, _ = make_case("gru", 3, 2, 3, 7, np.float32, True, 3)
    with strict.record() as reports:
        out = fwd(sim, "gru", args, None, False, options=_options(2), noise=noise)
        sim.backward(out[3], cot["dy"], cot["dh_n"], None)
    assert [r.kernel for r in reports] == ["gru_persistent_fwd_f32", "gru_persistent_bwd_f32"]
    assert out[3].noise is None


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_evaluation_masks_filled_with_p(cell):
    # evaluation passes zoneout masks filled with p (the expectation p*prev + (1-p)*new); with
    # 0 < d < 1 every part of the split counts, and the RNN's backward must recover its h~ from
    # h_t (with 0/1 masks that recovery is the identity or multiplied by 0)
    T, B, I, H, p = 3, 3, 3, 7, 0.3
    args, cot, _ = make_case(cell, T, B, I, H, np.float64, True, 9)
    noise = {"zoneout_h": np.full((T, B, H), p)}
    if cell == "lstm":
        noise["zoneout_c"] = np.full((T, B, H), p)
    lengths = np.array([3, 1, 2], np.int64)
    out = fwd(sim, cell, args, lengths, False, options=_options(3), noise=noise)
    grads = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    want = fwd(ref, cell, args, lengths, False, noise=noise)
    want_grads = ref.backward(want[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    assert_close(out[0], want[0], TOL["float64"], "y")
    for name in want_grads._fields:
        b = getattr(want_grads, name)
        if b is not None:
            assert_close(getattr(grads, name), b, TOL["float64"], name)


@pytest.mark.parametrize("cell", CELLS)
def test_float16_storage_with_masks(cell):
    # 16-bit storage: h, y and the gates in float16, the masks and the math in float32, against
    # the float32 reference on the same rounded inputs (gpurnn.testing's 16-bit budgets)
    T, B, I, H = 3, 3, 3, 7
    args, cot, rng = make_case(cell, T, B, I, H, np.float16, True, 21)
    noise = make_noise(cell, ALL, T, B, H, np.float32, rng)
    lengths = np.array([3, 1, 2], np.int64)
    P = 2 if cell in ("lstm", "rnn_tanh") else "stepwise"
    out = fwd(sim, cell, args, lengths, True, options=_options(P), noise=noise)
    grads = sim.backward(out[3], cot["dy"], cot["dh_n"], cot["dc_n"])
    wide = {k: None if v is None else v.astype(np.float32) for k, v in {**args, **cot}.items()}
    want = fwd(ref, cell, wide, lengths, True, noise=noise)
    want_grads = ref.backward(want[3], wide["dy"], wide["dh_n"], wide["dc_n"])
    assert out[0].dtype == np.float16
    for name, a, b in (("y", out[0], want[0]), ("h_n", out[1], want[1]), ("c_n", out[2], want[2])):
        if b is not None:
            assert rel_err(a, b) <= TOL["float16"], (name, rel_err(a, b))
    for name in want_grads._fields:
        a, b = getattr(grads, name), getattr(want_grads, name)
        if b is not None:
            assert a.dtype == np.float16, name
            assert rel_err(a, b) <= GRAD_TOL["float16"], (name, rel_err(a, b))


@pytest.mark.parametrize("noise,match", [
    ({"dropout": np.ones((2, 7), np.float32)}, "unknown keys"),
    ({"zoneout_c": np.zeros((3, 2, 7), np.float32)}, "no cell state"),
    ({"recurrent": np.ones((7, 2), np.float32)}, "shape"),
    ({"zoneout_h": np.zeros((2, 2, 7), np.float32)}, "shape"),
])
def test_bad_noise_is_refused_before_anything_runs(noise, match, launches):
    args, _, _ = make_case("gru", 3, 2, 3, 7, np.float32, True, 1)
    with pytest.raises(ValueError, match=match):
        fwd(sim, "gru", args, None, False, options=_options(2), noise=noise)
    assert launches == []


def test_registry_has_a_regularised_specialization_per_cell_dtype_and_kind():
    specs = [s for s in registry.specializations() if s.regularised]
    assert {(s.cell, s.kind, s.dtype) for s in specs} == {
        (c, k, d) for c in REGULARISED_CELLS for k in registry.KINDS for d in registry.DTYPES}
    assert len({s.name for s in registry.specializations()}) == len(registry.specializations())
    for s in specs:
        plain = registry.spec(s.cell, s.kind, s.dtype)
        extra = 3 if s.kind == "pointwise_fwd" else 4
        assert tuple(s.signature.args[:-extra]) == tuple(plain.signature.args)
        assert len(s.signature.args) == len(plain.signature.args) + extra
    with pytest.raises(ValueError, match="no regularised kernels"):
        registry.spec("lstm_peephole", "persistent_fwd", "float32", True)


STOCK_SCRIPT = """
    import numpy as np
    from gpurnn.backends import sim, numpy as ref
    rng = np.random.default_rng(4)
    T, B, I, H = 3, 2, 3, 7
    r = lambda *s: (0.5 * rng.standard_normal(s)).astype(np.float32)
    x, w_ih, w_hh, b_ih, b_hh, h0, c0 = (r(T, B, I), r(4 * H, I), r(4 * H, H), r(4 * H),
                                         r(4 * H), r(B, H), r(B, H))
    noise = {"recurrent": (rng.random((B, H)) < 0.7).astype(np.float32) / np.float32(0.7),
             "zoneout_h": (rng.random((T, B, H)) < 0.4).astype(np.float32),
             "zoneout_c": (rng.random((T, B, H)) < 0.4).astype(np.float32)}
    log = []
    sim.RUNTIME.launch_hook = log.append
    opts = {"simulator": "stock", "path": "persistent", "blocks": 3}
    out = sim.forward("lstm", x, w_ih, w_hh, b_ih, b_hh, h0, c0, None, True, True, options=opts,
                      noise=noise)
    want = ref.forward("lstm", x, w_ih, w_hh, b_ih, b_hh, h0, c0, None, True, True, noise=noise)
    assert np.allclose(out[0], want[0], atol=1e-5), abs(out[0] - want[0]).max()
    dy, dh_n, dc_n = r(T, B, H), r(B, H), r(B, H)
    g = sim.backward(out[3], dy, dh_n, dc_n, options={"simulator": "stock"})
    g_ref = ref.backward(want[3], dy, dh_n, dc_n)
    for name in g._fields:
        assert np.allclose(getattr(g, name), getattr(g_ref, name), atol=1e-5), name
    assert [d["step_range"] for d in log if d["kind"] == "persistent_fwd"] == [
        (s, s + 1) for s in range(T)]
    assert [d["step_range"] for d in log if d["kind"] == "persistent_bwd"] == [
        (k, k + 1) for k in range(T + 1)]
    assert {d["name"] for d in log} == {"lstm_persistent_fwd_reg_f32", "lstm_persistent_bwd_reg_f32"}
    print("STOCK-REG-OK")
"""


def test_stock_simulator_runs_the_regularised_kernels_one_step_per_launch():
    # Numba's own simulator (a fresh process, NUMBA_ENABLE_CUDASIM set by the backend): P > 1
    # runs one step (backward: one phase) per launch, the masks carried across the launches
    import os
    import subprocess
    import sys
    import textwrap
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(STOCK_SCRIPT)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "STOCK-REG-OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_modules_with_zoneout_and_recurrent_dropout_on_the_sim_backend(name):
    # the stack core hands each layer-direction's masks to the backend (KernelLayer's noise=):
    # the same seed gives the same masks, so the sim modules equal the numpy ones, training
    # (drawn masks) and evaluation (zoneout's expectation), forward and backward
    import gpurnn
    cls = getattr(gpurnn, name)
    T, B, I, H = 3, 2, 3, 5
    p = (0.3, 0.2) if name == "LSTM" else 0.3
    rng = np.random.default_rng(8)
    x = rng.standard_normal((T, B, I))
    lengths = np.array([3, 2])
    mods = {b: cls(I, H, 2, bidirectional=True, dtype="float64", backend=b, seed=6, zoneout=p,
                   recurrent_dropout=0.25) for b in ("numpy", "sim")}
    y = {b: m(x, lengths=lengths)[0] for b, m in mods.items()}
    assert_close(y["sim"], y["numpy"], TOL["float64"], "y")
    assert any(n for n in mods["sim"]._saved[1].noise)       # the masks were drawn and kept
    dy = rng.standard_normal(y["numpy"].shape)
    assert_close(mods["sim"].backward(dy)[0], mods["numpy"].backward(dy)[0], TOL["float64"], "dx")
    for m in mods.values():
        m.eval()
    y = {b: m(x, lengths=lengths)[0] for b, m in mods.items()}
    assert_close(y["sim"], y["numpy"], TOL["float64"], "y (evaluation)")
