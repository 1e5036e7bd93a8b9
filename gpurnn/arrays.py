"""The one array boundary: what gpurnn accepts as an array, what it computes on, and what it
hands back. Every public entry point (gpurnn.functional, gpurnn.interop, the module families)
classifies its arrays here once per call, with `Call`, and nothing below this module looks at
an array's family again.

Rules (one call = one family of arrays; results come back in the family that went in):

  NumPy ndarray                      -> computed on as is (host)       -> NumPy out
  CuPy ndarray                       -> as is, zero copy (device)      -> CuPy out, on CuPy's
                                        current device and stream
  torch CPU tensor                   -> ``t.detach().numpy()``, zero   -> torch CPU tensor out
                                        copy when contiguous (else one    (``torch.from_numpy``,
                                        copy to C order)                  zero copy)
  torch CUDA tensor                  -> ``cupy.from_dlpack``, zero copy -> torch CUDA tensor out
                                        (run inside `torch_stream` so     (``torch.from_dlpack``)
                                        CuPy uses torch's current stream)
  anything else with                 -> ``cupy.asarray``, zero copy    -> CuPy out
    ``__cuda_array_interface__``
  anything else with ``__dlpack__``  -> ``cupy.from_dlpack`` when       -> CuPy out (device) or
    and ``__dlpack_device__``           the device is a GPU, else         NumPy out (host)
                                        ``numpy.from_dlpack``
  other array-likes (lists, scalars) -> ``numpy.asarray``               -> NumPy out

Host and device arrays mixed in one call are a TypeError naming each argument and its kind.
The classification (`kind_of`) makes no device call, so these rules are checked on machines
without a GPU; the conversions of device arrays need CuPy and a CUDA device.

The backend follows from the kind: 'auto' (or GPURNN_BACKEND) sends host arrays to 'cpu' (the
fast CPU path; 'numpy' where Numba is missing) and device arrays to 'cuda'; an explicit backend
must match the kind ('numpy', 'cpu' and 'sim' take host arrays, 'cuda' device arrays).
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from .backends import BACKENDS, availability

__all__ = ["Call", "kind_of", "family_of", "to_compute", "from_compute", "convert_all",
           "resolve", "torch_stream", "lengths_array", "shape_of", "check_shape", "check_dtype", "cupy",
           "is_torch_tensor", "host_copy"]

# DLPack device types (dlpack.h DLDeviceType) gpurnn reads: host memory NumPy imports, and the
# GPU memory CuPy imports. Others (OpenCL, Vulkan, Metal, pinned host, ...) are a TypeError.
_DLPACK_HOST = {1: "kDLCPU"}
_DLPACK_DEVICE = {2: "kDLCUDA", 10: "kDLROCM", 13: "kDLCUDAManaged"}


def is_torch_tensor(a):
    torch = sys.modules.get("torch")   # never import torch just to look at an array
    return torch is not None and isinstance(a, torch.Tensor)


def _is_cupy_array(a):
    mod = sys.modules.get("cupy")
    return mod is not None and isinstance(a, mod.ndarray)


def kind_of(a, name="array"):
    """'host', 'device' or None (for None). Makes no device call."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return "host"
    if is_torch_tensor(a):
        return "device" if a.device.type != "cpu" else "host"
    if _is_cupy_array(a) or hasattr(a, "__cuda_array_interface__"):
        return "device"
    if hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        device_type = int(a.__dlpack_device__()[0])
        if device_type in _DLPACK_HOST:
            return "host"
        if device_type in _DLPACK_DEVICE:
            return "device"
        raise TypeError(f"{name} is a DLPack array on device type {device_type}; expected one of "
                        f"{ {**_DLPACK_HOST, **_DLPACK_DEVICE} }")
    return "host"


def family_of(a):
    """What results for `a` come back as: 'numpy', 'cupy', 'torch' (or None for None)."""
    if a is None:
        return None
    if is_torch_tensor(a):
        return "torch"
    return "cupy" if kind_of(a) == "device" else "numpy"


