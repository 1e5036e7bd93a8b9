"""A failed call changes nothing: each failure is provoked, then the valid call is made and must
give exactly what it gives without the failure before it (reserves not used up, gradients not
half added, parameters and generators untouched)."""
import numpy as np
import pytest

import gpurnn
import gpurnn.functional as F
from gpurnn.backends import BACKENDS, availability
from gpurnn.stack import KernelLayer
from gpurnn.cells import GATES

T, B, I, H = 3, 2, 3, 4


def _args(cell, rng, dtype=np.float64):
    G = GATES[cell]
    a = {"x": rng.standard_normal((T, B, I)), "w_ih": rng.uniform(-0.5, 0.5, (G * H, I)),
         "w_hh": rng.uniform(-0.5, 0.5, (G * H, H)), "b_ih": rng.uniform(-0.5, 0.5, G * H),
         "b_hh": rng.uniform(-0.5, 0.5, G * H), "h0": rng.standard_normal((B, H)),
         "c0": rng.standard_normal((B, H)) if cell == "lstm" else None}
    return {k: None if v is None else v.astype(dtype) for k, v in a.items()}


def _assert_grads_equal(got, want):
    for name, w in want._asdict().items():
        if w is None:
            assert getattr(got, name) is None, name
        else:
            np.testing.assert_array_equal(getattr(got, name), w, err_msg=name)


