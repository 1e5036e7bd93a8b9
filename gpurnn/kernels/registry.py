"""Every kernel specialization gpurnn launches, with its Numba signature: one list that the
backends, the compile cache and the static checks (`cuda.compile_ptx(spec.func,
spec.signature, cc=...)`) all read, so nothing compiled in one place is missed in another.
"""
from __future__ import annotations

import functools

from numba import float32, float64, int32, void

from ..cells import CELLS, GATES
from .layout import KernelSpec
from . import persistent, pointwise

DTYPES = ("float32", "float64")
KINDS = ("persistent_fwd", "persistent_bwd", "pointwise_fwd", "pointwise_bwd")
_NUMBA = {"float32": float32, "float64": float64}


def signature(kind: str, dtype: str):
    """The Numba signature of a kernel kind; every array is C-contiguous, scalars are int32."""
    f = _NUMBA[dtype]
    a1, a2, a3 = f[::1], f[:, ::1], f[:, :, ::1]
    i1 = int32[::1]
    if kind == "persistent_fwd":
        # gx, w_hh, b_rec, h, c, gates, y, lengths, reverse, t_begin, t_end, units, save_gates,
        # batch_tile
        return void(a3, a2, a1, a3, a3, a3, a3, i1, int32, int32, int32, int32, int32, int32)
    if kind == "persistent_bwd":
        # w_hh, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, reverse, k_begin, k_end,
        # units, batch_tile
        return void(a2, a3, a3, a3, a3, a3, a3, a2, a2, i1, int32, int32, int32, int32, int32)
    if kind == "pointwise_fwd":
        # gx, gh, b_rec, h, c, gates, y, lengths, reverse, s, save_gates
        return void(a3, a2, a1, a3, a3, a3, a3, i1, int32, int32, int32)
    if kind == "pointwise_bwd":
        # h, c, gates, dy, dh_rec, dgh, dgx, dh_carry, dc_carry, lengths, reverse, s
        return void(a3, a3, a3, a3, a2, a3, a3, a2, a2, i1, int32, int32)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


_FACTORIES = {
    "persistent_fwd": persistent.make_fwd,
    "persistent_bwd": persistent.make_bwd,
    "pointwise_fwd": pointwise.make_fwd,
    "pointwise_bwd": pointwise.make_bwd,
}


@functools.lru_cache(maxsize=None)
def spec(cell: str, kind: str, dtype: str) -> KernelSpec:
    """The specialization of one kernel kind for cell and dtype."""
    if cell not in GATES:
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    func = _FACTORIES[kind](cell, dtype) if kind in _FACTORIES else None
    if func is None:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    return KernelSpec(name=func.__name__,
                      func=func, signature=signature(kind, dtype), cell=cell, kind=kind,
                      dtype=dtype, grid_sync=kind.startswith("persistent"))


def specializations() -> list[KernelSpec]:
    """Every specialization: each cell x dtype x kind (32 kernels)."""
    return [spec(cell, kind, dtype) for cell in CELLS for dtype in DTYPES for kind in KINDS]
