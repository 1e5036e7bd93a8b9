"""gpurnn.interop: the dispatch rules (run everywhere, with NumPy, torch CPU tensors and fake
device objects) and the zero-copy CuPy / torch CUDA paths (GPU only)."""
import sys
import types

import numpy as np
import pytest

import gpurnn
from gpurnn import interop
from gpurnn.testing import TOL, assert_close

torch = pytest.importorskip("torch")


class FakeCAI:
    """A device array as far as the protocol goes: only __cuda_array_interface__."""
    def __init__(self, shape=(2, 3)):
        self.shape = shape
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (0, False),
                                         "version": 3}


class FakeDLPack:
    """A DLPack producer on a given DLPack device type, backed by a NumPy array."""
    def __init__(self, array, device_type):
        self.array, self.device_type = array, device_type

    def __dlpack__(self, **kwargs):
        return self.array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return (self.device_type, 0)


@pytest.fixture
def fake_cupy(monkeypatch):
    """A stand-in `cupy` recording which conversion was asked for, so the device dispatch is
    checked without a GPU."""
    calls = []
    mod = types.ModuleType("cupy")

    class ndarray:
        def __init__(self, source):
            self.source = source
            self.__cuda_array_interface__ = {}

    def asarray(a):
        calls.append(("asarray", a))
        return ndarray(a)

    def from_dlpack(a):
        calls.append(("from_dlpack", a))
        return ndarray(a)
    mod.ndarray, mod.asarray, mod.from_dlpack = ndarray, asarray, from_dlpack
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return mod, calls


def test_kinds_and_families():
    a = np.zeros(3)
    assert (interop.kind_of(a), interop.family_of(a)) == ("host", "numpy")
    t = torch.zeros(3)
    assert (interop.kind_of(t), interop.family_of(t)) == ("host", "torch")
    assert (interop.kind_of(FakeCAI()), interop.family_of(FakeCAI())) == ("device", "cupy")
    for device_type in (2, 10, 13):      # kDLCUDA, kDLROCM, kDLCUDAManaged
        assert interop.kind_of(FakeDLPack(a, device_type)) == "device"
    assert (interop.kind_of(FakeDLPack(a, 1)), interop.family_of(FakeDLPack(a, 1))) == ("host", "numpy")
    assert interop.kind_of(None) is None and interop.family_of(None) is None
    assert interop.kind_of([1.0, 2.0]) == "host"
    with pytest.raises(TypeError, match=r"w_ih is a DLPack array on device type 4; expected one of"):
        interop.kind_of(FakeDLPack(a, 4), "w_ih")


def test_torch_cpu_tensor_is_zero_copy():
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3).requires_grad_()
    a = interop.to_compute("x", t)
    assert isinstance(a, np.ndarray) and np.shares_memory(a, t.detach().numpy())
    with torch.no_grad():
        t[0, 0] = 42.0
    assert a[0, 0] == 42.0
    back = interop.from_compute(a, "torch")
    assert isinstance(back, torch.Tensor) and back.data_ptr() == t.data_ptr()
    # a non-contiguous view costs one copy, into C order (the backends' layout)
    view = interop.to_compute("x", t.detach().t())
    assert view.flags.c_contiguous and view.shape == (3, 2)
    assert np.array_equal(view, t.detach().numpy().T)


def test_numpy_passes_through_and_host_dlpack_is_zero_copy():
    a = np.ones((2, 3), np.float32)
    assert interop.to_compute("x", a) is a
    b = interop.to_compute("x", FakeDLPack(a, 1))
    assert isinstance(b, np.ndarray) and np.shares_memory(a, b)
    assert interop.to_compute("x", None) is None
    with pytest.raises(TypeError, match="x must be an array .* got object"):
        interop.to_compute("x", object())


def test_device_objects_dispatch_to_cupy(fake_cupy):
    cupy, calls = fake_cupy
    cai = FakeCAI()
    dl = FakeDLPack(np.zeros(2), 2)
    out = interop.to_compute("x", cai)
    assert isinstance(out, cupy.ndarray) and calls[-1] == ("asarray", cai)
    out = interop.to_compute("x", dl)
    assert isinstance(out, cupy.ndarray) and calls[-1] == ("from_dlpack", dl)
    already = cupy.ndarray(None)
    calls.clear()
    assert interop.to_compute("x", already) is already and calls == []   # CuPy in: no conversion
    assert interop.from_compute(already, "cupy") is already


