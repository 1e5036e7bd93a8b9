"""No backend ever writes into an array it was given (weights, x, h0/c0, dy/dh_n/dc_n, lengths).

Every input is marked read-only (`flags.writeable = False`: any write raises) and forward and
backward run on every backend that exists here, every cell, both directions, at H, B, T, I in
{1, 2, 7}: the full product on the fast backends, an orthogonal array on the simulator (every
value of every size, every pair of sizes, in 9 cases). H = 1 is the case that once corrupted the
weights: `ascontiguousarray(w_hh.T)` is w_hh itself then, and it was scaled in place.
The modules (NumPy and torch) are checked the same way, torch through `_version` and values.
"""
import itertools

import numpy as np
import pytest

import gpurnn
import gpurnn.functional as F
from gpurnn.backends import BACKENDS, availability
from gpurnn.cells import CELLS, GATES

SIZES = (1, 2, 7)
FULL = list(itertools.product(SIZES, repeat=4))                      # (H, B, T, I)
# L9 orthogonal array: 4 factors at 3 levels, every pair of levels of every two factors once
L9 = [(0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 2, 2), (1, 0, 1, 2), (1, 1, 2, 0), (1, 2, 0, 1),
      (2, 0, 2, 1), (2, 1, 0, 2), (2, 2, 1, 0)]
PAIRWISE = [tuple(SIZES[k] for k in row) for row in L9]
SLOW = {"sim"}          # backends that run kernels thread by thread: the pairwise set only
HOST_FAST = [b for b in BACKENDS if b not in SLOW | {"cuda"}]    # the modules' NumPy backends


def _backend(name):
    ok, why = availability(name)
    if not ok:
        pytest.skip(f"backend {name!r} is not available here: {why}")
    return name


def _inputs(cell, H, B, T, I, rng, dtype=np.float32):
    G = GATES[cell]
    a = {
        "x": rng.standard_normal((T, B, I)),
        "w_ih": rng.uniform(-0.6, 0.6, (G * H, I)), "w_hh": rng.uniform(-0.6, 0.6, (G * H, H)),
        "b_ih": rng.uniform(-0.3, 0.3, G * H), "b_hh": rng.uniform(-0.3, 0.3, G * H),
        "h0": rng.standard_normal((B, H)),
        "c0": rng.standard_normal((B, H)) if cell == "lstm" else None,
    }
    a = {k: None if v is None else v.astype(dtype) for k, v in a.items()}
    # lengths with a zero and a full-length sequence whenever B allows
    a["lengths"] = np.array([T, 0] + list(rng.integers(0, T + 1, max(B - 2, 0))), np.int64)[:B]
    seeds = {"dy": rng.standard_normal((T, B, H)).astype(dtype),
             "dh_n": rng.standard_normal((B, H)).astype(dtype),
             "dc_n": rng.standard_normal((B, H)).astype(dtype) if cell == "lstm" else None}
    return a, seeds


def _freeze(arrays):
    """Mark every array read-only and return copies to compare with afterwards."""
    before = {}
    for k, v in arrays.items():
        if v is not None:
            v.flags.writeable = False
            before[k] = v.copy()
    return before


def _run(cell, a, seeds, reverse, backend):
    y, h_n, c_n, res = F.forward(cell, **a, reverse=reverse, backend=backend)
    g = F.backward(res, **seeds)
    return [y, h_n, c_n] + list(g)


def _check_backend(backend, cell, reverse, cases, rng, rerun=True):
    for H, B, T, I in cases:
        where = f"{backend} {cell} {'reverse' if reverse else 'forward'} H={H} B={B} T={T} I={I}"
        a, seeds = _inputs(cell, H, B, T, I, rng)
        before = _freeze({**a, **seeds})
        first = _run(cell, a, seeds, reverse, backend)
        # the same call again gives the same answer (the slow backends: once is enough)
        again = _run(cell, a, seeds, reverse, backend) if rerun else first
        for k, v in {**a, **seeds}.items():
            if v is not None:
                np.testing.assert_array_equal(v, before[k], err_msg=f"{where}: {k} changed")
        for n, (p, q) in enumerate(zip(first, again)):
            if p is not None:
                assert np.isfinite(p).all(), f"{where}: output {n} is not finite"
                np.testing.assert_array_equal(p, q, err_msg=f"{where}: output {n} differs on rerun")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in SLOW])
