"""Array interop: which arrays gpurnn accepts, what it computes on, and what it hands back.

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

Host and device arrays mixed in one call are a TypeError naming each argument and its kind
(the same rule `gpurnn.backends.resolve` enforces for the functional API). The classification
(`kind_of`) makes no device call, so these rules are checked on machines without a GPU; the
conversions of device arrays need CuPy and a CUDA device.

`forward` / `backward` below are `gpurnn.functional.forward` / `backward` with these rules
applied on the way in and out.
"""
from __future__ import annotations

import contextlib

import numpy as np

from . import functional as F
from .arrays import _is_torch_tensor, kind_of, to_compute
from .backends import Grads

__all__ = ["kind_of", "family_of", "to_compute", "from_compute", "convert_all", "torch_stream",
           "forward", "backward"]

def family_of(a):
    """What results for `a` come back as: 'numpy', 'cupy', 'torch' (or None for None)."""
    if a is None:
        return None
    if _is_torch_tensor(a):
        return "torch"
    return "cupy" if kind_of(a) == "device" else "numpy"


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


def convert_all(named):
    """Convert a dict name -> array (None allowed) with `to_compute`; returns
    (kind, family, converted dict). kind is 'host' or 'device' ('host' when all are None);
    family is that of the first non-None array. Mixing host and device is a TypeError."""
    kinds = {name: kind_of(a, name) for name, a in named.items() if a is not None}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{n}: {kinds[n]} {type(named[n]).__module__}.{type(named[n]).__name__}"
                            for n in kinds)
        raise TypeError(f"arrays in one call must all be host arrays (NumPy, torch CPU) or all "
                        f"device arrays (CuPy, torch CUDA, __cuda_array_interface__, DLPack on a "
                        f"GPU); got a mix: {listing}")
    kind = next(iter(kinds.values()), "host")
    family = next((family_of(a) for a in named.values() if a is not None), "numpy")
    return kind, family, {name: to_compute(name, a) for name, a in named.items()}


@contextlib.contextmanager
def torch_stream(tensor):
    """Make CuPy work on `tensor`'s CUDA device and torch's current stream there, so gpurnn's
    kernels are ordered with the surrounding torch work without a synchronisation. A no-op for
    CPU tensors."""
    if not _is_torch_tensor(tensor) or tensor.device.type != "cuda":
        yield
        return
    import cupy
    import torch
    stream = torch.cuda.current_stream(tensor.device)
    with cupy.cuda.Device(tensor.device.index):
        with cupy.cuda.ExternalStream(stream.cuda_stream, tensor.device.index):
            yield


def forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, lengths=None,
            reverse=False, training=True, backend="auto", backend_options=None):
    """`gpurnn.functional.forward` for any supported array family; y, h_n, c_n come back in
    x's family. The reserve stays in NumPy/CuPy (it only feeds `backward`)."""
    with torch_stream(x):
        _, family, a = convert_all({"x": x, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh,
                                    "h0": h0, "c0": c0})
        y, h_n, c_n, reserve = F.forward(cell, a["x"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                                         a["h0"], a["c0"], lengths, reverse, training, backend,
                                         backend_options)
        return (from_compute(y, family), from_compute(h_n, family), from_compute(c_n, family),
                reserve)


def backward(reserve, dy=None, dh_n=None, dc_n=None, backend_options=None):
    """`gpurnn.functional.backward` for any supported array family. The gradients come back in
    the family of the first of dy, dh_n, dc_n given (else the reserve's: NumPy or CuPy)."""
    anchor = next((v for v in (dy, dh_n, dc_n) if v is not None), None)
    with torch_stream(anchor):
        _, family, a = convert_all({"dy": dy, "dh_n": dh_n, "dc_n": dc_n})
        if anchor is None:
            family = "cupy" if getattr(reserve, "backend", None) == "cuda" else "numpy"
        grads = F.backward(reserve, a["dy"], a["dh_n"], a["dc_n"], backend_options)
        return Grads(*(from_compute(g, family) for g in grads))
