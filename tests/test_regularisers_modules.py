"""Zoneout, variational recurrent dropout and the LayerNormLSTM through both module families:
keywords and their checks, masks from the module's seeded generator (reproducible, the same on
every backend), evaluation's expectation, reductions to the plain cells, gradients against
finite differences with the masks fixed, and the two families agreeing."""
import numpy as np
import pytest

import gpurnn
from gpurnn.backends import availability
from gpurnn.testing import assert_close

T, B, I, H = 5, 3, 4, 6
LENGTHS = np.array([5, 2, 4])
CLASSES = {"lstm": (gpurnn.LSTM, (0.3, 0.2)), "gru": (gpurnn.GRU, 0.3),
           "rnn": (gpurnn.RNN, 0.3), "layernorm_lstm": (gpurnn.LayerNormLSTM, (0.3, 0.2))}
HOST = ["numpy", "cpu"] if availability("cpu")[0] else ["numpy"]


def _module(name, backend="numpy", seed=4, zoneout=True, recurrent=0.25, **kw):
    cls, p = CLASSES[name]
    return cls(I, H, 2, bidirectional=True, dtype="float64", backend=backend, seed=seed,
               zoneout=p if zoneout else None, recurrent_dropout=recurrent, **kw)


@pytest.mark.parametrize("name", list(CLASSES))
def test_masks_are_drawn_from_the_seed_and_kept_for_backward(name, rng):
    m = _module(name)
    x = rng.standard_normal((T, B, I))
    y, _ = m(x, lengths=LENGTHS)
    noise = m._saved[1].noise
    assert len(noise) == 4                                   # one per layer-direction
    keys = {"recurrent", "zoneout_h"} | ({"zoneout_c"} if "lstm" in name else set())
    assert set(noise[0]) == keys
    assert noise[0]["recurrent"].shape == (B, H) and noise[1]["zoneout_h"].shape == (T, B, H)
    assert set(np.unique(noise[0]["zoneout_h"])) == {0.0, 1.0}
    assert set(np.unique(noise[0]["recurrent"])) <= {0.0, 1 / 0.75}
    assert not np.array_equal(noise[0]["zoneout_h"], noise[1]["zoneout_h"])
    again = _module(name)
    y2, _ = again(x, lengths=LENGTHS)
    assert np.array_equal(y, y2)                             # same seed, same masks
    y3, _ = _module(name, seed=5)(x, lengths=LENGTHS)
    assert not np.array_equal(y, y3)


@pytest.mark.parametrize("backend", HOST[1:])
@pytest.mark.parametrize("name", list(CLASSES))
def test_the_same_seed_gives_the_same_result_on_every_backend(name, backend, rng):
    x = rng.standard_normal((T, B, I))
    ref, other = _module(name), _module(name, backend=backend)
    y_ref, _ = ref(x, lengths=LENGTHS)
    y, _ = other(x, lengths=LENGTHS)
    assert_close(y, y_ref, 1e-12, "y")
    dy = rng.standard_normal(y.shape)
    assert_close(other.backward(dy)[0], ref.backward(dy)[0], 1e-12, "dx")


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn"])
def test_no_regulariser_is_the_plain_cell_exactly(name, rng):
    cls, _ = CLASSES[name]
    plain = cls(I, H, 2, bidirectional=True, dtype="float64", backend="numpy", seed=4)
    zero = _module(name, zoneout=False, recurrent=0.0)
    x = rng.standard_normal((T, B, I))
    ya, _ = plain(x, lengths=LENGTHS)
    yb, _ = zero(x, lengths=LENGTHS)
    assert np.array_equal(ya, yb)
    m = cls(I, H, dtype="float64", backend="numpy", zoneout=(0.0, 0.0) if name == "lstm" else 0.0)
    assert m._stack.noise_specs(T, B, True) is None         # p = 0 draws nothing


@pytest.mark.parametrize("name", list(CLASSES))
def test_evaluation_uses_the_expectation_and_no_recurrent_dropout(name, rng):
    m = _module(name).eval()
    x = rng.standard_normal((T, B, I))
    state = m._rng.bit_generator.state
    y, _ = m(x, lengths=LENGTHS)
    assert m._rng.bit_generator.state == state              # evaluation draws nothing
    specs = m._stack.noise_specs(T, B, training=False)
    assert "recurrent" not in specs[0]
    _, p = CLASSES[name]
    p_h = p[0] if isinstance(p, tuple) else p
    assert specs[0]["zoneout_h"] == ((T, B, H), "fill", p_h)
    y2, _ = m(x, lengths=LENGTHS)
    assert np.array_equal(y, y2)                            # deterministic


@pytest.mark.parametrize("name", list(CLASSES))
def test_module_backward_matches_finite_differences_with_the_masks_fixed(name, rng):
    m = _module(name, dropout=0.3)
    x = rng.standard_normal((T, B, I))
    state = m._rng.bit_generator.state
    y, (h_n, *rest) = m(x, lengths=LENGTHS) if "lstm" in name else (lambda r: (r[0], (r[1],)))(
        m(x, lengths=LENGTHS))
    dy, dh = rng.standard_normal(y.shape), rng.standard_normal(h_n.shape)
    dhx = (dh, np.zeros_like(dh)) if "lstm" in name else dh
    dx, _ = m.backward(dy, dhx)
    key = "weight_hh_l0_reverse"
    dw = m.grads[key].copy()
    direction, wdir = rng.standard_normal(x.shape), rng.standard_normal(dw.shape)
    w0 = m._params[key].copy()
    eps = 1e-6

    def loss(sign):
        m._rng.bit_generator.state = state                  # the same masks every time
        m._params[key] = w0 + sign * eps * wdir
        out = m(x + sign * eps * direction, lengths=LENGTHS)
        hn = out[1][0] if "lstm" in name else out[1]
        return float((out[0] * dy).sum() + (hn * dh).sum())
    numeric = (loss(1) - loss(-1)) / (2 * eps)
    m._params[key] = w0
    assert numeric == pytest.approx(float((dx * direction).sum() + (dw * wdir).sum()), rel=1e-6)


