"""The NumPy backend (the reference) and the CPU fast path against torch.nn: outputs, final
states and every gradient through autograd with random upstream gradients, weights loaded
through load_state_dict."""
import numpy as np
import pytest

import gpurnn
from gpurnn.testing import TOL, assert_close

torch = pytest.importorskip("torch")

TORCH = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}

# (cell, kwargs, T, B, I, H, layers, bidirectional, batch_first, lengths)
CASES = [
    ("LSTM", {}, 17, 3, 5, 7, 1, False, False, None),
    ("LSTM", {}, 1, 1, 59, 33, 2, True, False, None),
    ("LSTM", {}, 17, 3, 5, 33, 3, True, True, [17, 4, 9]),
    ("LSTM", {"bias": False}, 5, 3, 59, 7, 2, False, False, [2, 5, 1]),
    ("GRU", {}, 17, 1, 59, 7, 1, True, True, None),
    ("GRU", {}, 5, 3, 5, 33, 3, False, False, [5, 1, 3]),
    ("GRU", {}, 17, 3, 5, 7, 2, True, False, [3, 17, 11]),
    ("GRU", {"bias": False}, 1, 3, 5, 33, 1, True, False, None),
    ("RNN", {}, 17, 3, 59, 33, 2, True, False, [17, 6, 1]),
    ("RNN", {"nonlinearity": "relu"}, 17, 3, 5, 7, 3, True, True, None),
    ("RNN", {"nonlinearity": "relu"}, 5, 1, 5, 33, 1, False, False, [4]),
    ("RNN", {"bias": False}, 1, 3, 59, 7, 2, False, True, [1, 1, 1]),
]


def _id(case):
    cell, kw, T, B, I, H, L, bidir, bf, lengths = case
    extra = "".join(f"-{k}={v}" for k, v in kw.items())
    return (f"{cell}{extra}-T{T}-B{B}-I{I}-H{H}-L{L}" + ("-bidir" if bidir else "")
            + ("-batch_first" if bf else "") + ("-lengths" if lengths else ""))


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_layer_matches_torch(case, dtype, backend, rng):
    cell, kw, T, B, I, H, L, bidir, batch_first, lengths = case
    tdtype = torch.float32 if dtype == np.float32 else torch.float64
    torch.manual_seed(int(rng.integers(1 << 30)))
    ref = TORCH[cell](I, H, num_layers=L, bidirectional=bidir, batch_first=batch_first,
                      dropout=0.0, **kw).to(tdtype)
    ref.train()
    mine = getattr(gpurnn, cell)(I, H, num_layers=L, bidirectional=bidir, batch_first=batch_first,
                                 dtype=dtype, backend=backend, **kw)
    mine.load_state_dict(ref.state_dict())
    D = 2 if bidir else 1

    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    h0 = rng.standard_normal((L * D, B, H)).astype(dtype)
    c0 = rng.standard_normal((L * D, B, H)).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    h0t = torch.tensor(h0, requires_grad=True)
    c0t = torch.tensor(c0, requires_grad=True)
    hx_t = (h0t, c0t) if cell == "LSTM" else h0t
    hx = (h0, c0) if cell == "LSTM" else h0

    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths),
                                                         batch_first=batch_first, enforce_sorted=False)
        out, state_t = ref(packed, hx_t)
        y_t, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    else:
        y_t, state_t = ref(xt, hx_t)
    y, state = mine(x, hx, lengths=None if lengths is None else np.array(lengths))

    tol = TOL[np.dtype(dtype)]
    assert y.dtype == dtype
    assert_close(y, y_t.detach().numpy(), tol, "y")
    states = state if cell == "LSTM" else (state,)
    states_t = state_t if cell == "LSTM" else (state_t,)
    for name, s, st in zip(("h_n", "c_n"), states, states_t):
        assert_close(s, st.detach().numpy(), tol, name)

    dy = rng.standard_normal(y.shape).astype(dtype)
    dstates = [rng.standard_normal(s.shape).astype(dtype) for s in states]
    loss = (y_t * torch.tensor(dy)).sum() + sum((st * torch.tensor(d)).sum()
                                                for st, d in zip(states_t, dstates))
    loss.backward()
    dx, dhx = mine.backward(dy, tuple(dstates) if cell == "LSTM" else dstates[0])
    assert_close(dx, xt.grad.numpy(), tol, "dx")
    dhx = dhx if cell == "LSTM" else (dhx,)
    for name, g, gt in zip(("dh0", "dc0"), dhx, (h0t.grad, c0t.grad)):
        assert_close(g, gt.numpy(), tol, name)
    names = [n for n, _ in ref.named_parameters()]
    assert sorted(names) == sorted(mine.grads)
    for name, p in ref.named_parameters():
        assert_close(mine.grads[name], p.grad.numpy(), tol, name)
