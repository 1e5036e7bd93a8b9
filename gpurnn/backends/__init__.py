"""Backends: one module each, all with the same two entry points.

    forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, *,
            options=None, noise=None) -> (y, h_n, c_n, reserve)
    backward(reserve, dy, dh_n, dc_n, *, options=None) -> Grads

Each module also has check_options(options) -> dict (the boundary calls it through
`check_options(name, options)` below) and reserve_dtypes(dtype) -> (h, c, gates) dtypes.

Arguments arrive validated and normalised by the boundary (gpurnn.functional, gpurnn.stack;
nothing below re-validates):
  cell      one of gpurnn.cells.CELLS
  x         (T, B, I) C-contiguous, dtype float32 | float64 | float16 | bfloat16 (all share it)
  w_ih      (G*H, I) ; w_hh (G*H, H) ; b_ih, b_hh (G*H,) or both None (bias=False)
  h0        (B, H), never None ; c0 (B, H) for LSTM, else None
  lengths   None (all T) or int64 (B,) with 0 <= lengths[b] <= T, on the host
  reverse   run t = T-1 .. 0 (each sequence starting at its own last step)
  dy        (T, B, H) ; dh_n (B, H) ; dc_n (B, H) for LSTM else None — zeros where the caller
            had none
  noise     None (no regulariser) or the dict of gpurnn/layernorm.py's contract, any subset of
            "recurrent" (B, H) variational recurrent dropout, 0 or 1/(1-p), on h_{t-1} where it
            enters W_hh only; "zoneout_h" (T, B, H) and, LSTM only, "zoneout_c" (T, B, H): d,
            1 keeping the previous state (h_t = d*h_{t-1} + (1-d)*h~), indexed by time t; in
            the compute dtype (float32 for 16-bit storage). The Reserve keeps it (`noise`) and
            backward reads it from there.
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
    launch: Any = None    # what the forward ran with (cuda/sim: its LaunchConfig; cpu: its
                          # options and prepared weights); None: backward plans afresh
    storage: Any = None   # numpy/cpu backends: the caller's 16-bit dtype when the reserve is fp32
    noise: Any = None     # the forward's regulariser masks (dict, see above) or None

    @property
    def shape(self):
        """(T, B, I, H)."""
        T, B, I = self.x.shape
        return T, B, I, self.h.shape[2]


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


def check_options(name: str, options):
    """`options` (backend_options) validated for backend `name`, as a dict: unknown keys, bad
    values and keys the backend does not use are a ValueError naming the key, before anything
    is computed. The boundary (gpurnn.functional, the module families) calls this once."""
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"backend_options must be a dict or None; got {type(options).__name__}")
    return get_backend(name).check_options(options)


def reserve_dtypes(name: str, dtype):
    """The dtypes (h, c, gates) of the reserve backend `name` keeps for storage `dtype`."""
    return get_backend(name).reserve_dtypes(dtype)


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
