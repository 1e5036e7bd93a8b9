"""What gpurnn accepts as an array and what it computes on: the classification (host or
device, without any device call) and the zero-copy conversion to NumPy or CuPy. The rules are
listed in gpurnn.interop, which adds the conversion of results back to the caller's family.
"""
from __future__ import annotations

import sys

import numpy as np

# DLPack device types (dlpack.h DLDeviceType) gpurnn reads: host memory NumPy imports, and the
# GPU memory CuPy imports. Others (OpenCL, Vulkan, Metal, pinned host, ...) are a TypeError.
_DLPACK_HOST = {1: "kDLCPU"}
_DLPACK_DEVICE = {2: "kDLCUDA", 10: "kDLROCM", 13: "kDLCUDAManaged"}


def _is_torch_tensor(a):
    torch = sys.modules.get("torch")   # never import torch just to look at an array
    return torch is not None and isinstance(a, torch.Tensor)


def _is_cupy_array(a):
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(a, cupy.ndarray)


def kind_of(a, name="array"):
    """'host', 'device' or None (for None). Makes no device call."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return "host"
    if _is_torch_tensor(a):
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


def to_compute(name, a):
    """`a` as the array gpurnn computes on: NumPy (host) or CuPy (device). Zero copy where the
    layout allows (see the module docstring); `name` is used in error messages."""
    if a is None or isinstance(a, np.ndarray) or _is_cupy_array(a):
        return a
    if _is_torch_tensor(a):
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
        return _cupy(name).from_dlpack(t.contiguous())
    if hasattr(a, "__cuda_array_interface__"):
        return _cupy(name).asarray(a)
    if hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        if kind_of(a, name) == "device":
            return _cupy(name).from_dlpack(a)
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


def _ml_bfloat16(name):
    try:
        import ml_dtypes
    except ImportError as exc:
        raise TypeError(f"{name} is a bfloat16 tensor, which needs the ml_dtypes package on the "
                        f"host (NumPy has no bfloat16): pip install ml_dtypes") from exc
    return ml_dtypes.bfloat16


def _cupy(name):
    try:
        import cupy
    except ImportError as exc:
        raise TypeError(f"{name} is a device array, which needs CuPy; CuPy is not installed "
                        f"(pip install 'gpurnn[cuda13]' or '[cuda12]')") from exc
    return cupy
