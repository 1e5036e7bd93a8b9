"""gpurnn.torch modules against torch.nn through autograd: outputs, states and every gradient
(parameters, input, initial states) for padded and PackedSequence input; init, state_dict
interchange, eval/no_grad, dropout composition, unbatched input, CUDA (GPU only)."""
import numpy as np
import pytest

import gpurnn
from gpurnn.testing import TOL, assert_close

torch = pytest.importorskip("torch")
import gpurnn.torch as gt  # noqa: E402  (needs torch)
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402
from gpurnn.stack import KernelLayer  # noqa: E402

REF = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}
MINE = {"LSTM": gt.LSTM, "GRU": gt.GRU, "RNN": gt.RNN}
TDTYPE = {np.float32: torch.float32, np.float64: torch.float64}

# (cell, kwargs, T, B, I, H, layers, bidirectional, batch_first, lengths or None)
CASES = [
    ("LSTM", {}, 5, 3, 7, 33, 2, True, False, None),
    ("LSTM", {}, 1, 1, 5, 7, 1, False, True, None),
    ("LSTM", {}, 7, 3, 5, 7, 2, True, True, [7, 2, 5]),
    ("LSTM", {"bias": False}, 5, 3, 7, 5, 1, False, False, [1, 5, 3]),
    ("GRU", {}, 7, 3, 5, 33, 2, True, False, [3, 7, 1]),
    ("GRU", {}, 5, 1, 7, 7, 1, False, True, None),
    ("RNN", {}, 7, 3, 5, 7, 2, True, True, [7, 7, 2]),
    ("RNN", {"nonlinearity": "relu", "bias": False}, 5, 3, 7, 33, 1, True, False, None),
]


def _id(case):
    cell, kw, T, B, I, H, L, bidir, bf, lengths = case
    extra = "".join(f"-{k}={v}" for k, v in kw.items())
    return (f"{cell}{extra}-T{T}-B{B}-I{I}-H{H}-L{L}" + ("-bidir" if bidir else "")
            + ("-batch_first" if bf else "") + ("-packed" if lengths else ""))


def _pair(cell, I, H, tdtype, seed, **kw):
    """torch.nn and gpurnn.torch modules built from the same seed (so the same init)."""
    torch.manual_seed(seed)
    ref = REF[cell](I, H, dtype=tdtype, **kw)
    torch.manual_seed(seed)
    mine = MINE[cell](I, H, dtype=tdtype, **kw)
    return ref, mine


def _states(cell, state):
    return list(state) if cell == "LSTM" else [state]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_module_matches_torch(case, dtype, rng):
    cell, kw, T, B, I, H, L, bidir, batch_first, lengths = case
    tdtype, tol = TDTYPE[dtype], TOL[np.dtype(dtype)]
    ref, mine = _pair(cell, I, H, tdtype, int(rng.integers(1 << 30)), num_layers=L,
                      bidirectional=bidir, batch_first=batch_first, **kw)
    for key, value in ref.state_dict().items():      # same seed -> torch's init, bit for bit
        assert torch.equal(mine.state_dict()[key], value), key
    D = 2 if bidir else 1
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(dtype)
    hx = [rng.standard_normal((L * D, B, H)).astype(dtype) for _ in range(2 if cell == "LSTM" else 1)]

    results = []
    for module in (ref, mine):
        xt = torch.tensor(x, requires_grad=True)
        hxt = [torch.tensor(h, requires_grad=True) for h in hx]
        inp = xt
        if lengths is not None:
            inp = pack_padded_sequence(xt, torch.tensor(lengths), batch_first=batch_first,
                                       enforce_sorted=False)
        out, state = module(inp, tuple(hxt) if cell == "LSTM" else hxt[0])
        out_data = out.data if lengths is not None else out
        states = _states(cell, state)
        # random upstream gradients, the same for both modules (seeded per output shape)
        g = np.random.default_rng(7)
        loss = (out_data * torch.tensor(g.standard_normal(out_data.shape).astype(dtype))).sum()
        for s in states:
            loss = loss + (s * torch.tensor(g.standard_normal(s.shape).astype(dtype))).sum()
        module.zero_grad()
        loss.backward()
        results.append((out, states, xt.grad, [h.grad for h in hxt],
                        {k: p.grad.clone() for k, p in module.named_parameters()}))

    (out_r, st_r, dx_r, dh_r, dp_r), (out_m, st_m, dx_m, dh_m, dp_m) = results
    if lengths is not None:
        assert type(out_m) is type(out_r)
        assert torch.equal(out_m.batch_sizes, out_r.batch_sizes)
        assert torch.equal(out_m.sorted_indices, out_r.sorted_indices)
        assert torch.equal(out_m.unsorted_indices, out_r.unsorted_indices)
        out_m, out_r = out_m.data, out_r.data
    assert out_m.dtype == tdtype and out_m.shape == out_r.shape
    assert_close(out_m.detach(), out_r.detach(), tol, "output")
    for name, a, b in zip(("h_n", "c_n"), st_m, st_r):
        assert a.shape == b.shape
        assert_close(a.detach(), b.detach(), tol, name)
    assert_close(dx_m, dx_r, tol, "d input")
    for name, a, b in zip(("d h_0", "d c_0"), dh_m, dh_r):
        assert_close(a, b, tol, name)
    assert dp_m.keys() == dp_r.keys()
    for key in dp_r:
        assert_close(dp_m[key], dp_r[key], tol, f"d {key}")


