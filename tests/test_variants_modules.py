"""The LSTM family of gpurnn.variants through both module families: torch.nn.LSTM(proj_size=...)
parity (outputs, states, every gradient; multi-layer, bidirectional, packed input; torch's
state_dict loads), the peephole / coupled / multiplicative keywords and their parameters, the
two families agreeing with each other, and the constructor's checks."""
import numpy as np
import pytest

import gpurnn
from gpurnn.backends import availability
from gpurnn.testing import assert_close

torch = pytest.importorskip("torch")
import gpurnn.torch as gt  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

# torch.nn.LSTM's own projection path says it does not use oneDNN (the reference is torch's
# default implementation, which is what we compare with)
pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning")

T, B, I, H, P = 5, 3, 4, 6, 3
# f32 1e-5, f64 1e-10 (the proj_size parity tolerances)
PARITY = {torch.float32: 1e-5, torch.float64: 1e-10}
HOST_BACKENDS = ["numpy", "cpu"] if availability("cpu")[0] else ["numpy"]


def _torch_pair(dtype, num_layers, bidirectional, backend, seed=0, **kw):
    torch.manual_seed(seed)
    ref = torch.nn.LSTM(I, H, num_layers, bidirectional=bidirectional, proj_size=P, dtype=dtype,
                        **kw)
    ours = gt.LSTM(I, H, num_layers, bidirectional=bidirectional, proj_size=P, dtype=dtype,
                   backend=backend, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_proj_size_matches_torch_nn_lstm(backend, dtype, bidirectional):
    ref, ours = _torch_pair(dtype, 2, bidirectional, backend)
    D = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, I, dtype=dtype, generator=g)
    h0 = torch.randn(2 * D, B, P, dtype=dtype, generator=g)
    c0 = torch.randn(2 * D, B, H, dtype=dtype, generator=g)
    dy = torch.randn(T, B, D * P, dtype=dtype, generator=g)
    dh = torch.randn(2 * D, B, P, dtype=dtype, generator=g)
    dc = torch.randn(2 * D, B, H, dtype=dtype, generator=g)
    results = []
    for m in (ref, ours):
        xs, hs, cs = (t.clone().requires_grad_() for t in (x, h0, c0))
        y, (h_n, c_n) = m(xs, (hs, cs))
        assert y.shape == (T, B, D * P) and h_n.shape == (2 * D, B, P) and c_n.shape == (2 * D, B, H)
        ((y * dy).sum() + (h_n * dh).sum() + (c_n * dc).sum()).backward()
        results.append(((y, h_n, c_n, xs.grad, hs.grad, cs.grad), _grads(m)))
    tol = PARITY[dtype]
    for name, a, b in zip(("y", "h_n", "c_n", "dx", "dh0", "dc0"), results[1][0], results[0][0]):
        assert_close(a.detach().numpy(), b.detach().numpy(), tol, name)
    assert set(results[1][1]) == set(results[0][1])
    for name, gref in results[0][1].items():
        assert_close(results[1][1][name].numpy(), gref.numpy(), tol, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_proj_size_packed_input_matches_torch(dtype):
    ref, ours = _torch_pair(dtype, 2, True, "numpy", seed=3, batch_first=True)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, I, dtype=dtype, generator=g)
    lengths = torch.tensor([3, 5, 1])
    outs = []
    for m in (ref, ours):
        xs = x.clone().requires_grad_()
        packed = pack_padded_sequence(xs, lengths, batch_first=True, enforce_sorted=False)
        out, (h_n, c_n) = m(packed)
        y, _ = pad_packed_sequence(out, batch_first=True)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)).sum() \
            + h_n.square().sum() + c_n.sin().sum()
        loss.backward()
        outs.append((y, h_n, c_n, xs.grad, _grads(m)))
    tol = PARITY[dtype]
    for name, a, b in zip(("y", "h_n", "c_n", "dx"), outs[1][:4], outs[0][:4]):
        assert_close(a.detach().numpy(), b.detach().numpy(), tol, name)
    for name, gref in outs[0][4].items():
        assert_close(outs[1][4][name].numpy(), gref.numpy(), tol, name)


