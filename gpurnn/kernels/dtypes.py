"""The kernels' dtypes, written down once: storage (what arrays hold) and compute (what the math,
the cell state, every dot product and every gradient run in).

    storage   compute   kernels see storage arrays as
    float32   float32   float32
    float64   float64   float64
    float16   float32   float16 (NVIDIA half; converted in registers)
    bfloat16  float32   uint16 raw words (NumPy has no bfloat16: ml_dtypes arrays are viewed
                        as uint16 on the host, and the kernels widen a word by a 16-bit shift
                        into a float32's high half; stores round to nearest even)
16-bit kernels keep W_hh rows in shared memory as 16-bit values (half the bytes per weight) and
everything else in shared memory (staged h or gate gradients, pre-activations, partial sums) in
float32. In global memory W_hh, h (and y), the reserve gates and dy are 16-bit; Gx, b_hh, the
cell state c and all gradients are float32; the host returns dW in the parameter dtype.
COMPUTE and KERNEL_VIEW are the table's last two columns by name; gpurnn.kernels.cellmath makes
Numba types of them (NUMBA_COMPUTE, NUMBA_STORAGE) and holds each storage dtype's load/store.
Nothing here imports numba: its config (simulator or hardware mode) is read at its import.
"""
from __future__ import annotations

import numpy as np

STORAGE = ("float32", "float64", "float16", "bfloat16")
COMPUTE = {"float32": "float32", "float64": "float64", "float16": "float32", "bfloat16": "float32"}
KERNEL_VIEW = {"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "uint16"}
ITEMSIZE = {name: np.dtype(KERNEL_VIEW[name]).itemsize for name in STORAGE}
SHORT = {"float32": "f32", "float64": "f64", "float16": "f16", "bfloat16": "bf16"}
NP_COMPUTE = {name: np.dtype(COMPUTE[name]).type for name in STORAGE}


def is_16bit(dtype: str) -> bool:
    return ITEMSIZE[dtype] == 2


def numpy_dtype(dtype) -> np.dtype:
    """The NumPy dtype of a storage dtype name (or dtype); bfloat16 is ml_dtypes'. Raises
    TypeError naming the supported ones, or how to get ml_dtypes."""
    try:
        name = "bfloat16" if dtype == "bfloat16" else np.dtype(dtype).name
        shown = name
    except TypeError:
        name, shown = None, repr(dtype)
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise TypeError("dtype bfloat16 needs the ml_dtypes package (NumPy has no "
                            "bfloat16): pip install ml_dtypes") from exc
        return np.dtype(ml_dtypes.bfloat16)
    if name not in STORAGE:
        raise TypeError(f"dtype must be one of {STORAGE}; got {shown}")
    return np.dtype(name)


def host_view(xp, a, dtype: str):
    """The array as a kernel takes it (KERNEL_VIEW): bfloat16 as its raw uint16 words, anything
    else as is."""
    view = KERNEL_VIEW[dtype]
    return a if view == dtype else a.view(getattr(xp, view))