def test_packed_sorted_input_without_indices(rng):
    """pack_padded_sequence(enforce_sorted=True) leaves sorted_indices None; so must we."""
    ref, mine = _pair("GRU", 5, 7, torch.float64, 13, num_layers=2, bidirectional=True)
    x = torch.tensor(rng.standard_normal((6, 3, 5)), requires_grad=True)
    lengths = torch.tensor([6, 4, 1])
    out_r, h_r = ref(pack_padded_sequence(x, lengths))
    out_m, h_m = mine(pack_padded_sequence(x, lengths))
    assert out_m.sorted_indices is None and out_m.unsorted_indices is None
    assert torch.equal(out_m.batch_sizes, out_r.batch_sizes)
    assert_close(out_m.data.detach(), out_r.data.detach(), 1e-10, "output")
    assert_close(h_m.detach(), h_r.detach(), 1e-10, "h_n")
    (dx_r,) = torch.autograd.grad(out_r.data.sum() + h_r.sum(), x)
    (dx_m,) = torch.autograd.grad(out_m.data.sum() + h_m.sum(), x)
    assert_close(dx_m, dx_r, 1e-10, "d input")


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_state_dict_interchange_both_ways(cell):
    torch.manual_seed(1)
    ref = REF[cell](5, 7, num_layers=2, bidirectional=True)
    torch.manual_seed(2)
    mine = MINE[cell](5, 7, num_layers=2, bidirectional=True)
    assert not torch.equal(ref.weight_ih_l0, mine.weight_ih_l0)   # different seeds: distinct
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5)
    with torch.no_grad():
        assert_close(mine(x)[0], ref(x)[0], 1e-5, "output after torch -> gpurnn")
    torch.manual_seed(3)
    other = REF[cell](5, 7, num_layers=2, bidirectional=True)
    other.load_state_dict(mine.state_dict())
    assert list(other.state_dict()) == list(mine.state_dict())
    for key, value in mine.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_default_hx_and_unbatched_input(rng):
    ref, mine = _pair("LSTM", 5, 7, torch.float64, 11, num_layers=2)
    x = torch.tensor(rng.standard_normal((6, 5)))            # unbatched (T, I)
    out_r, (h_r, c_r) = ref(x)
    out_m, (h_m, c_m) = mine(x)
    assert out_m.shape == out_r.shape == (6, 7) and h_m.shape == h_r.shape == (2, 7)
    for name, a, b in (("output", out_m, out_r), ("h_n", h_m, h_r), ("c_n", c_m, c_r)):
        assert_close(a.detach(), b.detach(), 1e-10, name)
    h0 = torch.tensor(rng.standard_normal((2, 7)))
    out_r, _ = ref(x, (h0, h0))
    out_m, _ = mine(x, (h0, h0))
    assert_close(out_m.detach(), out_r.detach(), 1e-10, "output with unbatched hx")


def _record_training_flags(monkeypatch):
    """Whether each layer-direction's forward was asked to keep what backward needs."""
    flags = []
    real = KernelLayer.forward

    def spy(self, run, *args):
        flags.append(run.need_saved)
        return real(self, run, *args)
    monkeypatch.setattr(KernelLayer, "forward", spy)
    return flags