def test_device_object_without_cupy_names_the_argument(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # `import cupy` raises ImportError
    with pytest.raises(TypeError, match="h0 is a device array, which needs CuPy"):
        interop.to_compute("h0", FakeCAI())


def test_mixed_host_and_device_is_a_type_error():
    with pytest.raises(TypeError, match=r"got a mix: x \(host numpy.ndarray\), w_ih \(device .*FakeCAI"):
        interop.convert_all({"x": np.zeros((2, 1, 3)), "w_ih": FakeCAI(), "b_ih": None})
    with pytest.raises(TypeError, match=r"got a mix: x \(host torch.Tensor\), .*h0 \(device .*FakeDLPack"):
        interop.forward("rnn_tanh", torch.zeros(2, 1, 3), np.zeros((4, 3)), np.zeros((4, 4)),
                        h0=FakeDLPack(np.zeros((1, 4)), 2))
    # the functional API classifies through the same boundary (gpurnn.arrays.Call)
    with pytest.raises(TypeError, match="got a mix"):
        gpurnn.functional.forward("rnn_tanh", np.zeros((2, 1, 3)), FakeCAI(), np.zeros((4, 4)))


def test_convert_all_reports_kind_and_family():
    kind, family, out = interop.convert_all({"x": torch.zeros(2), "h0": None, "w": np.zeros(2)})
    assert (kind, family) == ("host", "torch")
    assert isinstance(out["x"], np.ndarray) and out["h0"] is None
    assert interop.convert_all({"a": None}) == ("host", "numpy", {"a": None})


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_forward_backward_torch_in_torch_out(dtype, rng):
    T, B, I, H = 5, 3, 7, 33
    arrays = {"x": rng.standard_normal((T, B, I)), "w_ih": rng.standard_normal((4 * H, I)) * 0.2,
              "w_hh": rng.standard_normal((4 * H, H)) * 0.2, "b_ih": rng.standard_normal(4 * H),
              "b_hh": rng.standard_normal(4 * H), "h0": rng.standard_normal((B, H)),
              "c0": rng.standard_normal((B, H))}
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    lengths = np.array([5, 1, 3])
    y, h_n, c_n, res = gpurnn.functional.forward("lstm", **arrays, lengths=lengths)
    ty, th, tc, tres = interop.forward("lstm", **{k: torch.from_numpy(v) for k, v in arrays.items()},
                                       lengths=lengths)
    assert all(isinstance(v, torch.Tensor) for v in (ty, th, tc))
    for name, a, b in (("y", ty, y), ("h_n", th, h_n), ("c_n", tc, c_n)):
        assert_close(a.numpy(), b, TOL[np.dtype(dtype)], name)
    dy = rng.standard_normal(y.shape).astype(dtype)
    g = gpurnn.functional.backward(res, dy)
    tg = interop.backward(tres, torch.from_numpy(dy))
    for name, a, b in zip(g._fields, tg, g):
        assert isinstance(a, torch.Tensor), name
        assert_close(a.numpy(), b, TOL[np.dtype(dtype)], name)
    # no upstream arrays given: results in the reserve's own family (NumPy here)
    _, _, _, res2 = interop.forward("lstm", **arrays, lengths=lengths)
    assert all(isinstance(v, np.ndarray) for v in interop.backward(res2))


_CUDA_OK, _CUDA_REASON = gpurnn.backends.availability("cuda")
gpu = pytest.mark.skipif(not _CUDA_OK, reason=f"needs a CUDA device: {_CUDA_REASON}")


@pytest.mark.gpu
@gpu
def test_cupy_in_cupy_out_zero_copy():
    import cupy
    x = cupy.arange(6, dtype=cupy.float32).reshape(2, 3)
    assert interop.to_compute("x", x) is x
    view = interop.to_compute("x", _CAIWrapper(x))
    assert isinstance(view, cupy.ndarray) and view.data.ptr == x.data.ptr


class _CAIWrapper:
    def __init__(self, a):
        self.__cuda_array_interface__ = a.__cuda_array_interface__


@pytest.mark.gpu
@gpu
def test_torch_cuda_round_trip_is_zero_copy_on_torch_stream():
    import cupy
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device (CPU-only torch build)")
    t = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
    c = interop.to_compute("x", t)
    assert isinstance(c, cupy.ndarray) and c.data.ptr == t.data_ptr()
    back = interop.from_compute(c, "torch")
    assert back.device == t.device and back.data_ptr() == t.data_ptr()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), interop.torch_stream(t):
        assert cupy.cuda.get_current_stream().ptr == stream.cuda_stream


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cupy_forward_backward_matches_numpy(cell, rng):
    import cupy
    G = {"lstm": 4, "gru": 3, "rnn_tanh": 1}[cell]
    T, B, I, H = 5, 3, 7, 33
    host = {"x": rng.standard_normal((T, B, I)), "w_ih": rng.standard_normal((G * H, I)) * 0.2,
            "w_hh": rng.standard_normal((G * H, H)) * 0.2}
    host = {k: v.astype(np.float32) for k, v in host.items()}
    y, h_n, _, res = interop.forward(cell, **host)
    dev = {k: cupy.asarray(v) for k, v in host.items()}
    yd, hd, _, resd = interop.forward(cell, **dev)
    assert isinstance(yd, cupy.ndarray)
    assert_close(yd.get(), y, 1e-5, "y")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    g, gd = interop.backward(res, dy), interop.backward(resd, cupy.asarray(dy))
    for name, a, b in zip(g._fields, gd, g):
        if b is not None:
            assert isinstance(a, cupy.ndarray), name
            assert_close(a.get(), b, 1e-5, name)


