"""The gated-feedback RNN (gpurnn.feedback) through both module families: parameters and
checks, the NumPy skin's backward against the torch skin's autograd (lengths through packing),
opcheck and torch.compile(fullgraph=True) of the stack operator."""
import numpy as np
import pytest

import gpurnn

torch = pytest.importorskip("torch")
import gpurnn.torch as gt  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from gpurnn.testing import assert_close  # noqa: E402

T, B, I, H, L = 5, 3, 4, 6, 3
FAMILIES = {"gf_lstm": (gpurnn.GFLSTM, gt.GFLSTM, {}), "gf_gru": (gpurnn.GFGRU, gt.GFGRU, {}),
            "gf_rnn_relu": (gpurnn.GFRNN, gt.GFRNN, {"nonlinearity": "relu"})}


@pytest.mark.parametrize("cell", list(FAMILIES))
def test_the_two_families_agree(cell, rng):
    np_cls, t_cls, kw = FAMILIES[cell]
    ours = np_cls(I, H, L, dtype="float64", backend="numpy", seed=2, **kw)
    tm = t_cls(I, H, L, dtype=torch.float64, backend="numpy", **kw)
    assert list(tm.state_dict()) == list(ours.state_dict())
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    has_c = cell == "gf_lstm"
    x, lengths = rng.standard_normal((T, B, I)), np.array([5, 2, 4])
    out = ours(x, lengths=lengths)
    y, h_n = out[0], out[1][0] if has_c else out[1]
    assert y.shape == (T, B, H) and h_n.shape == (L, B, H)
    dy = rng.standard_normal(y.shape) * (np.arange(T)[:, None, None] < lengths[None, :, None])
    dh = rng.standard_normal(h_n.shape)
    dhx = (dh, np.zeros_like(dh)) if has_c else dh
    dx, _ = ours.backward(dy, dhx)
    xt = torch.from_numpy(x).requires_grad_()
    packed, state = tm(pack_padded_sequence(xt, torch.from_numpy(lengths), enforce_sorted=False))
    yt, _ = pad_packed_sequence(packed, total_length=T)
    ht = state[0] if has_c else state
    ((yt * torch.from_numpy(dy)).sum() + (ht * torch.from_numpy(dh)).sum()).backward()
    assert_close(y, yt.detach().numpy(), 1e-12, "y")
    assert_close(h_n, ht.detach().numpy(), 1e-12, "h_n")
    assert_close(dx, xt.grad.numpy(), 1e-12, "dx")
    for key, p in tm.named_parameters():
        assert_close(ours.grads[key], p.grad.numpy(), 1e-12, key)


def test_checks():
    with pytest.raises(ValueError, match="bidirectional=True is not supported for gf_lstm"):
        gpurnn.GFLSTM(I, H, 2, bidirectional=True)
    with pytest.raises(ValueError, match="bidirectional=True is not supported for gf_gru"):
        gt.GFGRU(I, H, 2, bidirectional=True)
    with pytest.raises(ValueError, match="zoneout and recurrent_dropout are not supported"):
        gpurnn.GFGRU(I, H, 2, zoneout=0.1)
    sd = gpurnn.GFRNN(I, H, 2, bias=False).state_dict()
    assert list(sd) == ["weight_ih_l0", "weight_fb_l0", "weight_gx_l0", "weight_gh_l0",
                        "weight_ih_l1", "weight_fb_l1", "weight_gx_l1", "weight_gh_l1"]
    assert sd["weight_fb_l1"].shape == (H, 2 * H) and sd["weight_gh_l0"].shape == (2, 2 * H)


def test_opcheck_and_compile_on_a_gated_feedback_lstm():
    from torch.library import opcheck
    torch.manual_seed(4)
    m = gt.GFLSTM(I, H, 2, dtype=torch.float64, backend="numpy")
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 3, H, dtype=torch.float64, requires_grad=True)
    args = (x, h0, c0, torch.tensor([4, 1, 3]), list(m.parameters()), [], [], "", m.cell, I, H,
            2, True, False, "numpy", True)
    opcheck(torch.ops.gpurnn.stack_forward.default, args)

    def loss(x):
        y, (h, c) = m(x)
        return y.square().sum() + c.sum()
    eager = loss(x.detach())
    eager.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x.detach())
    compiled.backward()
    assert_close(compiled.detach().numpy(), eager.detach().numpy(), 1e-12, "loss")
    for n, p in m.named_parameters():
        assert_close(p.grad.numpy(), want[n].numpy(), 1e-12, n)


@pytest.mark.skipif(not __import__("gpurnn.backends", fromlist=["availability"]).availability("sim")[0],
                    reason="the simulator backend needs numba-cuda")
@pytest.mark.parametrize("cell", ["gf_lstm", "gf_gru"])
def test_the_module_reaches_the_whole_stack_kernels_on_the_simulator(cell, rng):
    """FeedbackStack on the sim backend runs gpurnn/kernels/feedback.py (P = 2 blocks in one
    launch, strict simulator) and agrees with the NumPy family in float64."""
    np_cls, _, kw = FAMILIES[cell]
    ref = np_cls(3, 5, 2, dtype="float64", backend="numpy", seed=3, **kw)
    sim = np_cls(3, 5, 2, dtype="float64", backend="sim", seed=3, **kw)
    x, lengths = rng.standard_normal((4, 2, 3)), np.array([4, 2])
    opts = {"threads": 32, "blocks": 2}
    a, b = ref(x, lengths=lengths), sim(x, lengths=lengths, backend_options=opts)
    assert_close(b[0], a[0], 1e-12, "y")
    dy = rng.standard_normal(a[0].shape)
    assert_close(sim.backward(dy)[0], ref.backward(dy)[0], 1e-12, "dx")
    for key, g in ref.grads.items():
        assert_close(sim.grads[key], g, 1e-12, key)