def to_compute(name, a):
    """`a` as the array gpurnn computes on: NumPy (host) or CuPy (device). Zero copy where the
    layout allows (see the module docstring); `name` is used in error messages."""
    if a is None or isinstance(a, np.ndarray) or _is_cupy_array(a):
        return a
    if is_torch_tensor(a):
        t = a.detach()
        bf16 = t.dtype == sys.modules["torch"].bfloat16
        if t.device.type == "cpu":
            if t.is_conj() or t.is_neg():     # lazy views that .numpy() refuses
                t = t.resolve_conj().resolve_neg()
            if bf16:                          # NumPy has no bfloat16: ml_dtypes', same bits
                return t.contiguous().view(sys.modules["torch"].int16).numpy().view(
                    _ml_bfloat16(name))
            return t.contiguous().numpy()
        if t.device.type != "cuda":
            raise TypeError(f"{name} is a torch tensor on device {t.device}; expected a CPU or "
                            f"CUDA tensor")
        if bf16:
            raise TypeError(f"{name} is a bfloat16 CUDA tensor; CuPy has no bfloat16, so gpurnn's "
                            f"GPU path takes float16, float32 or float64 tensors")
        return cupy(name).from_dlpack(t.contiguous())
    if hasattr(a, "__cuda_array_interface__"):
        return cupy(name).asarray(a)
    if hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        if kind_of(a, name) == "device":
            return cupy(name).from_dlpack(a)
        return np.from_dlpack(a)
    cause = None
    try:
        converted = np.asarray(a)
        if converted.dtype != object:     # object arrays mean NumPy could not read it as numbers
            return converted
    except (TypeError, ValueError) as exc:
        cause = exc
    raise TypeError(f"{name} must be an array (NumPy, CuPy, torch, or anything with "
                    f"__cuda_array_interface__ / __dlpack__); got {type(a).__name__}") from cause


def from_compute(a, family):
    """A computed NumPy/CuPy array (or None) as `family` ('numpy', 'cupy' or 'torch')."""
    if a is None or family in ("numpy", "cupy", None):
        return a
    if family != "torch":
        raise ValueError(f"family must be 'numpy', 'cupy' or 'torch'; got {family!r}")
    import torch
    if isinstance(a, np.ndarray):
        if a.dtype.name == "bfloat16":     # ml_dtypes' bfloat16: the same bits, zero copy
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return torch.from_dlpack(a)


def host_copy(name, a):
    """A NumPy copy of any array (torch on any device, CuPy, array-likes): state_dict entries
    and the like. A TypeError naming `name` when it is not an array."""
    a = to_compute(name, a)
    if _is_cupy_array(a):
        return a.get()
    return np.array(a, copy=True)


def _ml_bfloat16(name):
    try:
        import ml_dtypes
    except ImportError as exc:
        raise TypeError(f"{name} is a bfloat16 tensor, which needs the ml_dtypes package on the "
                        f"host (NumPy has no bfloat16): pip install ml_dtypes") from exc
    return ml_dtypes.bfloat16


def cupy(name="array"):
    """The cupy module, or a TypeError saying that `name` needs it."""
    try:
        import cupy as mod
    except ImportError as exc:
        raise TypeError(f"{name} is a device array, which needs CuPy; CuPy is not installed "
                        f"(pip install 'gpurnn[cuda13]' or '[cuda12]')") from exc
    return mod


def _listing(named, kinds, which=None):
    return ", ".join(f"{n} ({kinds[n]} {type(named[n]).__module__}.{type(named[n]).__name__})"
                     for n in kinds if which in (None, kinds[n]))


def _kinds(named):
    kinds = {name: kind_of(a, name) for name, a in named.items() if a is not None}
    if len(set(kinds.values())) > 1:
        raise TypeError(f"arrays in one call must all be host arrays (NumPy, torch CPU) or all "
                        f"device arrays (CuPy, torch CUDA, __cuda_array_interface__, DLPack on a "
                        f"GPU); got a mix: {_listing(named, kinds)}")
    return kinds