def test_functional_never_writes_its_inputs(backend, cell, reverse, rng):
    _check_backend(_backend(backend), cell, reverse, FULL, rng)


@pytest.mark.sim
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", sorted(SLOW & set(BACKENDS)))
def test_functional_never_writes_its_inputs_slow_backends(backend, cell, reverse, rng):
    _check_backend(_backend(backend), cell, reverse, PAIRWISE, rng, rerun=False)


@pytest.mark.parametrize("backend", HOST_FAST)
def test_h1_lstm_weights_survive_forwards(backend):
    # the reproduction: hidden_size 1, two forwards, then the weights
    m = gpurnn.LSTM(3, 1, seed=0, dtype="float64", backend=_backend(backend))
    before = m.state_dict()
    x = np.random.default_rng(1).standard_normal((4, 2, 3))
    y1, _ = m(x)
    y2, _ = m(x)
    np.testing.assert_array_equal(y1, y2)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


@pytest.mark.parametrize("cls,kw", [(gpurnn.LSTM, {}), (gpurnn.GRU, {}),
                                    (gpurnn.RNN, {"nonlinearity": "tanh"}),
                                    (gpurnn.RNN, {"nonlinearity": "relu"})],
                         ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("H", SIZES)
@pytest.mark.parametrize("backend", HOST_FAST)
def test_module_never_writes_parameters_or_inputs(backend, cls, kw, H, rng):
    m = cls(2, H, num_layers=2, bidirectional=True, dtype="float64", seed=3,
            backend=_backend(backend), **kw)
    for p in m.parameters():
        p.flags.writeable = False
    params = {k: v.copy() for k, v in m.state_dict().items()}
    T, B = 3, 2
    x = rng.standard_normal((T, B, 2))
    state = rng.standard_normal((4, B, H))
    hx = (state, rng.standard_normal((4, B, H))) if m.cell == "lstm" else state
    dy = rng.standard_normal((T, B, 2 * H))
    lengths = np.array([T, 1])
    frozen = {"x": x, "dy": dy, "lengths": lengths, "h": state}
    if m.cell == "lstm":
        frozen["c"] = hx[1]
    before = _freeze(frozen)
    outs = []
    for _ in range(2):
        y, _ = m(x, hx, lengths)
        dx, _ = m.backward(dy)
        outs.append((y, dx))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, params[k], err_msg=k)
    for k, v in frozen.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("H", SIZES)
@pytest.mark.parametrize("backend", HOST_FAST)
def test_torch_module_never_writes_parameters_or_inputs(backend, kind, H):
    torch = pytest.importorskip("torch")
    import gpurnn.torch as gt
    torch.manual_seed(H)
    m = getattr(gt, kind)(2, H, num_layers=2, bidirectional=True, dtype=torch.float64,
                          backend=_backend(backend))
    T, B = 3, 2
    x = torch.randn(T, B, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, B, H, dtype=torch.float64, requires_grad=True)
    hx = (h0, c0) if kind == "LSTM" else h0
    watched = dict(m.named_parameters(), x=x, h0=h0, c0=c0)
    versions = {k: t._version for k, t in watched.items()}
    values = {k: t.detach().clone() for k, t in watched.items()}
    grads = []
    for _ in range(2):
        for t in watched.values():
            t.grad = None
        y, _ = m(x, hx)
        dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
        y.backward(dy)
        grads.append({k: t.grad.clone() for k, t in watched.items() if t.grad is not None})
    for k, t in watched.items():
        assert t._version == versions[k], f"{k} was written in place"
        assert torch.equal(t.detach(), values[k]), f"{k} changed"
    assert grads[0].keys() == grads[1].keys() and "weight_hh_l0" in grads[0]
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), f"gradient of {k} differs on rerun"