def test_numpy_module_with_projection_loads_torch_state_dict_and_matches():
    torch.manual_seed(5)
    ref = torch.nn.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=torch.float64)
    m = gpurnn.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype="float64", backend="numpy")
    assert list(m.state_dict()) == list(ref.state_dict())
    m.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    y_ref, (h_ref, c_ref) = ref(x)
    dy = torch.randn_like(y_ref)
    (y_ref * dy).sum().backward()
    y, (h_n, c_n) = m(x.detach().numpy())
    dx, (dh0, dc0) = m.backward(dy.numpy())
    assert dh0.shape == (4, B, P) and dc0.shape == (4, B, H)
    for name, a, b in (("y", y, y_ref), ("h_n", h_n, h_ref), ("c_n", c_n, c_ref), ("dx", dx, x.grad)):
        assert_close(a, b.detach().numpy(), 1e-10, name)
    for name, p in ref.named_parameters():
        assert_close(m.grads[name], p.grad.numpy(), 1e-10, name)


VARIANTS = [
    ("peephole", dict(peephole=True), {"weight_ch": (3 * H,)}, 4),
    ("cifg", dict(coupled=True), {}, 3),
    ("cifg_peephole", dict(coupled=True, peephole=True), {"weight_ch": (2 * H,)}, 3),
    ("peephole_proj", dict(peephole=True, proj_size=P), {"weight_ch": (3 * H,), "weight_hr": (P, H)}, 4),
    ("mlstm", None, {"weight_mx": (H, I), "weight_mh": (H, H)}, 4),
]


def _make(family, kw, **more):
    if kw is None:
        return (gpurnn.MLSTM if family == "numpy" else gt.MLSTM)(I, H, **more)
    return (gpurnn.LSTM if family == "numpy" else gt.LSTM)(I, H, **kw, **more)


