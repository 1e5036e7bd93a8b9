"""Every kernel specialization gpurnn launches, with its Numba signature: one list that the
backends, the compile cache and the static checks (`cuda.compile_ptx(spec.func,
spec.signature, cc=...)`) all read, so nothing compiled in one place is missed in another.
"""
from __future__ import annotations

import functools

from numba import int32, void

from ..cells import ALL_CELLS, CELLS, GATES, KERNEL_CELLS
from .cellmath import NUMBA_COMPUTE, NUMBA_STORAGE, REGULARISED_CELLS
from .dtypes import STORAGE
from .layout import KernelSpec
from . import persistent, pointwise

DTYPES = STORAGE
# the kernel-only LSTM variants (gpurnn.variants) run in float32/float64 only
VARIANT_DTYPES = ("float32", "float64")
KINDS = ("persistent_fwd", "persistent_bwd", "pointwise_fwd", "pointwise_bwd")


def signature(kind: str, dtype: str, regularised: bool = False):
    """The Numba signature of a kernel kind for a storage dtype; every array is C-contiguous,
    scalars are int32. s*: storage arrays (W_hh, h, y, gates, dy), c*: compute arrays (Gx,
    b_hh, the cell state, gradients and carries) — the same type at 32 and 64 bits.
    regularised: the plain arguments, then the noise masks (compute dtype, (1,1,1)
    placeholders where off) and their flags: rec (1, B, H), zh, zc (T, B, H), noise int32 —
    pointwise_fwd without rec (its recurrent product is the host's GEMM)."""
    c3 = NUMBA_COMPUTE[dtype][:, :, ::1]
    plain = _plain_signature(kind, dtype)
    if not regularised:
        return plain
    extra = (c3, c3, int32) if kind == "pointwise_fwd" else (c3, c3, c3, int32)
    return void(*plain.args, *extra)


def _plain_signature(kind, dtype):
    s, c = NUMBA_STORAGE[dtype], NUMBA_COMPUTE[dtype]
    s2, s3 = s[:, ::1], s[:, :, ::1]
    c1, c2, c3 = c[::1], c[:, ::1], c[:, :, ::1]
    i1 = int32[::1]
    if kind == "persistent_fwd":
        # gx, w_hh, b_rec, h, c, gates, y, lengths, reverse, t_begin, t_end, units, save_gates,
        # batch_tile
        return void(c3, s2, c1, s3, c3, s3, s3, i1, int32, int32, int32, int32, int32, int32)
    if kind == "persistent_bwd":
        # w_hh, b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, reverse, k_begin,
        # k_end, units, batch_tile
        return void(s2, c1, s3, c3, s3, s3, c3, c3, c2, c2, i1, int32, int32, int32, int32, int32)
    if kind == "pointwise_fwd":
        # gx, gh, b_rec, h, c, gates, y, lengths, reverse, s, save_gates
        return void(c3, c2, c1, s3, c3, s3, s3, i1, int32, int32, int32)
    if kind == "pointwise_bwd":
        # b_rec, h, c, gates, dy, dh_rec, dgh, dgx, dh_carry, dc_carry, lengths, reverse, s
        return void(c1, s3, c3, s3, s3, c2, c3, c3, c2, c2, i1, int32, int32)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


_FACTORIES = {
    "persistent_fwd": persistent.make_fwd,
    "persistent_bwd": persistent.make_bwd,
    "pointwise_fwd": pointwise.make_fwd,
    "pointwise_bwd": pointwise.make_bwd,
}


@functools.lru_cache(maxsize=None)
def spec(cell: str, kind: str, dtype: str, regularised: bool = False) -> KernelSpec:
    """The specialization of one kernel kind for cell and dtype; regularised: the one with
    zoneout and variational recurrent dropout (REGULARISED_CELLS, every storage dtype), a
    separate compile so that the plain kernels carry none of it."""
    if cell not in GATES:
        raise ValueError(f"cell must be one of {ALL_CELLS}; got {cell!r}")
    allowed = VARIANT_DTYPES if cell in KERNEL_CELLS else DTYPES
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {allowed} for cell {cell!r}; got {dtype!r}")
    if kind not in _FACTORIES:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    regularised = bool(regularised)
    if regularised and cell not in REGULARISED_CELLS:
        raise ValueError(f"no regularised kernels for cell {cell!r}; they exist for "
                         f"{REGULARISED_CELLS}")
    func = _FACTORIES[kind](cell, dtype, regularised)
    return KernelSpec(name=func.__name__,
                      func=func, signature=signature(kind, dtype, regularised), cell=cell,
                      kind=kind, dtype=dtype, grid_sync=kind.startswith("persistent"),
                      regularised=regularised)


def specializations() -> list[KernelSpec]:
    """Every specialization: each torch-facing cell x storage dtype x kind (64 kernels), then
    each kernel-only LSTM variant x float32/float64 x kind (24 kernels), then the regularised
    ones of each torch-facing cell x storage dtype x kind (64 kernels)."""
    return ([spec(cell, kind, dtype) for cell in CELLS for dtype in DTYPES for kind in KINDS]
            + [spec(cell, kind, dtype) for cell in KERNEL_CELLS for dtype in VARIANT_DTYPES
               for kind in KINDS]
            + [spec(cell, kind, dtype, True) for cell in REGULARISED_CELLS for dtype in DTYPES
               for kind in KINDS])