@pytest.mark.parametrize("bad,exc,text", [({"no_such_option": 1}, ValueError, "no_such_option"),
                                          (["path"], TypeError, "backend_options must be a dict or None; got list")],
                         ids=["unknown-key", "not-a-dict"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_with_rejected_options_keeps_the_reserve(backend, bad, exc, text, rng):
    ok, why = availability(backend)
    if not ok:
        pytest.skip(f"backend {backend!r} is not available here: {why}")
    a = _args("lstm", rng, np.float32)
    y, h_n, c_n, res = F.forward("lstm", **a, backend=backend)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    with pytest.raises(exc, match=text):
        F.backward(res, dy, backend_options=bad)
    assert not res.consumed
    got = F.backward(res, dy)                         # the retry: the forward's work is not lost
    *_, twin = F.forward("lstm", **a, backend=backend)
    _assert_grads_equal(got, F.backward(twin, dy))
    with pytest.raises(RuntimeError, match="already used"):
        F.backward(res, dy)                            # and a success does use it up


def test_backward_that_fails_inside_the_backend_keeps_the_reserve(monkeypatch, rng):
    from gpurnn.backends import numpy as npb
    real = npb.backward
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("provoked")
        return real(*args, **kwargs)
    monkeypatch.setattr(npb, "backward", fails_once)
    a = _args("gru", rng)
    y, _, _, res = F.forward("gru", **a, backend="numpy")
    with pytest.raises(MemoryError):
        F.backward(res, np.ones_like(y))
    got = F.backward(res, np.ones_like(y))
    *_, twin = F.forward("gru", **a, backend="numpy")
    _assert_grads_equal(got, real(twin, np.ones_like(y), np.zeros((B, H)), None))


@pytest.mark.parametrize("cls", [gpurnn.LSTM, gpurnn.GRU], ids=["LSTM", "GRU"])
def test_module_backward_failing_in_a_lower_layer_adds_no_gradient(cls, monkeypatch, rng):
    kw = dict(num_layers=3, bidirectional=True, dropout=0.3, dtype="float64", seed=7)
    m, twin = cls(I, H, **kw), cls(I, H, **kw)
    x = rng.standard_normal((T, B, I))
    y, _ = m(x, lengths=[T, 1])
    twin(x, lengths=[T, 1])
    m.grads["weight_hh_l2"] += 1.0                    # gradients from an earlier step, kept
    twin.grads["weight_hh_l2"] += 1.0
    dy = rng.standard_normal(y.shape)
    real = KernelLayer.backward
    calls = []

    def fails_in_layer_0(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:                             # layers 2 and 1 done, layer 0 fails
            raise RuntimeError("provoked")
        return real(*args, **kwargs)
    monkeypatch.setattr(KernelLayer, "backward", fails_in_layer_0)
    before = {k: v.copy() for k, v in m.grads.items()}
    with pytest.raises(RuntimeError, match="provoked"):
        m.backward(dy)
    for k, v in m.grads.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed by a failed backward")
    monkeypatch.setattr(KernelLayer, "backward", real)
    dx, _ = m.backward(dy)                              # the same call again succeeds ...
    dx_twin, _ = twin.backward(dy)
    np.testing.assert_array_equal(dx, dx_twin)          # ... exactly as without the failure
    for k, v in twin.grads.items():
        np.testing.assert_array_equal(m.grads[k], v, err_msg=k)
    with pytest.raises(RuntimeError, match="backward needs a forward"):
        m.backward(dy)


@pytest.mark.parametrize("bad", ["dy-none", "dy-shape", "dy-dtype", "dhx-shape", "dhx-dtype"])
def test_module_backward_bad_arguments_then_retry(bad, rng):
    m = gpurnn.LSTM(I, H, num_layers=2, seed=1)
    twin = gpurnn.LSTM(I, H, num_layers=2, seed=1)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    y, (h_n, c_n) = m(x)
    twin(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dh = (np.ones_like(h_n), np.ones_like(c_n))
    wrong = {"dy-none": (None, dh), "dy-shape": (dy[:, :1], dh), "dy-dtype": (dy.astype(np.float64), dh),
             "dhx-shape": (dy, (h_n[:1], c_n)), "dhx-dtype": (dy, (h_n, c_n.astype(np.float64)))}[bad]
    with pytest.raises((TypeError, ValueError)):
        m.backward(*wrong)
    assert not any(g.any() for g in m.grads.values())
    dx, _ = m.backward(dy, dh)
    dx_twin, _ = twin.backward(dy, dh)
    np.testing.assert_array_equal(dx, dx_twin)
    for k, v in twin.grads.items():
        np.testing.assert_array_equal(m.grads[k], v, err_msg=k)


@pytest.mark.parametrize("bad", ["lengths", "hx", "x-dtype"])
def test_failed_forward_keeps_the_previous_forward_and_the_generator(bad, rng):
    # dropout draws from the module's generator: a failed forward must not move it either
    kw = dict(num_layers=2, dropout=0.5, seed=11)
    m, twin = gpurnn.GRU(I, H, **kw), gpurnn.GRU(I, H, **kw)
    x = rng.standard_normal((T, B, I)).astype(np.float32)
    y, _ = m(x)
    twin(x)
    args = {"lengths": (x, None, [T + 1, 1]), "hx": (x, np.zeros((1, B, H), np.float32), None),
            "x-dtype": (x.astype(np.float64), None, None)}[bad]
    with pytest.raises((TypeError, ValueError)):
        m(*args)
    dy = np.ones_like(y)
    dx, _ = m.backward(dy)                              # the earlier forward is still there
    dx_twin, _ = twin.backward(dy)
    np.testing.assert_array_equal(dx, dx_twin)
    y2, _ = m(x)
    y2_twin, _ = twin(x)
    np.testing.assert_array_equal(y2, y2_twin)          # same dropout masks: generator untouched


@pytest.mark.parametrize("bad", [None, [("weight_ih_l0", 0)], "weights"], ids=["None", "list", "str"])
def test_load_state_dict_not_a_mapping(bad):
    m = gpurnn.RNN(I, H, seed=0)
    before = m.state_dict()
    with pytest.raises(TypeError, match=r"state_dict must be a mapping of parameter names to arrays.*got "
                                        + type(bad).__name__):
        m.load_state_dict(bad)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_torch_backward_that_fails_keeps_the_reserve_for_a_retry(monkeypatch):
    torch = pytest.importorskip("torch")
    import gpurnn.torch as gt
    torch.manual_seed(0)
    m = gt.LSTM(I, H, dtype=torch.float64)
    ref = torch.nn.LSTM(I, H, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    dy = torch.randn_like(y)
    real = KernelLayer.backward
    calls = []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("provoked")
        return real(*args, **kwargs)
    monkeypatch.setattr(KernelLayer, "backward", fails_once)
    with pytest.raises(RuntimeError, match="provoked"):
        y.backward(dy)
    assert x.grad is None and m.weight_hh_l0.grad is None
    y.backward(dy)                                      # the retry runs the kept reserve
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref, _ = ref(x_ref)
    y_ref.backward(dy)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(m.weight_hh_l0.grad, ref.weight_hh_l0.grad, rtol=1e-10, atol=1e-12)