@pytest.mark.parametrize("name,kw,extra,G", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_parameters_have_the_documented_names_and_shapes(name, kw, extra, G):
    for family in ("numpy", "torch"):
        m = _make(family, kw, num_layers=2, bidirectional=True)
        sd = m.state_dict()
        R = P if (kw or {}).get("proj_size") else H
        assert tuple(sd["weight_ih_l0"].shape) == (G * H, I)
        assert tuple(sd["weight_hh_l1_reverse"].shape) == (G * H, R)
        assert tuple(sd["weight_ih_l1"].shape) == (G * H, 2 * R)
        assert tuple(sd["bias_hh_l0"].shape) == (G * H,)
        for key, shape in extra.items():
            for sfx in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
                layer_in = I if sfx.startswith("_l0") else 2 * R
                want = (H, layer_in) if key == "weight_mx" else shape
                assert tuple(sd[key + sfx].shape) == want, key + sfx
        assert len(sd) == 4 * (4 + len(extra))


@pytest.mark.parametrize("name,kw,extra,G", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_both_module_families_agree_on_every_variant(name, kw, extra, G, rng):
    """The numpy skin's explicit backward equals the torch skin's autograd (same weights,
    float64, two bidirectional layers, dropout between them off, lengths via packing)."""
    ours = _make("numpy", kw, num_layers=2, bidirectional=True, dtype="float64", backend="numpy")
    tm = _make("torch", kw, num_layers=2, bidirectional=True, dtype=torch.float64, backend="numpy")
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    R = P if (kw or {}).get("proj_size") else H
    x = rng.standard_normal((T, B, I))
    lengths = np.array([5, 2, 4])
    y, (h_n, c_n) = ours(x, lengths=lengths)
    dy = rng.standard_normal(y.shape) * (np.arange(T)[:, None, None] < lengths[None, :, None])
    dh, dc = rng.standard_normal(h_n.shape), rng.standard_normal(c_n.shape)
    dx, (dh0, dc0) = ours.backward(dy, (dh, dc))
    assert y.shape == (T, B, 2 * R) and h_n.shape == (4, B, R) and c_n.shape == (4, B, H)

    xt = torch.from_numpy(x).requires_grad_()
    packed = pack_padded_sequence(xt, torch.from_numpy(lengths), enforce_sorted=False)
    out, (ht, ct) = tm(packed)
    yt, _ = pad_packed_sequence(out, total_length=T)
    ((yt * torch.from_numpy(dy)).sum() + (ht * torch.from_numpy(dh)).sum()
     + (ct * torch.from_numpy(dc)).sum()).backward()
    for label, a, b in (("y", y, yt), ("h_n", h_n, ht), ("c_n", c_n, ct), ("dx", dx, xt.grad)):
        assert_close(a, b.detach().numpy(), 1e-12, label)
    for key, p in tm.named_parameters():
        assert_close(ours.grads[key], p.grad.numpy(), 1e-12, key)
    assert np.isfinite(dh0).all() and np.isfinite(dc0).all()


def test_peephole_with_zero_weights_is_the_plain_lstm_through_the_modules(rng):
    plain = gpurnn.LSTM(I, H, 2, dtype="float64", backend="numpy", seed=1)
    peep = gpurnn.LSTM(I, H, 2, dtype="float64", backend="numpy", peephole=True, seed=1)
    sd = plain.state_dict()
    sd.update({k: np.zeros_like(v) for k, v in peep.state_dict().items() if "weight_ch" in k})
    peep.load_state_dict(sd)
    x = rng.standard_normal((T, B, I))
    ya, (ha, ca) = plain(x)
    yb, (hb, cb) = peep(x)
    assert np.array_equal(ya, yb) and np.array_equal(ha, hb) and np.array_equal(ca, cb)
    dy = rng.standard_normal(ya.shape)
    dxa, _ = plain.backward(dy)
    dxb, _ = peep.backward(dy)
    assert np.array_equal(dxa, dxb)
    for key, g in plain.grads.items():
        assert np.array_equal(peep.grads[key], g), key
    assert any(np.abs(g).max() > 0 for k, g in peep.grads.items() if "weight_ch" in k)


def test_constructor_checks():
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        gpurnn.LSTM(I, H, proj_size=H)
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        gt.LSTM(I, H, proj_size=H + 1)
    with pytest.raises(ValueError, match="proj_size must be an int >= 0"):
        gpurnn.LSTM(I, H, proj_size=-1)
    with pytest.raises(ValueError, match="proj_size is only for LSTM"):
        gt.GRU(I, H, proj_size=2)
    with pytest.raises(ValueError, match="proj_size is only for LSTM"):
        gt.MLSTM(I, H, proj_size=2)
    with pytest.raises(TypeError, match="float32.*float64"):
        gpurnn.LSTM(I, H, peephole=True, dtype="float16")
    with pytest.raises(TypeError, match="float32.*float64"):
        gt.LSTM(I, H, coupled=True, dtype=torch.bfloat16)
    # a state of the wrong width names the projected shape
    m = gt.LSTM(I, H, proj_size=P)
    with pytest.raises(ValueError, match=r"h_0 has shape .*\(L\*D, B, proj_size\)"):
        m(torch.randn(T, B, I), (torch.zeros(1, B, H), torch.zeros(1, B, H)))
    with pytest.raises(ValueError, match=r"c_0 has shape .*\(L\*D, B, H\)"):
        m(torch.randn(T, B, I), (torch.zeros(1, B, P), torch.zeros(1, B, P)))


def test_opcheck_on_a_projected_peephole_stack():
    from torch.library import opcheck
    torch.manual_seed(2)
    m = gt.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, peephole=True,
                dtype=torch.float64)
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 3, P, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, H, dtype=torch.float64, requires_grad=True)
    masks = [torch.ones(4, 3, 2 * P, dtype=torch.float64) * 1.25]
    args = (x, h0, c0, torch.tensor([4, 1, 3]), list(m.parameters()), masks, [], "", m.cell, I, H, 2,
            True, True, "numpy", True)
    opcheck(torch.ops.gpurnn.stack_forward.default, args)


