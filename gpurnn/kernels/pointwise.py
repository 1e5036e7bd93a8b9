"""Stepwise path: one fused pointwise kernel per step; the step's GEMM is the host's (NumPy in
the simulator, CuPy/cuBLAS on a GPU). Used where W_hh does not fit in shared memory.

Ownership and barriers: 1-D grid over the B*H (b, u) elements of one step, one element per
thread (idx = b*H + u, so consecutive threads touch consecutive units: coalesced). No shared
memory and no barriers: the kernel boundary is the step's barrier. The cell math is the
persistent kernels' own (gpurnn.kernels.cellmath), so both paths write the same reserve.
"""
from __future__ import annotations

import functools

from numba import cuda

from . import cellmath
from ..cells import GATES
from .cellmath import step_times
from .cellmath import codec
from .dtypes import NP_COMPUTE, SHORT


@functools.lru_cache(maxsize=None)
def make_fwd(cell: str, dtype: str):
    """Pointwise forward of processing step `s` for cell, dtype.

    Arguments (C-contiguous; [S] storage dtype, else compute dtype: gpurnn.kernels.dtypes):
      gx       (T, B, G*H)  input projection with folded biases; read only
      gh       (B, G*H)     h_in @ W_hh^T for this step, no bias; read only
      b_rec    (n,)         GRU: b_hh (zeros without bias); the peephole cells: the peephole
                            vector (cellmath.make); other cells: (1,) placeholder
      h        (T+1, B, H)  [S] reserve states; reads h[t_in], writes h[t_out]
      c        (T+1, B, H)  LSTM (reads c[t_in], writes c[t_out]); else (1,1,1) placeholder
      gates    (T, B, S*H)  [S] LSTM-family/GRU activated gates (written when save_gates); else, and for
                            RNN, a (1,1,1) placeholder
      y        (T, B, H)    [S] written (0 on masked steps)
      lengths  int32 (B,) ; reverse, s : int32 (s = processing step, t = s or T-1-s)
      save_gates int32      1 in a training forward (keeps the reserve), 0 for inference
    No argument may alias another.
    """
    G = GATES[cell]
    ZERO = NP_COMPUTE[dtype](0)   # typed: a float64 literal would promote f32 math
    LOAD, _ = codec(dtype)
    fwd_unit, _ = cellmath.make(cell, dtype)

    def kernel(gx, gh, b_rec, h, c, gates, y, lengths, reverse, s, save_gates):
        idx = cuda.grid(1)
        T = gx.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, t_in, t_out = step_times(T, s, reverse)
            r0 = gh[b, u]
            r1 = ZERO
            r2 = ZERO
            r3 = ZERO
            if G > 1:
                r1 = gh[b, H + u]
                r2 = gh[b, 2 * H + u]
            if G > 3:
                r3 = gh[b, 3 * H + u]
            h_in = LOAD(h[t_in, b, u])
            fwd_unit(gx, b_rec, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3, h_in,
                     save_gates)

    kernel.__name__ = f"{cell}_pointwise_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(cell: str, dtype: str):
    """Pointwise backward of processing step `s` for cell, dtype.

    Arguments (C-contiguous; [S] storage dtype, else compute dtype: gpurnn.kernels.dtypes):
      b_rec     (n,)         the peephole cells' peephole vector (cellmath.make); else (1,)
                             placeholder; read only
      h, c, gates            the forward's reserve ([S] h, gates); read only ((1,1,1) placeholders where none)
      dy        (T, B, H)    [S] read only; ignored on masked steps
      dh_rec    (B, H)       dgh[step processed after s] @ W_hh (zeros for the last step)
      dgh       (T, B, G*H)  recurrent-side gate gradients, written at step t
      dgx       (T, B, G*H)  GRU input-side gate gradients (written); else (1,1,1) placeholder
      dh_carry  (B, H)       in/out: direct part of dL/dh_out -> of dL/dh_in
      dc_carry  (B, H)       LSTM in/out dL/dc_out -> dL/dc_in; else (1,1) placeholder
      lengths   int32 (B,) ; reverse, s : int32
    No argument may alias another.
    """
    _, bwd_unit = cellmath.make(cell, dtype)

    def kernel(b_rec, h, c, gates, dy, dh_rec, dgh, dgx, dh_carry, dc_carry, lengths, reverse, s):
        idx = cuda.grid(1)
        T = dy.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, t_in, t_out = step_times(T, s, reverse)
            dh = dh_carry[b, u] + dh_rec[b, u]
            bwd_unit(b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out,
                     b, u, dh)

    kernel.__name__ = f"{cell}_pointwise_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel
