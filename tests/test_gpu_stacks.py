"""The stack-level kernel families on a real GPU (the cuda backend, CuPy arrays in and out),
against the NumPy reference through the same modules: the layer wavefront (plain cells and the
kernel-cell LSTM variants; forced on, and against the per-layer launches of the same stack),
the LSTM family (peephole, CIFG, projection, mLSTM), the LayerNormLSTM, and the gated-feedback
stacks. The same kernels run in the strict simulator in CI (tests/test_sim_wavefront.py,
test_sim_variants.py, test_sim_projection.py, test_sim_mlstm.py, test_sim_layernorm.py,
test_sim_feedback.py); here they run compiled, with the plan's own launch sizes.

Each check runs in a subprocess without NUMBA_ENABLE_CUDASIM (this pytest process may have
numba.cuda in simulator mode); on a machine without a GPU they skip with the reason.
"""
import json

import pytest

from test_gpu_kernels import _run_on_gpu

pytestmark = pytest.mark.gpu

COMMON = """
import json
import cupy as cp
import numpy as np
import gpurnn
from gpurnn.backends import cuda as gpu_backend
from gpurnn.testing import GRAD_TOL, TOL, rel_err
DEVICE = "cuda"

def host(v):
    return cp.asnumpy(v) if isinstance(v, cp.ndarray) else np.asarray(v)

def run(cls, kw, backend, x, dy, lengths, options=None):
    # y, dx and every gradient of one forward + backward; dy(y's shape) draws the cotangent
    m = cls(**kw, backend=backend, seed=3, dtype=x.dtype.name)
    cuda = backend == DEVICE
    y, _ = m(cp.asarray(x) if cuda else x, lengths=lengths, backend_options=options)
    d = dy(y.shape)
    dx, _ = m.backward(cp.asarray(d) if cuda else d)
    return {"y": host(y), "dx": host(dx), **{k: host(g) for k, g in m.grads.items()}}

def compare(name, cls, kw, T, B, dtype, options=None, per_layer=None, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, kw["input_size"])).astype(dtype)
    lengths = rng.integers(1, T + 1, B); lengths[0] = T
    cot = {}
    def dy(shape):          # one cotangent for every run of the case
        if "dy" not in cot:
            cot["dy"] = rng.standard_normal(shape).astype(dtype)
        return cot["dy"]
    ref = run(cls, kw, "numpy", x, dy, lengths)
    got = run(cls, kw, DEVICE, x, dy, lengths, options)
    tol = {"y": TOL[np.dtype(dtype).name]}
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    tols = {k: tol.get(k, GRAD_TOL[np.dtype(dtype).name]) for k in ref}
    extra = {}
    if per_layer is not None:      # the same stack's per-layer launches: equal within TOL
        other = run(cls, kw, DEVICE, x, dy, lengths, per_layer)
        extra = {k: rel_err(got[k], other[k]) for k in ref}
    bad = {k: (errs[k], tols[k]) for k in errs if not errs[k] <= tols[k]}
    bad.update({"per-layer " + k: (e, tols[k]) for k, e in extra.items() if not e <= tols[k]})
    print("RESULT " + json.dumps(dict(case=name, errs=errs, bad=bad)), flush=True)
"""


def _check(results):
    bad = [r for r in results if r["bad"]]
    assert not bad, json.dumps(bad, indent=1)


def test_the_wavefront_matches_numpy_and_the_per_layer_launches():
    script = COMMON + """
on, off = {"wavefront": True}, {"wavefront": False}
cases = [("lstm", gpurnn.LSTM, {}), ("gru", gpurnn.GRU, {}), ("rnn_tanh", gpurnn.RNN, {}),
         ("lstm_peephole", gpurnn.LSTM, {"peephole": True}),
         ("cifg", gpurnn.LSTM, {"coupled": True}),
         ("cifg_peephole", gpurnn.LSTM, {"peephole": True, "coupled": True}),
         ("mlstm", gpurnn.MLSTM, {}),
         ("lstm_proj16", gpurnn.LSTM, {"proj_size": 16}),
         ("cifg_peephole_proj16", gpurnn.LSTM, {"proj_size": 16, "peephole": True,
                                                "coupled": True})]
i = 0
for name, cls, extra in cases:
    for (T, B, I, H, L, dtype) in ((16, 1, 32, 128, 3, np.float32), (8, 5, 7, 33, 2, np.float64)):
        kw = dict(input_size=I, hidden_size=H, num_layers=L, **extra)
        used = gpu_backend.use_wavefront(name, I, H, B, L, T, dtype, on)
        assert used, name
        compare(f"{name}-L{L}-H{H}-B{B}-{np.dtype(dtype).name}", cls, kw, T, B, dtype, on, off,
                seed=i)
        i += 1
"""
    _check(_run_on_gpu(script))


def test_the_lstm_family_layernorm_and_feedback_stacks_match_numpy():
    script = COMMON + """
cases = [("lstm_proj", gpurnn.LSTM, {"proj_size": 24, "num_layers": 2, "bidirectional": True}),
         ("lstm_peephole", gpurnn.LSTM, {"peephole": True, "bidirectional": True}),
         ("cifg", gpurnn.LSTM, {"coupled": True}),
         ("mlstm", gpurnn.MLSTM, {"num_layers": 2}),
         ("layernorm_lstm", gpurnn.LayerNormLSTM, {"bidirectional": True}),
         ("gf_lstm", gpurnn.GFLSTM, {"num_layers": 3}),
         ("gf_gru", gpurnn.GFGRU, {"num_layers": 2}),
         ("gf_rnn", gpurnn.GFRNN, {"num_layers": 2})]
for i, (name, cls, extra) in enumerate(cases):
    for (T, B, I, H, dtype) in ((12, 3, 16, 64, np.float32), (6, 2, 5, 17, np.float64)):
        kw = dict(input_size=I, hidden_size=H, **extra)
        if "proj_size" in kw and kw["proj_size"] >= H:
            kw["proj_size"] = H // 2
        compare(f"{name}-H{H}-B{B}-{np.dtype(dtype).name}", cls, kw, T, B, dtype, seed=i)
"""
    _check(_run_on_gpu(script))