def test_no_reserve_in_eval_or_no_grad(monkeypatch):
    flags = _record_training_flags(monkeypatch)
    ref, mine = _pair("GRU", 5, 7, torch.float64, 3, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    with torch.no_grad():
        y_nograd, _ = mine(x)
    assert flags == [False] * 4
    mine.eval()
    ref.eval()
    flags.clear()
    y_eval, _ = mine(x)
    assert flags == [False] * 4
    with torch.no_grad():
        y_ref, _ = ref(x)
    assert_close(y_nograd, y_ref, 1e-10, "no_grad output")
    assert_close(y_eval.detach(), y_ref, 1e-10, "eval output")
    # as cuDNN: no reserve, so going back through an eval-mode forward is an error
    with pytest.raises(RuntimeError, match="eval mode"):
        y_eval.sum().backward()
    mine.train()
    flags.clear()
    mine(x)[0].sum().backward()
    assert flags == [True] * 4


def test_second_backward_through_one_forward_gives_the_same_gradients():
    # what the forward saved is ordinary tensors kept by autograd: retain_graph works as in torch
    ref, mine = _pair("LSTM", 5, 7, torch.float64, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    y, _ = mine(x)
    y.sum().backward(retain_graph=True)
    first = [p.grad.clone() for p in mine.parameters()] + [x.grad.clone()]
    y.sum().backward()
    second = [p.grad for p in mine.parameters()] + [x.grad]
    for a, b in zip(first, second):
        torch.testing.assert_close(b, 2 * a, rtol=0, atol=0)
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref)[0].sum().backward()
    assert_close(x.grad / 2, x_ref.grad, 1e-10, "dx")


def test_inplace_change_before_backward_is_an_error():
    _, mine = _pair("LSTM", 5, 7, torch.float64, 5)
    x = torch.randn(4, 2, 5, dtype=torch.float64, requires_grad=True)
    xin = x * 1.0
    y, _ = mine(xin)
    xin.mul_(2.0)      # the reserve aliases xin's memory: autograd must refuse, not return wrong grads
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_dropout_between_layers_matches_torch_composition(rng):
    """Dropout after every layer but the last, only in training mode: compare against the same
    composition written with single-layer torch.nn.LSTMs and the same RNG stream."""
    I, H, L, p = 5, 7, 3, 0.4
    torch.manual_seed(0)
    mine = gt.LSTM(I, H, num_layers=L, dropout=p, bidirectional=True, dtype=torch.float64)
    layers = []
    for layer in range(L):
        ref = torch.nn.LSTM(I if layer == 0 else 2 * H, H, bidirectional=True, dtype=torch.float64)
        ref.load_state_dict({k.replace(f"_l{layer}", "_l0"): v
                             for k, v in mine.state_dict().items() if f"_l{layer}" in k})
        layers.append(ref)
    x = torch.tensor(rng.standard_normal((6, 3, I)))
    torch.manual_seed(123)
    y_mine, _ = mine(x)
    torch.manual_seed(123)
    h = x
    for layer, ref in enumerate(layers):
        h, _ = ref(h)
        if layer < L - 1:
            h = torch.nn.functional.dropout(h, p=p, training=True)
    assert_close(y_mine.detach(), h.detach(), 1e-10, "output with dropout")
    torch.manual_seed(123)
    y_again, _ = mine(x)
    assert torch.equal(y_again, y_mine)
    mine.eval()
    with torch.no_grad():
        y_eval = mine(x)[0]
    assert not torch.allclose(y_eval, y_mine)       # eval mode: no dropout


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        gt.LSTM(5, 7, proj_size=7)
    with pytest.raises(ValueError, match="hidden_size must be >= 1; got 0"):
        gt.GRU(5, 0)
    mine = gt.LSTM(5, 7, num_layers=2)
    with pytest.raises(ValueError, match=r"h_0 has shape \(1, 3, 7\); expected \(L\*D, B, H\) = \(2, 3, 7\)"):
        mine(torch.randn(4, 3, 5), (torch.zeros(1, 3, 7), torch.zeros(2, 3, 7)))
    with pytest.raises(ValueError, match="input has 6 features; expected input_size = 5"):
        mine(torch.randn(4, 3, 6))
    with pytest.raises(TypeError, match="input is torch.float64 on cpu; expected torch.float32"):
        mine(torch.randn(4, 3, 5, dtype=torch.float64))
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        gt.RNN(5, 7, dropout=0.5)


def _cuda_reason():
    ok, reason = gpurnn.backends.availability("cuda")
    if ok and not torch.cuda.is_available():
        return False, "torch was built without CUDA or sees no device"
    return ok, reason


_CUDA_OK, _CUDA_REASON = _cuda_reason()


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA_OK, reason=f"needs a CUDA device: {_CUDA_REASON}")
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_cuda_tensors_match_cpu(cell, rng):
    """CUDA tensors go through DLPack to the 'cuda' backend; compare with the CPU path."""
    _, cpu = _pair(cell, 5, 33, torch.float32, 9, num_layers=2, bidirectional=True)
    gpu = MINE[cell](5, 33, num_layers=2, bidirectional=True, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    x = rng.standard_normal((7, 3, 5)).astype(np.float32)
    lengths = torch.tensor([7, 2, 5])
    grads = []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        xt = torch.tensor(x, device=device, requires_grad=True)
        out, _ = module(pack_padded_sequence(xt, lengths, enforce_sorted=False))
        y, _ = pad_packed_sequence(out)
        (y * y).sum().backward()
        grads.append((y.detach().cpu(), xt.grad.cpu(),
                      {k: p.grad.cpu() for k, p in module.named_parameters()}))
    (y_c, dx_c, dp_c), (y_g, dx_g, dp_g) = grads
    assert_close(y_g, y_c, 1e-5, "output")
    assert_close(dx_g, dx_c, 1e-5, "d input")
    for key in dp_c:
        assert_close(dp_g[key], dp_c[key], 1e-5, f"d {key}")