@pytest.mark.gpu
@gpu
def test_module_parameters_and_gradients_live_on_the_device(rng, monkeypatch):
    import cupy
    m = gpurnn.LSTM(7, 33, num_layers=2, bidirectional=True, seed=4)
    host = gpurnn.LSTM(7, 33, num_layers=2, bidirectional=True, seed=4, backend="numpy")
    assert m.to("cuda") is m and m.device == "cuda:0"
    assert all(isinstance(p, cupy.ndarray) for p in m.parameters())
    assert all(isinstance(g, cupy.ndarray) for g in m.grads.values())
    # no host<->device copy of a parameter or gradient in forward/backward
    copies = []
    real_asarray = cupy.asarray
    monkeypatch.setattr(cupy, "asarray", lambda a, *k, **kw: copies.append(type(a)) or real_asarray(a, *k, **kw))
    x = rng.standard_normal((5, 3, 7)).astype(np.float32)
    xd = real_asarray(x)
    y, _ = m(xd)
    m.backward(cupy.ones_like(y))
    assert not [t for t in copies if t is np.ndarray], copies
    monkeypatch.undo()
    y_host, _ = host(x)
    host.backward(np.ones_like(y_host))
    assert_close(y.get(), y_host, 1e-5, "y")
    for k, g in host.grads.items():
        assert isinstance(m.grads[k], cupy.ndarray)
        assert_close(m.grads[k].get(), g, 1e-4, k)
    sd = m.state_dict()                       # host copies only when asked
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    m.to("cpu")
    assert all(isinstance(p, np.ndarray) for p in m.parameters())


def test_gpurnn_and_interop_import_without_torch():
    import subprocess
    code = ("import sys; sys.modules['torch'] = None\n"     # any `import torch` now raises
            "import gpurnn, gpurnn.interop, gpurnn.functional\n"
            "import numpy as np\n"
            "y = gpurnn.interop.forward('gru', np.ones((2, 1, 3)), np.ones((6, 3)), np.ones((6, 2)))[0]\n"
            "assert isinstance(y, np.ndarray), type(y)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_functional_sees_gpu_dlpack_arrays_as_device_arrays():
    """A GPU array that only speaks DLPack is a device array to the functional API too: mixed
    with NumPy weights it is the mixing TypeError, not a misread host array."""
    from gpurnn import functional as F
    x = FakeDLPack(np.zeros((2, 1, 3), np.float32), 2)
    w_ih, w_hh = np.zeros((4, 3), np.float32), np.zeros((4, 1), np.float32)
    with pytest.raises(TypeError, match="must all be host .* or all device"):
        F.forward("rnn_tanh", x, w_ih, w_hh)
    host = FakeDLPack(np.zeros((2, 1, 3), np.float32), 1)     # a host DLPack array is NumPy's
    y, h_n, _, _ = F.forward("lstm", host, np.zeros((4, 3), np.float32),
                             np.zeros((4, 1), np.float32), training=False)
    assert isinstance(y, np.ndarray) and y.shape == (2, 1, 1)
