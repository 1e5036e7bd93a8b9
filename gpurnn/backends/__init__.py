"""Backends: one module each, all with the same two entry points.

    forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve)
        -> (y, h_n, c_n, reserve)
    backward(reserve, dy, dh_n, dc_n) -> Grads

Arguments arrive validated and normalised by `gpurnn.functional` (nothing below re-validates):
  cell      one of gpurnn.cells.CELLS
  x         (T, B, I) C-contiguous, dtype float32 | float64 (all arrays share it)
  w_ih      (G*H, I) ; w_hh (G*H, H) ; b_ih, b_hh (G*H,) or both None (bias=False)
  h0        (B, H), never None ; c0 (B, H) for LSTM, else None
  lengths   None (all T) or int64 (B,) with 0 <= lengths[b] <= T, on the host
  reverse   run t = T-1 .. 0 (each sequence starting at its own last step)
  dy        (T, B, H) ; dh_n (B, H) ; dc_n (B, H) for LSTM else None — zeros where the caller
            had none
Returns y (T, B, H) (zeros at t >= lengths[b]), h_n, c_n (None unless LSTM) and a Reserve
(None unless need_reserve). Layout of the reserve: gpurnn.cells.

What every backend promises (tests/test_readonly.py, tests/test_failed_calls.py): it never
writes into an array it was given (they may be the caller's own, even read-only) nor into a
Reserve (backward only reads it, so a failed backward can be retried); it checks its `options`
before computing anything.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple

BACKENDS = ("numpy", "cpu", "sim", "cuda")


class Grads(NamedTuple):
    dx: Any       # (T, B, I)
    dh0: Any      # (B, H)
    dc0: Any      # (B, H) LSTM, else None
    dw_ih: Any    # (G*H, I)
    dw_hh: Any    # (G*H, H)
    db_ih: Any    # (G*H,) or None without bias
    db_hh: Any    # (G*H,) or None without bias


@dataclass
class Reserve:
    """What a training forward keeps for backward (like cuDNN's reserve space)."""
    cell: str
    backend: str
    reverse: bool
    x: Any
    w_ih: Any
    w_hh: Any
    has_bias: bool
    lengths: Any          # None or (B,) int64 host array
    h: Any                # (T+1, B, H)
    c: Any                # (T+1, B, H) or None
    gates: Any            # (T, B, S*H) or None
    consumed: bool = False
    plan: Any = None      # kernel backends: the launch configuration their forward used
    storage: Any = None   # NumPy backend: the caller's 16-bit dtype when the reserve is fp32

    @property
    def shape(self):
        """(T, B, I, H)."""
        T, B, I = self.x.shape
        return T, B, I, self.h.shape[2]


def is_device_array(a) -> bool:
    """CuPy, torch CUDA tensors, __cuda_array_interface__ or GPU DLPack arrays (gpurnn.arrays)."""
    from ..arrays import kind_of
    return kind_of(a) == "device"


def get_backend(name: str):
    """The backend module for a resolved name ('numpy', 'cpu', 'sim' or 'cuda')."""
    if name == "numpy":
        from . import numpy as mod
    elif name == "cpu":
        from . import cpu as mod
    elif name == "sim":
        from . import sim as mod
    elif name == "cuda":
        from . import cuda as mod
    else:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {name!r}")
    return mod


def resolve(backend: str, arrays) -> str:
    """Resolve 'auto' (or GPURNN_BACKEND) to a backend name by the types of `arrays`, a mapping
    argument name -> array (None allowed; the names go into the messages).

    NumPy arrays go to 'cpu' (the fast CPU path; 'numpy' where Numba is missing), anything
    exposing __cuda_array_interface__ goes to 'cuda';
    mixing the two in one call is a TypeError naming each argument. An explicit 'sim' takes
    NumPy arrays.
    """
    from ..arrays import kind_of
    if not hasattr(arrays, "items"):
        arrays = {f"argument {i}": a for i, a in enumerate(arrays)}
    kinds = {name: kind_of(a, name) for name, a in arrays.items() if a is not None}

    def listing(which=None):
        return ", ".join(f"{name} ({kind} {type(arrays[name]).__module__}."
                         f"{type(arrays[name]).__name__})"
                         for name, kind in kinds.items() if which in (None, kind))

    if len(set(kinds.values())) > 1:
        raise TypeError(f"arrays in one call must all be host (NumPy) or all device (CuPy / "
                        f"__cuda_array_interface__) arrays; got a mix: {listing()}")
    on_device = set(kinds.values()) == {"device"}
    if backend == "auto":
        backend = os.environ.get("GPURNN_BACKEND", "auto") or "auto"
    if backend == "auto":
        return "cuda" if on_device else ("cpu" if availability("cpu")[0] else "numpy")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}; got {backend!r}")
    if backend in ("numpy", "cpu", "sim") and on_device:
        raise TypeError(f"backend {backend!r} takes NumPy arrays; got device arrays: "
                        f"{listing('device')}")
    if backend == "cuda" and kinds and not on_device:
        raise TypeError(f"backend 'cuda' takes device arrays (CuPy or __cuda_array_interface__); "
                        f"got NumPy arrays: {listing('host')}")
    return backend


def availability(name: str):
    """(available, reason) for a backend on this machine, without side effects on numba."""
    import importlib.util
    if name == "numpy":
        return True, "always (CPU reference)"
    if name == "cpu":
        if importlib.util.find_spec("numba") is None:
            return False, "Numba is not installed (pip install numba)"
        return True, "fused Numba kernels on an OpenMP team, GEMMs by MKL (torch) or OpenBLAS (NumPy)"
    if name == "sim":
        # numba's own, deprecated numba.cuda (present without numba-cuda) lacks what the
        # kernels use: the numba-cuda package is required, not just an importable numba.cuda
        if importlib.util.find_spec("numba_cuda") is None:
            return False, "numba-cuda is not installed (pip install 'gpurnn[sim]')"
        if importlib.util.find_spec("gpurnn.backends.sim") is None:
            return False, "the simulator backend is not part of this build"
        try:
            from ..sim import check_numba_cuda
            check_numba_cuda()
        except RuntimeError as exc:
            return False, str(exc)
        return True, ("gpurnn's strict CUDA simulator (same kernel source, NumPy arrays; every "
                      "block at once, real grid barrier, race and bounds checks)")
    if name == "cuda":
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            return False, "NUMBA_ENABLE_CUDASIM=1 is set: numba.cuda is the simulator in this process"
        if importlib.util.find_spec("cupy") is None:
            return False, "CuPy is not installed (pip install 'gpurnn[cuda13]' or '[cuda12]')"
        if importlib.util.find_spec("numba_cuda") is None:
            return False, "numba-cuda is not installed (pip install 'gpurnn[cuda13]')"
        try:
            import cupy
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CuPy raises its own CUDARuntimeError types; report, don't hide
            return False, f"no usable CUDA device: {type(exc).__name__}: {exc}"
        if count < 1:
            return False, "no CUDA device"
        return True, f"{count} CUDA device(s)"
    raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
