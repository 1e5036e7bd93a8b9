"""The stack core routes a unidirectional stack of a kernel cell or of an LSTM variant
(peephole, CIFG, mLSTM, projection) to one layer-wavefront launch
(gpurnn/kernels/wavefront.py) when the backend's plan chooses it or backend_options ask for it,
and the results are the per-layer launches' (the kernels' own parity is
tests/test_sim_wavefront.py)."""
import numpy as np
import pytest

import gpurnn
from gpurnn.backends import availability
from gpurnn.testing import GRAD_TOL, TOL, assert_close

pytestmark = pytest.mark.skipif(not availability("sim")[0],
                                reason="the simulator backend needs numba-cuda")
T, B, I, H, L = 4, 2, 3, 5, 3
OPTS = {"threads": 32, "blocks": 2}


def _launches(fn):
    from gpurnn.backends import sim
    log = []
    sim.RUNTIME.launch_hook = log.append
    try:
        out = fn()
    finally:
        sim.RUNTIME.launch_hook = None
    return out, [d["kind"] for d in log]


@pytest.mark.parametrize("cls,kw", [
    (gpurnn.LSTM, {}), (gpurnn.GRU, {}), (gpurnn.RNN, {}),
    # the kernel-cell LSTM variants: lstm_peephole, cifg, cifg_peephole
    (gpurnn.LSTM, {"peephole": True}), (gpurnn.LSTM, {"coupled": True}),
    (gpurnn.LSTM, {"peephole": True, "coupled": True}), (gpurnn.MLSTM, {}),
    (gpurnn.LSTM, {"proj_size": 3}), (gpurnn.LSTM, {"proj_size": 2, "coupled": True})],
    ids=["lstm", "gru", "rnn", "lstm_peephole", "cifg", "cifg_peephole", "mlstm", "lstm_proj3",
         "cifg_proj2"])
def test_a_stack_runs_as_one_wavefront_when_asked_and_equals_per_layer_launches(cls, kw, rng):
    wave = cls(I, H, L, backend="sim", seed=2, **kw)
    per = cls(I, H, L, backend="sim", seed=2, **kw)
    x, lengths = rng.standard_normal((T, B, I)).astype(np.float32), np.array([4, 2])
    (y, _), kinds = _launches(lambda: wave(x, lengths=lengths,
                                           backend_options={**OPTS, "wavefront": True}))
    # the whole stack, one launch (the projection's kernels are wavefront_proj_*)
    fwd_kind = "wavefront_proj_fwd" if kw.get("proj_size") else "wavefront_fwd"
    assert kinds == [fwd_kind]
    (y_per, _), kinds_per = _launches(lambda: per(x, lengths=lengths, backend_options=OPTS))
    assert "wavefront_fwd" not in kinds_per and len(kinds_per) == L   # default: per layer
    assert_close(y, y_per, TOL["float32"], "y")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    (dx, _), kinds = _launches(lambda: wave.backward(dy))
    assert kinds == [fwd_kind.replace("fwd", "bwd")]
    dx_per, _ = per.backward(dy)
    assert_close(dx, dx_per, GRAD_TOL["float32"], "dx")
    assert set(wave.grads) == set(per.grads)
    if kw.get("peephole"):
        assert {f"weight_ch_l{k}" for k in range(L)} <= set(per.grads)
    for key, g in per.grads.items():
        assert_close(wave.grads[key], g, GRAD_TOL["float32"], key)


def test_stacks_the_wavefront_cannot_run_keep_per_layer_launches(rng):
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    for m in (gpurnn.LSTM(I, H, L, backend="sim", bidirectional=True),
              gpurnn.LSTM(I, H, L, backend="sim", dropout=0.5),
              gpurnn.LSTM(I, H, L, backend="sim", zoneout=(0.1, 0.1)),
              gpurnn.LSTM(I, H, L, backend="sim", proj_size=3, bidirectional=True)):
        _, kinds = _launches(lambda: m(x, backend_options={**OPTS, "wavefront": True}))
        assert "wavefront_fwd" not in kinds
    with pytest.raises(ValueError, match="wavefront"):
        gpurnn.LSTM(I, H, L, backend="sim")(x, backend_options={"wavefront": "yes"})


def test_gpurnn_check_has_wavefront_rows_that_run_the_wavefront():
    from gpurnn.commands import check
    assert set(check.WAVEFRONT_ROWS) <= set(check.VARIANT_CELLS)
    for row in check.WAVEFRONT_ROWS:
        assert check.runs_on(row, "sim")
    rng = np.random.default_rng(0)
    checks, kinds = _launches(lambda: check._checks("sim", "cifg_peephole-wavefront", rng))
    assert kinds == ["wavefront_fwd", "wavefront_bwd"]
    (what, err, tol), = checks
    assert what == "NumPy backend f32" and err <= tol
