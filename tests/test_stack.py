"""The one front door: a cell variant written once (here, in a few lines) runs through both module
families; options are checked at the boundary for the chosen backend; what a forward saves has
the dtypes each backend declares; the modules' parameters live on their device."""
import numpy as np
import pytest

import gpurnn
import gpurnn.functional as F
from gpurnn import cells, layers, stack
from gpurnn.backends import BACKENDS, availability, reserve_dtypes
from gpurnn.testing import TOL, assert_close

T, B, I, H = 5, 3, 4, 6
HAVE = [b for b in BACKENDS if availability(b)[0]]


# ---- a toy variant, written only here ------------------------------------------------------
class ScaledInputRNN(stack.Layer):
    """An Elman tanh RNN whose input is scaled per feature by a learned vector weight_scale (I,):
    h' = tanh((x * s) W_ih^T + b_ih + h W_hh^T + b_hh). Built on the kernel cell rnn_tanh."""
    cell = cells.Cell("scaled_rnn", gates=1, reserve_gates=0, torch_class="RNN")
    inner = stack.KernelLayer("rnn_tanh")

    def param_shapes(self, input_size, hidden_size, bias):
        return [("weight_scale", (input_size,))] + self.inner.param_shapes(input_size, hidden_size, bias)

    def forward(self, run, x, p, h0, c0, reverse):
        xs = x * p["weight_scale"]
        y, h_n, _, saved = self.inner.forward(run, xs, p, h0, None, reverse)
        return y, h_n, None, (xs, *saved) if saved else ()

    def backward(self, run, x, p, saved, reverse, dy, dh_n, dc_n):
        xs, *inner = saved
        dxs, dh0, _, grads = self.inner.backward(run, xs, p, tuple(inner), reverse, dy, dh_n, None)
        grads["weight_scale"] = (dxs * x).sum(axis=(0, 1))
        return dxs * p["weight_scale"], dh0, None, grads

    def saved_specs(self, run, T, B, I, H, dtype):
        return [((T, B, I), np.dtype(dtype))] + self.inner.saved_specs(run, T, B, I, H, dtype)


stack.register("scaled_rnn", ScaledInputRNN())


class ScaledRNN(layers.RNNBase):
    cell = "scaled_rnn"