def test_torch_compile_fullgraph_on_a_projected_lstm():
    torch.manual_seed(7)
    m = gt.LSTM(I, H, proj_size=P, dtype=torch.float64, backend="numpy")
    x = torch.randn(T, B, I, dtype=torch.float64)

    def loss(x):
        y, (h, c) = m(x)
        return y.square().sum() + c.sum()
    eager = loss(x)
    eager.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    assert_close(compiled.detach().numpy(), eager.detach().numpy(), 1e-12, "loss")
    for n, p in m.named_parameters():
        assert_close(p.grad.numpy(), want[n].numpy(), 1e-12, n)


SIM = availability("sim")[0]


@pytest.mark.skipif(not SIM, reason="the simulator backend needs numba-cuda")
@pytest.mark.parametrize("cls,kw", [(gpurnn.LSTM, dict(peephole=True)),
                                    (gpurnn.LSTM, dict(coupled=True, proj_size=2)),
                                    (gpurnn.MLSTM, {})], ids=["peephole", "cifg_proj", "mlstm"])
def test_variant_modules_on_the_strict_simulator_match_numpy(cls, kw, rng):
    """The module's call reaches the kernels (two bidirectional layers, lengths, P = 2 blocks in
    one launch under the strict simulator) and agrees with the NumPy reference in float64."""
    ref = cls(3, 5, 2, bidirectional=True, backend="numpy", seed=1, dtype="float64", **kw)
    sim = cls(3, 5, 2, bidirectional=True, backend="sim", seed=1, dtype="float64", **kw)
    x, lengths = rng.standard_normal((4, 3, 3)), np.array([4, 1, 3])
    opts = {"threads": 32, "blocks": 2}
    y_ref, (h_ref, c_ref) = ref(x, lengths=lengths)
    y, (h_n, c_n) = sim(x, lengths=lengths, backend_options=opts)
    dy = rng.standard_normal(y.shape)
    dx_ref, _ = ref.backward(dy)
    dx, _ = sim.backward(dy)
    for name, a, b in (("y", y, y_ref), ("h_n", h_n, h_ref), ("c_n", c_n, c_ref), ("dx", dx, dx_ref)):
        assert_close(a, b, 1e-12, name)
    for key, g in ref.grads.items():
        assert_close(sim.grads[key], g, 1e-12, key)


@pytest.mark.parametrize("cls,kw", [(gpurnn.LSTM, dict(peephole=True, proj_size=2)),
                                    (gpurnn.LSTM, dict(coupled=True)), (gpurnn.MLSTM, {})],
                         ids=["peephole_proj", "cifg", "mlstm"])
def test_dropout_between_variant_layers_matches_finite_differences(cls, kw, rng):
    """Two bidirectional layers with dropout 0.4 between them (masks of width D*R), lengths:
    the module's backward against central differences of the same masks, float64."""
    m = cls(3, 5, 2, bidirectional=True, dropout=0.4, backend="numpy", seed=3, dtype="float64", **kw)
    x, lengths = rng.standard_normal((4, 3, 3)), np.array([4, 2, 3])
    state = m._rng.bit_generator.state
    y, (h_n, c_n) = m(x, lengths=lengths)
    R = kw.get("proj_size") or 5
    assert y.shape == (4, 3, 2 * R) and m._saved[1].masks[0].shape == (4, 3, 2 * R)
    assert (m._saved[1].masks[0] == 0).any()           # some units really were dropped
    dy, dh = rng.standard_normal(y.shape), rng.standard_normal(h_n.shape)
    dx, _ = m.backward(dy, (dh, np.zeros_like(c_n)))
    direction = rng.standard_normal(x.shape)
    eps = 1e-6

    def loss(xv):
        m._rng.bit_generator.state = state             # the same masks every time
        yv, (hv, _) = m(xv, lengths=lengths)
        return float((yv * dy).sum() + (hv * dh).sum())
    numeric = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
    assert numeric == pytest.approx(float((dx * direction).sum()), rel=1e-6)
