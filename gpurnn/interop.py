"""Array interop: the functional API for every array family gpurnn accepts (NumPy, CuPy, torch,
__cuda_array_interface__, DLPack), results in the family that went in. The rules, and the
classification and conversion helpers re-exported here, live in gpurnn.arrays (the one array
boundary).
"""
from __future__ import annotations

from . import functional as F
from .arrays import convert_all, family_of, from_compute, kind_of, to_compute, torch_stream

__all__ = ["kind_of", "family_of", "to_compute", "from_compute", "convert_all", "torch_stream",
           "forward", "backward"]


def forward(cell, x, w_ih, w_hh, b_ih=None, b_hh=None, h0=None, c0=None, lengths=None,
            reverse=False, training=True, backend="auto", backend_options=None):
    """`gpurnn.functional.forward` run on torch's current stream when x is a CUDA tensor;
    y, h_n, c_n come back in x's family. The reserve stays in NumPy/CuPy (it only feeds
    `backward`)."""
    with torch_stream(x):
        return F.forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, training,
                         backend, backend_options)


def backward(reserve, dy=None, dh_n=None, dc_n=None, backend_options=None):
    """`gpurnn.functional.backward` run on torch's current stream when dy (or the first of
    dh_n, dc_n given) is a CUDA tensor; the gradients come back in that argument's family
    (else the reserve's: NumPy or CuPy)."""
    anchor = next((v for v in (dy, dh_n, dc_n) if v is not None), None)
    with torch_stream(anchor):
        return F.backward(reserve, dy, dh_n, dc_n, backend_options)