def _torch_reference(torch, sd, x, lengths, num_layers, bidirectional):
    """The same model in plain torch: per layer and direction a torch.nn.RNN on x * s."""
    D = 2 if bidirectional else 1
    out, h_n = x, []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            rnn = torch.nn.RNN(out.shape[2], H, dtype=torch.float64)
            weights = {name + "_l0": sd[name + sfx]
                       for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            inp = out * sd["weight_scale" + sfx]
            seqs = [inp[:n, b] for b, n in enumerate(lengths)]
            if d:
                seqs = [s.flip(0) for s in seqs]
            ys, hs = [], []
            for b, s in enumerate(seqs):
                yb, hb = torch.func.functional_call(rnn, weights, (s.unsqueeze(1),))
                yb = yb[:, 0]
                if d:
                    yb = yb.flip(0)
                ys.append(torch.cat([yb, yb.new_zeros(T - len(yb), H)]))
                hs.append(hb[0, 0])
            outs.append(torch.stack(ys, 1))
            h_n.append(torch.stack(hs))
        out = torch.cat(outs, 2)
    return out, torch.stack(h_n)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_a_variant_written_once_runs_through_both_module_families(bidirectional, rng):
    torch = pytest.importorskip("torch")
    import gpurnn.torch as gt

    class TorchScaledRNN(gt.RNNBase):
        cell = "scaled_rnn"

    lengths = [T, 2, 4]
    mine = ScaledRNN(I, H, num_layers=2, bidirectional=bidirectional, dtype="float64", seed=3)
    sd = {k: torch.tensor(v) for k, v in mine.state_dict().items()}
    assert [k for k in sd if "scale" in k] == [f"weight_scale_l{k}{s}" for k in range(2)
                                               for s in ([""] + ["_reverse"] * bidirectional)]
    x = rng.standard_normal((T, B, I))
    ry = rng.standard_normal((T, B, (1 + bidirectional) * H))
    rh = rng.standard_normal((2 * (1 + bidirectional), B, H))

    params = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    xt = torch.tensor(x, requires_grad=True)
    y_ref, h_ref = _torch_reference(torch, params, xt, lengths, 2, bidirectional)
    ((y_ref * torch.tensor(ry)).sum() + (h_ref * torch.tensor(rh)).sum()).backward()

    # NumPy skin
    y, h_n = mine(x, lengths=lengths)
    assert_close(y, y_ref.detach().numpy(), TOL[np.dtype(np.float64)], "numpy skin y")
    assert_close(h_n, h_ref.detach().numpy(), TOL[np.dtype(np.float64)], "numpy skin h_n")
    dx, _ = mine.backward(ry, rh)
    assert_close(dx, xt.grad.numpy(), TOL[np.dtype(np.float64)], "numpy skin dx")
    for k, p in params.items():
        assert_close(mine.grads[k], p.grad.numpy(), TOL[np.dtype(np.float64)], f"numpy skin {k}")

    # torch skin: same parameters, through autograd
    theirs = TorchScaledRNN(I, H, num_layers=2, bidirectional=bidirectional, dtype=torch.float64)
    theirs.load_state_dict(sd)
    xt2 = torch.tensor(x, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(xt2, lengths, enforce_sorted=False)
    out, h2 = theirs(packed)
    y2, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    ((y2 * torch.tensor(ry)).sum() + (h2 * torch.tensor(rh)).sum()).backward()
    assert_close(y2.detach().numpy(), y_ref.detach().numpy(), TOL[np.dtype(np.float64)], "torch y")
    assert_close(xt2.grad.numpy(), xt.grad.numpy(), TOL[np.dtype(np.float64)], "torch dx")
    for k, p in params.items():
        assert_close(getattr(theirs, k).grad.numpy(), p.grad.numpy(), TOL[np.dtype(np.float64)],
                     f"torch skin {k}")


def test_a_variant_compiles_its_fake_shapes_from_saved_specs():
    torch = pytest.importorskip("torch")
    from torch.library import opcheck
    import gpurnn.torchops  # noqa: F401
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    st = stack.Stack("scaled_rnn", I, H, 1, True, 0.0, False)
    ws = [torch.randn(s, dtype=torch.float64, requires_grad=True) for _, s in st.param_shapes()]
    opcheck(torch.ops.gpurnn.stack_forward.default,
            (x, None, None, None, ws, [], [], "", "scaled_rnn", I, H, 1, True, False, "numpy", True))


# ---- options at the boundary ---------------------------------------------------------------
def _layer_args(rng, dtype=np.float64):
    return dict(x=rng.standard_normal((T, B, I)).astype(dtype),
                w_ih=rng.standard_normal((4 * H, I)).astype(dtype),
                w_hh=rng.standard_normal((4 * H, H)).astype(dtype))


@pytest.mark.parametrize("backend,options,match", [
    ("numpy", {"path": "bogus", "blocks": -5}, "the numpy backend takes none"),
    ("numpy", {"blas": "mkl"}, "the numpy backend takes none"),
    ("cpu", {"blocks": 4}, "unknown keys ['blocks'] for backend 'cpu'"),
    ("cpu", {"threads": 0}, "backend_options['threads'] must be an int >= 1"),
    ("sim", {"blas": "mkl"}, "unknown keys ['blas'] for backend 'sim'"),
    ("sim", {"simulator": "lenient"}, "backend_options['simulator'] must be one of"),
    ("sim", {"path": "bogus"}, "backend_options['path'] must be one of"),
    ("sim", {"blocks": -5}, "backend_options['blocks'] must be a positive int"),
    ("sim", {"threads": 48}, "multiple of 32"),
], ids=lambda v: str(v))
def test_backend_options_are_checked_for_the_chosen_backend(backend, options, match, rng, monkeypatch):
    if backend not in HAVE:
        pytest.skip(f"backend {backend!r} not available: {availability(backend)[1]}")
    from gpurnn.backends import get_backend
    ran = []
    real = get_backend(backend).forward
    monkeypatch.setattr(get_backend(backend), "forward", lambda *a, **k: ran.append(1) or real(*a, **k))
    with pytest.raises(ValueError) as info:
        F.forward("lstm", **_layer_args(rng), backend=backend, backend_options=options)
    assert match in str(info.value)
    assert ran == []                         # rejected before anything ran
    m = gpurnn.LSTM(I, H, dtype="float64", backend=backend)
    with pytest.raises(ValueError) as info:
        m(_layer_args(rng)["x"], backend_options=options)
    assert match in str(info.value) and ran == []


def test_backward_options_are_checked_and_the_reserve_survives(rng):
    *_, res = F.forward("gru", rng.standard_normal((T, B, I)), rng.standard_normal((3 * H, I)),
                        rng.standard_normal((3 * H, H)), backend="numpy")
    with pytest.raises(ValueError, match="the numpy backend takes none"):
        F.backward(res, backend_options={"nonsense": 1})
    with pytest.raises(TypeError, match="backend_options must be a dict or None; got list"):
        F.backward(res, backend_options=["path"])
    assert F.backward(res).dx.shape == (T, B, I)      # the rejected calls used nothing up


# ---- what a forward saves ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("backend", HAVE)
@pytest.mark.parametrize("cell", cells.CELLS)
def test_saved_specs_describe_what_each_backend_saves(cell, backend, dtype, rng):
    if backend == "cuda":
        pytest.skip("needs a GPU")
    st = stack.Stack(cell, I, H, num_layers=2, bidirectional=True)
    params = {k: (rng.standard_normal(s) * 0.3).astype(dtype) for k, s in st.param_shapes()}
    x = rng.standard_normal((T, 2, I)).astype(dtype)
    run = stack.Run(backend, np, options={"threads": 32} if backend == "sim" else None)
    *_, saved = st.forward(run, x, params)
    got = [(a.shape, a.dtype) for a in saved.arrays()]
    assert got == [(tuple(s), np.dtype(d)) for s, d in st.saved_specs(run, T, 2, dtype)]
    h_dt = reserve_dtypes(backend, dtype)[0]
    assert h_dt == (np.float32 if dtype == "float16" and backend in ("numpy", "cpu") else np.dtype(dtype))


# ---- where the parameters live ---------------------------------------------------------------
def test_module_device_is_cpu_and_cuda_needs_cupy():
    m = gpurnn.GRU(I, H)
    assert m.device == "cpu" and all(isinstance(p, np.ndarray) for p in m.parameters())
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"):
        m.to("gpu")
    if not availability("cuda")[0]:
        try:
            import cupy  # noqa: F401
        except ImportError:
            with pytest.raises(TypeError, match="needs CuPy"):
                m.to("cuda")
    assert m.to("cpu") is m and m.device == "cpu"


def test_a_host_module_refuses_device_arrays_with_the_fix():
    class FakeDevice:
        __cuda_array_interface__ = {"shape": (T, B, I), "typestr": "<f4", "data": (0, False),
                                    "version": 3}
        shape = (T, B, I)
    with pytest.raises(TypeError, match=r"x is a device array but the module's parameters are on "
                                        r"cpu; call module.to\('cuda'\)"):
        gpurnn.LSTM(I, H)(FakeDevice())


def test_state_dict_is_host_copies_and_loads_back(rng):
    m = gpurnn.LSTM(I, H, num_layers=2, seed=1)
    sd = m.state_dict()
    sd["weight_hh_l1"][...] = 0                      # a copy: the module keeps its own
    assert np.abs(m.state_dict()["weight_hh_l1"]).sum() > 0
    m.load_state_dict(sd)
    assert np.abs(m.state_dict()["weight_hh_l1"]).sum() == 0
