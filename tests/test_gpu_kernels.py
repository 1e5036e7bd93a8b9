"""The cuda backend (CuPy arrays, compiled kernels, cooperative launches) against the NumPy
reference on a real GPU: the simulator parity cases, larger planned sizes, and determinism.

Each check runs in a subprocess: this pytest process may have numba.cuda in simulator mode
(tests/test_sim_*.py switch it on), and the mode is fixed per process at numba.cuda's import.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu


def _hardware_env():
    return {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}


@functools.lru_cache(maxsize=None)
def _no_gpu_reason():
    """None if a CUDA device is usable by both CuPy and Numba, else why not."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    probe = textwrap.dedent("""
        import cupy
        from numba import cuda
        n = cupy.cuda.runtime.getDeviceCount()
        print("DEVICES", n if cuda.is_available() else 0)
    """)
    r = subprocess.run([sys.executable, "-c", probe], env=_hardware_env(), capture_output=True,
                       text=True, timeout=300)
    # CuPy imports without a driver and only fails at its first device call: a failing probe
    # means no device, and the probe's own error says which part is missing.
    if r.returncode != 0 or "DEVICES 0" in r.stdout:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no CUDA device ({last})"
    return None


def _run_on_gpu(script):
    reason = _no_gpu_reason()
    if reason is not None:
        pytest.skip(reason)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=_hardware_env(),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    results = [json.loads(line[len("RESULT "):]) for line in r.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert results, f"the GPU script reported nothing:\n{r.stdout[-4000:]}"
    return results


COMMON = """
import json
import cupy as cp
import numpy as np
from gpurnn.backends import cuda as gpu, numpy as ref
from gpurnn.cells import CELLS, GATES
from gpurnn.testing import TOL, rel_err

def make(cell, T, B, I, H, dtype, bias, seed):
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    r = lambda *s: (0.5 * rng.standard_normal(s) / max(1, s[-1]) ** 0.5 * 2).astype(dtype)
    a = dict(x=r(T, B, I), w_ih=r(G * H, I), w_hh=r(G * H, H), b_ih=r(G * H) if bias else None,
             b_hh=r(G * H) if bias else None, h0=r(B, H), c0=r(B, H) if cell == "lstm" else None)
    c = dict(dy=r(T, B, H), dh_n=r(B, H), dc_n=r(B, H) if cell == "lstm" else None)
    return a, c

def to_gpu(d):
    return {k: (None if v is None else cp.asarray(v)) for k, v in d.items()}

def fwd(mod, cell, a, lengths, reverse, **kw):
    return mod.forward(cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], a["h0"],
                       a["c0"], lengths, reverse, True, **kw)

def compare(cell, T, B, I, H, options, lengths, reverse, bias, dtype, seed, tol=None):
    a, c = make(cell, T, B, I, H, dtype, bias, seed)
    lengths = None if lengths is None else np.asarray(lengths, np.int64)
    out = fwd(gpu, cell, to_gpu(a), lengths, reverse, options=options)
    cp.cuda.runtime.deviceSynchronize()
    exp = fwd(ref, cell, a, lengths, reverse)
    gc = to_gpu(c)
    grads = gpu.backward(out[3], gc["dy"], gc["dh_n"], gc["dc_n"])
    again = gpu.backward(out[3], gc["dy"], gc["dh_n"], gc["dc_n"])
    eg = ref.backward(exp[3], c["dy"], c["dh_n"], c["dc_n"])
    errs = {"y": rel_err(cp.asnumpy(out[0]), exp[0]), "h_n": rel_err(cp.asnumpy(out[1]), exp[1])}
    if exp[2] is not None:
        errs["c_n"] = rel_err(cp.asnumpy(out[2]), exp[2])
    for name in ("h", "c", "gates"):
        if getattr(exp[3], name) is not None:
            errs["reserve." + name] = rel_err(cp.asnumpy(getattr(out[3], name)), getattr(exp[3], name))
    deterministic = True
    for name in eg._fields:
        e = getattr(eg, name)
        if e is not None:
            errs[name] = rel_err(cp.asnumpy(getattr(grads, name)), e)
            deterministic &= bool(cp.array_equal(getattr(grads, name), getattr(again, name)))
    if tol is None:
        tol = TOL[dtype]
    cfg = out[3].launch
    print("RESULT " + json.dumps(dict(case=f"{cell}-T{T}-B{B}-I{I}-H{H}-{options}-len{lengths is not None}-rev{reverse}-{np.dtype(dtype).name}",
                                      path=cfg.path, blocks=cfg.blocks, tol=tol, errs=errs,
                                      deterministic=deterministic)), flush=True)
"""


def _check(results):
    bad = [r for r in results
           if not r["deterministic"] or any(not (e <= r["tol"]) for e in r["errs"].values())]
    assert not bad, json.dumps(bad, indent=1)


def test_cuda_backend_matches_numpy_at_the_simulator_sizes():
    script = COMMON + """
import numpy as np
cases = []
for cell in CELLS:
    cases += [
        (cell, 5, 3, 5, 7, {"path": "persistent", "blocks": 1}, [5, 2, 0], False, True, np.float32),
        (cell, 1, 1, 16, 33, {"path": "persistent", "blocks": 1}, None, True, False, np.float32),
        (cell, 5, 3, 16, 7, {"path": "persistent", "blocks": 2}, [3, 5, 1], True, True, np.float64),
        (cell, 5, 1, 5, 7, {"path": "persistent", "blocks": 3}, None, False, False, np.float32),
        (cell, 5, 3, 5, 7, {"path": "persistent", "blocks": 6}, [2, 5, 4], True, True, np.float32),
        (cell, 5, 3, 5, 33, {"path": "stepwise"}, [5, 1, 4], True, True, np.float32),
        (cell, 1, 1, 16, 7, {"path": "stepwise"}, None, False, False, np.float64),
    ]
for i, case in enumerate(cases):
    compare(*case, seed=i)
"""
    _check(_run_on_gpu(script))


def test_cuda_backend_matches_numpy_at_planned_sizes():
    # Larger sizes with the plan's own choice (many blocks, 256 threads, more than 48 KB of
    # shared memory for LSTM H=512 f32). float32 is judged against a float64 reference: its
    # error may be at most 4x NumPy float32's own (the accumulation order differs), per output.
    script = COMMON + """
def planned(cell, T, B, I, H, reverse, seed):
    a64, c64 = make(cell, T, B, I, H, np.float64, True, seed)
    a32 = {k: (None if v is None else v.astype(np.float32)) for k, v in a64.items()}
    c32 = {k: (None if v is None else v.astype(np.float32)) for k, v in c64.items()}
    lengths = np.random.default_rng(seed).integers(1, T + 1, B)
    lengths[0] = T
    def everything(mod, a, c, **kw):
        conv = (lambda v: v) if mod is ref else to_gpu
        out = fwd(mod, cell, conv(a), lengths, reverse, **kw)
        cc = conv(c)
        g = mod.backward(out[3], cc["dy"], cc["dh_n"], cc["dc_n"])
        vals = {"y": out[0], "h_n": out[1], **{k: v for k, v in g._asdict().items()}}
        return {k: (v if mod is ref else cp.asnumpy(v)) for k, v in vals.items() if v is not None}, out[3]
    r64, _ = everything(ref, a64, c64)
    r32, _ = everything(ref, a32, c32)
    g64, res64 = everything(gpu, a64, c64)
    g32, res32 = everything(gpu, a32, c32)
    errs, tols = {}, {}
    for k in r64:
        errs[k + "/f64"] = rel_err(g64[k], r64[k]); tols[k + "/f64"] = TOL["float64"]
        errs[k + "/f32"] = rel_err(g32[k], r64[k]); tols[k + "/f32"] = max(4 * rel_err(r32[k], r64[k]), 1e-6)
    bad = {k: (errs[k], tols[k]) for k in errs if not errs[k] <= tols[k]}
    print("RESULT " + json.dumps(dict(case=f"{cell}-T{T}-B{B}-I{I}-H{H}-rev{reverse}", path=res32.launch.path,
                                      blocks=res32.launch.blocks, tol=0.0, errs={}, bad=bad,
                                      all_errs=errs, deterministic=True)), flush=True)

for i, (cell, T, B, I, H) in enumerate([("lstm", 32, 16, 64, 512), ("gru", 32, 64, 128, 256),
                                         ("rnn_tanh", 64, 8, 32, 384), ("rnn_relu", 16, 4, 16, 1000)]):
    planned(cell, T, B, I, H, bool(i % 2), 100 + i)
"""
    results = _run_on_gpu(script)
    assert any(r["path"] == "persistent" and r["blocks"] > 1 for r in results), results
    bad = [r for r in results if r["bad"]]
    assert not bad, json.dumps(bad, indent=1)