def resolve(backend, named):
    """The backend name for `backend` ('auto' or one of BACKENDS) and the arrays `named` (a
    mapping argument name -> array, None allowed; the names go into the messages)."""
    kinds = _kinds(named)
    on_device = set(kinds.values()) == {"device"}
    if backend == "auto":
        backend = os.environ.get("GPURNN_BACKEND", "auto") or "auto"
    if backend == "auto":
        return "cuda" if on_device else ("cpu" if availability("cpu")[0] else "numpy")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")
    if backend in ("numpy", "cpu", "sim") and on_device:
        raise TypeError(f"backend {backend!r} takes host arrays (NumPy, torch CPU); got device "
                        f"arrays: {_listing(named, kinds, 'device')}")
    if backend == "cuda" and kinds and not on_device:
        raise TypeError(f"backend 'cuda' takes device arrays (CuPy, torch CUDA or "
                        f"__cuda_array_interface__); got host arrays: {_listing(named, kinds, 'host')}")
    return backend


class Call:
    """One call's arrays, classified once: the kind (host or device), the caller's family (what
    results come back as), the backend, and each array converted to the C-contiguous NumPy or
    CuPy array the backends compute on (`call[name]`, None where the caller gave None)."""

    def __init__(self, named, backend="auto"):
        self.backend = resolve(backend, named)
        self.device = self.backend == "cuda"
        self.family = next((family_of(a) for a in named.values() if a is not None),
                           "cupy" if self.device else "numpy")
        self.xp = cupy("x") if self.device else np
        self._arrays = {name: self._convert(name, a) for name, a in named.items()}

    def _convert(self, name, a):
        if a is None:
            return None
        a = to_compute(name, a)
        return self.xp.ascontiguousarray(a)

    def __getitem__(self, name):
        return self._arrays[name]

    def back(self, a):
        """A computed array as the caller's family."""
        return from_compute(a, self.family)


def convert_all(named):
    """Convert a dict name -> array (None allowed) with `to_compute`; returns
    (kind, family, converted dict). kind is 'host' or 'device' ('host' when all are None);
    family is that of the first non-None array. Mixing host and device is a TypeError."""
    kinds = _kinds(named)
    kind = next(iter(kinds.values()), "host")
    family = next((family_of(a) for a in named.values() if a is not None), "numpy")
    return kind, family, {name: to_compute(name, a) for name, a in named.items()}


@contextlib.contextmanager
def torch_stream(tensor):
    """Make CuPy work on `tensor`'s CUDA device and torch's current stream there, so gpurnn's
    kernels are ordered with the surrounding torch work without a synchronisation. A no-op for
    anything but a CUDA tensor."""
    if not is_torch_tensor(tensor) or tensor.device.type != "cuda":
        yield
        return
    import cupy as mod
    import torch
    stream = torch.cuda.current_stream(tensor.device)
    with mod.cuda.Device(tensor.device.index):
        with mod.cuda.ExternalStream(stream.cuda_stream, tensor.device.index):
            yield


def shape_of(a):
    return tuple(int(s) for s in a.shape)


def check_shape(name, a, expected, what):
    if shape_of(a) != tuple(expected):
        raise ValueError(f"{name} has shape {shape_of(a)}; expected {what} = {tuple(expected)}")


def check_dtype(name, a, dtype, whose="the dtype of x"):
    if str(a.dtype) != str(dtype):
        raise TypeError(f"{name} has dtype {a.dtype}; expected {dtype} ({whose})")


def lengths_array(lengths, T, B):
    """Per-sequence lengths as a host int64 (B,) array in [0, T], or None. Any array family."""
    if lengths is None:
        return None
    if kind_of(lengths, "lengths") == "device" or is_torch_tensor(lengths):
        lengths = host_copy("lengths", lengths)
    arr = np.asarray(lengths)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"lengths must hold integers; got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths has shape {arr.shape}; expected (B,) = ({B},)")
    if arr.size and (arr.min() < 0 or arr.max() > T):
        raise ValueError(f"lengths must lie in [0, T] = [0, {T}]; got min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int64)
