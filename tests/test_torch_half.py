"""16-bit storage through gpurnn.torch: float16 / bfloat16 modules and torch.autocast regions,
against the float32 module run on the same rounded inputs and weights. Budgets as in
tests/test_sim_half.py (gpurnn.testing.TOL, GRAD_TOL): 8 unit roundoffs for outputs, 16 for
gradients."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch modules need torch")
pytest.importorskip("ml_dtypes", reason="bfloat16 on the host needs ml_dtypes")

import gpurnn.torch as gt  # noqa: E402
from gpurnn.testing import GRAD_TOL, TOL, rel_err  # noqa: E402


def pair(cls, dtype, backend="numpy", **kw):
    """A 16-bit module and a float32 one holding the same (rounded) weights."""
    torch.manual_seed(0)
    low = cls(5, 7, dtype=dtype, backend=backend, **kw)
    ref = cls(5, 7, dtype=torch.float32, backend="numpy", **kw)
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    return low, ref


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("cls", [gt.LSTM, gt.GRU], ids=["LSTM", "GRU"])
def test_16bit_modules_match_the_fp32_module(cls, dtype):
    low, ref = pair(cls, dtype, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 5).to(dtype).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    out, _ = low(x)
    want, _ = ref(x32)
    assert out.dtype == dtype
    assert rel_err(out, want) <= TOL[dtype]
    dy = torch.randn(out.shape)
    out.backward(dy.to(dtype))
    want.backward(dy.to(dtype).float())
    assert x.grad.dtype == dtype and rel_err(x.grad, x32.grad) <= GRAD_TOL[dtype]
    for (name, p), (_, q) in zip(low.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == dtype, name
        assert rel_err(p.grad, q.grad) <= GRAD_TOL[dtype], name


def test_float16_module_on_the_strict_simulator():
    low, ref = pair(gt.LSTM, torch.float16, backend="sim")
    x = torch.randn(3, 2, 5).half()
    out, (h, c) = low(x)
    want, (h32, c32) = ref(x.float())
    assert out.dtype == h.dtype == c.dtype == torch.float16
    assert rel_err(out, want) <= TOL[torch.float16]
    assert rel_err(c, c32) <= TOL[torch.float16]


@pytest.mark.parametrize("cls", [gt.LSTM, gt.RNN], ids=["LSTM", "RNN"])
def test_autocast_runs_the_layers_in_its_16bit_dtype(cls):
    torch.manual_seed(1)
    m = cls(5, 7, num_layers=2, backend="numpy")
    ref = cls(5, 7, num_layers=2, backend="numpy")
    ref.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()})
    x = torch.randn(4, 2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = m(x)
    assert out.dtype == torch.bfloat16
    want, _ = ref(x.to(torch.bfloat16).float())
    assert rel_err(out, want) <= TOL[torch.bfloat16]
    out.float().sum().backward()
    want.sum().backward()
    for (name, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == torch.float32, name         # float32 parameters, float32 grads
        assert rel_err(p.grad, q.grad) <= GRAD_TOL[torch.bfloat16], name
    # outside the region the module is float32 again and mixing dtypes is refused
    assert m(x)[0].dtype == torch.float32
    with pytest.raises(TypeError, match="input is torch.bfloat16"):
        m(x.to(torch.bfloat16))


def test_16bit_dtype_is_checked_at_construction():
    with pytest.raises(TypeError, match=r"dtype must be one of .*got torch.int8"):
        gt.GRU(3, 4, dtype=torch.int8)
    assert np.dtype(gt.GRU(3, 4, dtype=torch.float16).weight_hh_l0.detach().numpy().dtype) == np.float16
