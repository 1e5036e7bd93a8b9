"""Stepwise path: one fused pointwise kernel per step; the step's GEMM is the host's (NumPy in
the simulator, CuPy/cuBLAS on a GPU). Used where W_hh does not fit in shared memory.

Ownership and barriers: 1-D grid over the B*H (b, u) elements of one step, one element per
thread (idx = b*H + u, so consecutive threads touch consecutive units: coalesced). No shared
memory and no barriers: the kernel boundary is the step's barrier. The cell math is the
persistent kernels' own (gpurnn.kernels.cellmath), so both paths write the same reserve.
Regularisers: make_fwd/make_bwd(cell, dtype, regularised=True), as in the persistent kernels
(a separate specialization; the plain kernel fixes the flags to 0 at compile time). The forward's
recurrent dropout is the host's (the GEMM reads h_{t-1} * mask); the backward masks dh_rec.
"""
from __future__ import annotations

import functools

from numba import cuda

from . import cellmath
from ..cells import GATES
from .cellmath import step_times
from .cellmath import codec
from .dtypes import NP_COMPUTE, SHORT


NOISE_OFF = 0       # the plain kernels' noise flags: every mask off, at compile time


@functools.lru_cache(maxsize=None)
def make_fwd(cell: str, dtype: str, regularised: bool = False):
    """Pointwise forward of processing step `s` for cell, dtype; with `regularised`, its
    specialization with zoneout (the recurrent dropout mask is the host GEMM's: gh is
    (h_in * rec) @ W_hh^T, while the cell update reads the unmasked h_in).

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
    regularised only, after save_gates: zh, zc (T, B, H) zoneout masks (compute dtype; an
      absent one any (1,1,1) placeholder), noise int32 (cellmath.NOISE_* bits)
    No argument may alias another.
    """
    G = GATES[cell]
    ZERO = NP_COMPUTE[dtype](0)   # typed: a float64 literal would promote f32 math
    LOAD, _ = codec(dtype)
    if regularised:
        cellmath.make(cell, dtype, True)            # a cell without regularised kernels: raise
    fwd_unit = cellmath.units(cell, dtype)[0]

    @cuda.jit(device=True, inline=True)
    def body(gx, gh, b_rec, h, c, gates, y, lengths, reverse, s, save_gates, zh, zc, noise):
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
                     save_gates, zh, zc, noise)

    if regularised:
        def kernel(gx, gh, b_rec, h, c, gates, y, lengths, reverse, s, save_gates, zh, zc, noise):
            body(gx, gh, b_rec, h, c, gates, y, lengths, reverse, s, save_gates, zh, zc, noise)
    else:
        def kernel(gx, gh, b_rec, h, c, gates, y, lengths, reverse, s, save_gates):
            body(gx, gh, b_rec, h, c, gates, y, lengths, reverse, s, save_gates, c, c, NOISE_OFF)

    kernel.__name__ = f"{cell}_pointwise_fwd_{'reg_' if regularised else ''}{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(cell: str, dtype: str, regularised: bool = False):
    """Pointwise backward of processing step `s` for cell, dtype; with `regularised`, its
    specialization with zoneout and variational recurrent dropout.

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
    regularised only, after s: rec (1, B, H) the recurrent dropout mask (dh_rec, the product
      with the masked state, is multiplied by it here), zh, zc (T, B, H), noise int32 (as in
      the persistent kernels; absent masks any (1,1,1) placeholder)
    No argument may alias another.
    """
    if regularised:
        cellmath.make(cell, dtype, True)
    bwd_unit = cellmath.units(cell, dtype)[1]
    NOISE_REC = cellmath.NOISE_REC

    @cuda.jit(device=True, inline=True)
    def body(b_rec, h, c, gates, dy, dh_rec, dgh, dgx, dh_carry, dc_carry, lengths, reverse, s,
             rec, zh, zc, noise):
        idx = cuda.grid(1)
        T = dy.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, t_in, t_out = step_times(T, s, reverse)
            if noise & NOISE_REC:       # the host's product saw h_{t-1} * rec
                dh = dh_carry[b, u] + dh_rec[b, u] * rec[0, b, u]
            else:
                dh = dh_carry[b, u] + dh_rec[b, u]
            bwd_unit(b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out,
                     b, u, dh, zh, zc, noise)

    if regularised:
        def kernel(b_rec, h, c, gates, dy, dh_rec, dgh, dgx, dh_carry, dc_carry, lengths, reverse,
                   s, rec, zh, zc, noise):
            body(b_rec, h, c, gates, dy, dh_rec, dgh, dgx, dh_carry, dc_carry, lengths, reverse, s,
                 rec, zh, zc, noise)
    else:
        def kernel(b_rec, h, c, gates, dy, dh_rec, dgh, dgx, dh_carry, dc_carry, lengths, reverse,
                   s):
            body(b_rec, h, c, gates, dy, dh_rec, dgh, dgx, dh_carry, dc_carry, lengths, reverse, s,
                 c, c, c, NOISE_OFF)

    kernel.__name__ = f"{cell}_pointwise_bwd_{'reg_' if regularised else ''}{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel
