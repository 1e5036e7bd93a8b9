"""The CPU fast path (backend 'cpu') against the NumPy reference, through the functional API.

Every output, every gradient and the reserve, for every cell, float32 and float64, lengths
(unsorted, with zeros), reverse, bias=False, given h0/c0, awkward sizes (T 1, B 1, H 1/7/33/40),
team sizes 1-3 (parts that do not divide H) and every BLAS the fast path can use here.
Tolerances: float64 within 1e-10 (norm-relative) of the float64 reference; float32 within
F32_TOL of the float64 reference computed from the same (float32-rounded) inputs, or within
twice the float32 reference's own error there, whichever is larger.
Then what the fast path adds: prepared weights follow in-place changes, packs per batch size,
per-thread workspace, NaN, options, and one OpenMP team shared with torch.
"""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import gpurnn.functional as F
from gpurnn.arrays import resolve
from gpurnn.backends import cpu as cpu_backend
from gpurnn.cells import CELLS, GATES
from gpurnn.cpu import native
from gpurnn.testing import TOL, rel_err

F64_TOL, F32_TOL = TOL["float64"], TOL["float32"]
HAS_TORCH = __import__("importlib").util.find_spec("torch") is not None


def _blas_here(name):
    try:
        native.find_blas(name)
    except ValueError:
        return False
    return True


# (T, B, I, H, lengths, reverse, bias, with h0/c0, threads, blas)
CONFIGS = [
    (1, 1, 5, 7, None, False, True, False, None, "auto"),
    (5, 3, 7, 33, [5, 0, 2], True, True, True, 3, "auto"),
    (6, 4, 3, 40, [6, 1, 6, 3], False, True, True, 3, "auto"),
    (4, 2, 9, 64, None, True, False, True, 2, "openblas"),
    (3, 5, 4, 33, [1, 3, 2, 3, 0], False, True, False, 2, "numba"),
    (7, 3, 5, 48, None, False, True, True, 2, "mkl"),
    (3, 2, 3, 1, [3, 2], True, True, True, None, "auto"),
    (9, 2, 16, 96, [9, 4], True, True, True, None, "auto"),
    # T*B above gpurnn.backends.cpu.CHUNK_ROWS: the input projection comes in several chunks
    (40, 16, 5, 33, [40, 3, 17, 40, 0, 32, 33, 31, 1, 40, 39, 8, 16, 24, 38, 2], True, True, True,
     2, "auto"),
    (70, 8, 3, 20, None, False, True, False, None, "openblas"),
    # B = 1: the per-step product is a matrix-vector product, for each BLAS
    (6, 1, 5, 40, [4], True, True, True, 2, "openblas"),
    (4, 1, 3, 33, None, False, True, True, 2, "mkl"),
    (3, 1, 4, 24, None, True, False, False, 2, "numba"),
]


def _config_id(c):
    T, B, I, H, lengths, rev, bias, states, threads, blas = c
    return (f"T{T}-B{B}-I{I}-H{H}" + ("-lengths" if lengths else "") + ("-rev" if rev else "")
            + ("" if bias else "-nobias") + ("-h0" if states else "") + f"-threads{threads}-{blas}")


def _data(cell, T, B, I, H, bias, states, rng):
    G = GATES[cell]
    k = 1 / np.sqrt(H)
    a = {"x": rng.standard_normal((T, B, I)), "w_ih": rng.uniform(-k, k, (G * H, I)),
         "w_hh": rng.uniform(-k, k, (G * H, H)),
         "b_ih": rng.uniform(-k, k, G * H) if bias else None,
         "b_hh": rng.uniform(-k, k, G * H) if bias else None,
         "h0": rng.standard_normal((B, H)) if states else None,
         "c0": rng.standard_normal((B, H)) if states and cell == "lstm" else None}
    g = {"dy": rng.standard_normal((T, B, H)), "dh_n": rng.standard_normal((B, H)),
         "dc_n": rng.standard_normal((B, H)) if cell == "lstm" else None}
    return a, g


def _cast(d, dtype):
    return {k: None if v is None else v.astype(dtype) for k, v in d.items()}


def _run(cell, a, g, lengths, reverse, backend, options=None):
    y, h_n, c_n, res = F.forward(cell, **a, lengths=lengths, reverse=reverse, backend=backend,
                                 backend_options=options)
    reserve = (res.h.copy(), None if res.c is None else res.c.copy(),
               None if res.gates is None else res.gates.copy())
    grads = F.backward(res, **g, backend_options=options)
    outs = {"y": y, "h_n": h_n, "c_n": c_n, **grads._asdict()}
    return {k: v for k, v in outs.items() if v is not None}, reserve


@pytest.mark.parametrize("split", ["units", "rows"])
@pytest.mark.parametrize("config", CONFIGS, ids=[_config_id(c) for c in CONFIGS])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_the_numpy_reference(cell, dtype, config, split, rng):
    # split: how the team shares the work, by hidden units or by batch rows
    T, B, I, H, lengths, reverse, bias, states, threads, blas = config
    if blas == "mkl":
        pytest.importorskip("torch")          # MKL is torch's: it is used once torch is imported
    if not _blas_here(blas):
        pytest.skip(f"BLAS {blas!r} is not available here (mkl needs torch imported, with MKL)")
    options = {"blas": blas, "split": split}
    if threads is not None:
        options["threads"] = threads
    lengths = None if lengths is None else np.array(lengths)
    a64, g64 = _data(cell, T, B, I, H, bias, states, rng)
    a, g = _cast(a64, dtype), _cast(g64, dtype)
    ref64, res64 = _run(cell, _cast(a, np.float64), _cast(g, np.float64), lengths, reverse, "numpy")
    got, res = _run(cell, a, g, lengths, reverse, "cpu", options)
    assert sorted(got) == sorted(ref64)
    if dtype == np.float64:
        budget = {k: F64_TOL for k in ref64}
    else:
        ref32, _ = _run(cell, a, g, lengths, reverse, "numpy")
        budget = {k: max(F32_TOL, 2 * rel_err(ref32[k], ref64[k])) for k in ref64}
    for k, want in ref64.items():
        assert got[k].dtype == dtype, k
        err = rel_err(got[k], want)
        assert err <= budget[k], f"{k}: relative error {err:.2e} > {budget[k]:.1e}"
    # the reserve has the layout of every backend's: boundary states, cell states, gates
    # (gates compared at the steps each sequence ran; padded steps' gates are never read)
    h, c, gates = res
    tol = F64_TOL if dtype == np.float64 else 10 * F32_TOL
    assert rel_err(h, res64[0]) <= tol
    if c is not None:
        assert rel_err(c, res64[1]) <= tol
    assert (gates is None) == (res64[2] is None)
    if gates is not None:
        ran = np.ones((T, B), bool) if lengths is None else np.arange(T)[:, None] < lengths[None, :]
        assert rel_err(gates[ran], res64[2][ran]) <= tol


@pytest.mark.parametrize("cell", CELLS)
def test_inference_forward_equals_the_training_forward(cell, rng):
    # without a reserve the states live in two rolling slots: the arithmetic is the same
    a, _ = _data(cell, 6, 3, 5, 33, True, True, rng)
    lengths = np.array([6, 2, 0])
    for reverse in (False, True):
        y, h_n, c_n, res = F.forward(cell, **a, lengths=lengths, reverse=reverse, backend="cpu")
        y2, h2, c2, none = F.forward(cell, **a, lengths=lengths, reverse=reverse, training=False,
                                     backend="cpu")
        assert none is None and res is not None
        np.testing.assert_array_equal(y2, y)
        np.testing.assert_array_equal(h2, h_n)
        if c_n is not None:
            np.testing.assert_array_equal(c2, c_n)


def test_is_the_default_for_numpy_arrays(monkeypatch):
    monkeypatch.delenv("GPURNN_BACKEND", raising=False)
    x = np.zeros((2, 1, 3))
    assert resolve("auto", {"x": x}) == "cpu"
    monkeypatch.setenv("GPURNN_BACKEND", "numpy")
    assert resolve("auto", {"x": x}) == "numpy"             # the reference, when asked for


@pytest.mark.parametrize("which", ["w_ih", "w_hh", "b_ih", "b_hh"])
def test_weights_changed_in_place_are_used(which, rng):
    # weights are prepared once per version: an in-place change is a new version
    a, g = _data("gru", 4, 3, 5, 33, True, True, rng)
    F.forward("gru", **a, backend="cpu")
    a[which][...] += rng.standard_normal(a[which].shape) * 0.1
    got, _ = _run("gru", a, g, None, False, "cpu")
    want, _ = _run("gru", a, g, None, False, "numpy")
    for k in want:
        assert rel_err(got[k], want[k]) <= F64_TOL, k


def test_weights_changed_between_forward_and_backward(rng):
    # backward uses the weights as they are then, as the reference does
    a, g = _data("lstm", 5, 2, 4, 33, True, True, rng)
    b = {k: None if v is None else v.copy() for k, v in a.items()}
    *_, res = F.forward("lstm", **a, backend="cpu")
    *_, res_ref = F.forward("lstm", **b, backend="numpy")
    a["w_hh"][...] *= 1.5
    b["w_hh"][...] *= 1.5
    got, want = F.backward(res, **g), F.backward(res_ref, **g)
    for k, w in want._asdict().items():
        assert rel_err(getattr(got, k), w) <= F64_TOL, k


def test_batch_sizes_and_shapes_alternate(rng):
    # packs are kept per batch size, workspace is resized: alternate them with one weight set
    a, g = _data("lstm", 5, 4, 6, 40, True, False, rng)
    for T, B in [(5, 4), (3, 1), (5, 4), (8, 2), (3, 1)]:
        x = rng.standard_normal((T, B, 6)).astype(np.float32)
        args = {**_cast(a, np.float32), "x": x}
        dy = rng.standard_normal((T, B, 40)).astype(np.float32)
        y, h_n, c_n, res = F.forward("lstm", **args, backend="cpu")
        yr, hr, cr, rr = F.forward("lstm", **_cast(args, np.float64), backend="numpy")
        assert rel_err(y, yr) <= F32_TOL
        gr = F.backward(rr, dy.astype(np.float64))
        got = F.backward(res, dy)
        assert rel_err(got.dw_hh, gr.dw_hh) <= F32_TOL and rel_err(got.dx, gr.dx) <= F32_TOL


def test_python_threads_running_at_once(rng):
    # prepared weights and workspace are per Python thread: concurrent calls do not mix
    a, g = _data("gru", 6, 3, 5, 33, True, True, rng)
    datas = [{**a, "x": rng.standard_normal(a["x"].shape)} for _ in range(4)]
    wants = [F.forward("gru", **d, backend="numpy")[0] for d in datas]
    errors = []

    def work(i):
        for _ in range(5):
            y = F.forward("gru", **datas[i], backend="cpu")[0]
            errors.append(rel_err(y, wants[i]))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 20 and max(errors) <= F64_TOL


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_nan_propagates_and_padding_is_ignored(cell, dtype, rng):
    a, _ = _data(cell, 5, 3, 4, 33, True, True, rng)
    a = _cast(a, dtype)
    lengths = np.array([5, 2, 3])
    a["x"][1, 0, 0] = np.nan            # a step that runs: NaN from there on, as the reference
    a["x"][3, 1, :] = np.nan            # a padded step: never seen
    y, h_n, _, _ = F.forward(cell, **a, lengths=lengths, backend="cpu")
    yr, hr, _, _ = F.forward(cell, **a, lengths=lengths, backend="numpy")
    np.testing.assert_array_equal(np.isnan(y), np.isnan(yr))
    np.testing.assert_array_equal(np.isnan(h_n), np.isnan(hr))
    assert np.isnan(y[1:, 0]).any() and not np.isnan(y[:, 1:]).any()


@pytest.mark.parametrize("options,exc,text", [
    ({"path": "persistent"}, ValueError, r"unknown keys \['path'\] for backend 'cpu'"),
    ({"blas": "acml"}, ValueError, r"backend_options\['blas'\] must be one of .*; got 'acml'"),
    ({"threads": 0}, ValueError, r"backend_options\['threads'\] must be an int >= 1; got 0"),
    ({"threads": True}, ValueError, r"backend_options\['threads'\] must be an int >= 1; got True"),
    ({"threads": "2"}, ValueError, r"backend_options\['threads'\] must be an int >= 1; got '2'"),
    ({"split": "cols"}, ValueError, r"backend_options\['split'\] must be one of .*; got 'cols'"),
])
def test_bad_options_are_named(options, exc, text, rng):
    a, _ = _data("lstm", 2, 1, 3, 4, True, False, rng)
    with pytest.raises(exc, match=text):
        F.forward("lstm", **a, backend="cpu", backend_options=options)
    y, *_ = F.forward("lstm", **a, backend="cpu")            # and the valid call still runs
    assert y.shape == (2, 1, 4)