def test_keyword_checks():
    with pytest.raises(ValueError, match=r"zoneout for lstm must be a pair \(p_h, p_c\)"):
        gpurnn.LSTM(I, H, zoneout=0.1)
    with pytest.raises(ValueError, match="zoneout for gru is one probability"):
        gpurnn.GRU(I, H, zoneout=(0.1, 0.1))
    with pytest.raises(ValueError, match=r"zoneout p_c must be a number in \[0, 1\)"):
        gpurnn.LSTM(I, H, zoneout=(0.1, 1.0))
    with pytest.raises(ValueError, match=r"recurrent_dropout must be a number in \[0, 1\)"):
        gpurnn.GRU(I, H, recurrent_dropout=-0.1)
    with pytest.raises(ValueError, match="not supported for lstm_peephole"):
        gpurnn.LSTM(I, H, peephole=True, recurrent_dropout=0.1)
    assert gpurnn.GRU(I, H, zoneout=0.2).zoneout == 0.2
    assert gpurnn.LSTM(I, H, zoneout=(0.2, 0.1)).zoneout == (0.2, 0.1)


def test_layernorm_lstm_parameters_and_initial_values():
    m = gpurnn.LayerNormLSTM(I, H, 2, bidirectional=True)
    sd = m.state_dict()
    for sfx in ("_l0", "_l1_reverse"):
        for side, width in (("x", 4 * H), ("h", 4 * H), ("c", H)):
            assert np.array_equal(sd[f"layernorm_{side}_weight{sfx}"], np.ones(width))
            assert np.array_equal(sd[f"layernorm_{side}_bias{sfx}"], np.zeros(width))
    assert sd["weight_ih_l1"].shape == (4 * H, 2 * H) and sd["bias_hh_l0"].shape == (4 * H,)
    assert len(sd) == 4 * 10
    with pytest.raises(TypeError, match="float32.*float64"):
        gpurnn.LayerNormLSTM(I, H, dtype="float16")


torch = pytest.importorskip("torch")
import gpurnn.torch as gt  # noqa: E402


def test_torch_layernorm_lstm_matches_the_numpy_family(rng):
    """Same weights, no noise: the torch skin's autograd equals the NumPy skin's backward."""
    ours = gpurnn.LayerNormLSTM(I, H, 2, bidirectional=True, dtype="float64", backend="numpy", seed=2)
    sd = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in ours.state_dict().items()}
    ours.load_state_dict(sd)
    tm = gt.LayerNormLSTM(I, H, 2, bidirectional=True, dtype=torch.float64, backend="numpy")
    assert list(tm.state_dict()) == list(sd)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    x = rng.standard_normal((T, B, I))
    y, (h_n, c_n) = ours(x)
    dy = rng.standard_normal(y.shape)
    dx, _ = ours.backward(dy)
    xt = torch.from_numpy(x).requires_grad_()
    yt, (ht, ct) = tm(xt)
    (yt * torch.from_numpy(dy)).sum().backward()
    assert_close(y, yt.detach().numpy(), 1e-12, "y")
    assert_close(dx, xt.grad.numpy(), 1e-12, "dx")
    for key, p in tm.named_parameters():
        assert_close(ours.grads[key], p.grad.numpy(), 1e-12, key)


@pytest.mark.parametrize("name", ["lstm", "gru", "layernorm_lstm"])
def test_torch_modules_draw_masks_from_torch_and_train(name):
    cls = {"lstm": gt.LSTM, "gru": gt.GRU, "layernorm_lstm": gt.LayerNormLSTM}[name]
    p = 0.3 if name == "gru" else (0.3, 0.2)
    m = cls(I, H, 2, zoneout=p, recurrent_dropout=0.25, dtype=torch.float64, backend="numpy")
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    y1 = m(x)[0]
    torch.manual_seed(11)
    y2 = m(x)[0]
    assert torch.equal(y1, y2)                               # torch's seed fixes the masks
    y3 = m(x)[0]
    assert not torch.equal(y1, y3)
    y1.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        e1, e2 = m(x)[0], m(x)[0]
    assert torch.equal(e1, e2)                               # the expectation: no randomness
    assert "zoneout=" in repr(m) and "recurrent_dropout=0.25" in repr(m)


def test_opcheck_with_noise():
    from torch.library import opcheck
    torch.manual_seed(3)
    m = gt.LSTM(I, H, 2, dtype=torch.float64)
    x = torch.randn(4, 3, I, dtype=torch.float64, requires_grad=True)
    noise = []
    for _ in range(2):
        noise += [(torch.rand(3, H, dtype=torch.float64) > 0.3) / 0.7,
                  (torch.rand(4, 3, H, dtype=torch.float64) < 0.2).double()]
    args = (x, None, None, torch.tensor([4, 1, 3]), list(m.parameters()), [], noise,
            "recurrent,zoneout_h", "lstm", I, H, 2, True, False, "numpy", True)
    opcheck(torch.ops.gpurnn.stack_forward.default, args)