def test_team_size_follows_the_openmp_setting():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    omp = native.find_openmp()
    if omp is None:
        pytest.skip("no OpenMP runtime here: the fast path runs on the calling thread")
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert cpu_backend._Runtime({}, np.float32, 256, 8).threads == 1
    with threadpoolctl.threadpool_limits(limits=2, user_api="openmp"):
        assert cpu_backend._Runtime({}, np.float32, 256, 1).threads == 2
        # split by units: at most one thread per 16 hidden units; by rows: per batch row
        assert cpu_backend._Runtime({}, np.float32, 20, 1).threads == 1
        assert cpu_backend._Runtime({"split": "rows"}, np.float32, 20, 8).threads == 2
        assert cpu_backend._Runtime({"split": "rows"}, np.float32, 256, 1).threads == 1
    assert cpu_backend._Runtime({"threads": 3}, np.float32, 256, 1).threads == 3


_ONE_TEAM = r"""
import sys
import numpy as np
order = sys.argv[1]
if order == "torch-first":
    import torch
import gpurnn.functional as F
from gpurnn.cpu import native
F.forward("lstm", np.ones((3, 2, 4), np.float32), np.ones((128, 4), np.float32) * .1,
          np.ones((128, 32), np.float32) * .1, backend="cpu", backend_options={"threads": 2})
if order == "gpurnn-first":
    import torch
    torch.ones(64, 64) @ torch.ones(64, 64)
maps = open("/proc/self/maps").read().split("\n")
gomp = sorted({line.split()[-1] for line in maps if "libgomp" in line})
print(len(gomp), native.find_blas("auto").name)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps (Linux)")
@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
@pytest.mark.parametrize("order", ["torch-first", "gpurnn-first"])
def test_one_openmp_runtime_with_torch(order):
    # torch's OpenMP team is the fast path's team: one libgomp in the process, whichever
    # was imported first, and with torch imported the GEMMs are torch's MKL
    env = {k: v for k, v in os.environ.items() if k != "GPURNN_BACKEND"}
    out = subprocess.run([sys.executable, "-c", _ONE_TEAM, order], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    count, blas = out.stdout.split()
    assert count == "1"
    if order == "torch-first" and _blas_here("mkl"):
        assert blas == "mkl"


def test_results_are_never_shared_while_in_use(rng):
    # big results reuse buffers nothing references any more; one still referenced (or viewed)
    # is never handed out again
    a, g = _data("lstm", 64, 8, 16, 256, True, False, rng)       # y, reserve and dx >= 1 MB
    y1, _, _, res1 = F.forward("lstm", **a, backend="cpu")
    keep = y1.copy()
    view = res1.gates[3:]
    y2, _, _, res2 = F.forward("lstm", **{**a, "x": a["x"] * 0.5}, backend="cpu")
    for first, second in ((y1, y2), (res1.h, res2.h), (res1.c, res2.c), (res1.gates, res2.gates)):
        assert not np.shares_memory(first, second)
    np.testing.assert_array_equal(y1, keep)
    grads = F.backward(res2, **g)
    assert not np.shares_memory(grads.dx, view) and not np.shares_memory(grads.dx, y1)
    del y2, res2
    y3, _, _, res3 = F.forward("lstm", **a, backend="cpu")      # may reuse the freed ones
    np.testing.assert_array_equal(y3, keep)
    np.testing.assert_array_equal(y1, keep)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_16bit_storage_computes_as_the_reference(storage, rng):
    # 16-bit storage computes in float32 on the 16-bit values, in both backends
    if storage == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(np.float16)
    a, g = _data("lstm", 5, 3, 4, 33, True, True, rng)
    a, g = _cast(a, dtype), _cast(g, dtype)
    got, _ = _run("lstm", a, g, np.array([5, 2, 4]), True, "cpu")
    want, _ = _run("lstm", a, g, np.array([5, 2, 4]), True, "numpy")
    for k, w in want.items():
        assert got[k].dtype == dtype, k
        # both round float32 results to 16 bits: a few units of the 16-bit last place at most
        assert rel_err(got[k], w) <= 2 * float(np.finfo(dtype).eps), k


@pytest.mark.parametrize("omp", ["1", "2"])
def test_team_size_follows_omp_num_threads(omp):
    # standalone (no torch): OMP_NUM_THREADS sets the team, as users expect
    code = ("import numpy as np; from gpurnn.backends import cpu; "
            "print(cpu._Runtime({}, np.float32, 256, 8).threads)")
    env = {k: v for k, v in os.environ.items() if k != "GPURNN_BACKEND"}
    env["OMP_NUM_THREADS"] = omp
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    if native.find_openmp() is None:
        pytest.skip("no OpenMP runtime here: the fast path runs on the calling thread")
    assert out.stdout.split() == [omp]
