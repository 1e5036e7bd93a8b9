"""Stepwise path: one fused pointwise kernel per step; the step's GEMM is the host's (NumPy in
the simulator, CuPy/cuBLAS on a GPU). Used where W_hh does not fit in shared memory.

Ownership and barriers: 1-D grid over the B*H (b, u) elements of one step, one element per
thread (idx = b*H + u, so consecutive threads touch consecutive units: coalesced). No shared
memory and no barriers: the kernel boundary is the step's barrier. The cell math is written
out exactly as in gpurnn.kernels.persistent (numba-cuda 0.30 cannot compile device functions
without a driver, which the static checks need), so both paths write the same reserve.
"""
from __future__ import annotations

import functools
import math

from numba import cuda

from ..cells import GATES
from .persistent import NP_DTYPES, SHORT


@functools.lru_cache(maxsize=None)
def make_fwd(cell: str, dtype: str):
    """Pointwise forward of processing step `s` for cell, dtype.

    Arguments (C-contiguous, compute dtype unless said otherwise):
      gx       (T, B, G*H)  input projection with folded biases; read only
      gh       (B, G*H)     h_in @ W_hh^T for this step, no bias; read only
      b_rec    (G*H,)       GRU: b_hh (zeros without bias); other cells: (1,) placeholder
      h        (T+1, B, H)  reserve states; reads h[t_in], writes h[t_out]
      c        (T+1, B, H)  LSTM (reads c[t_in], writes c[t_out]); else (1,1,1) placeholder
      gates    (T, B, 4*H)  LSTM/GRU activated gates (written); RNN: (1,1,1) placeholder
      y        (T, B, H)    written (0 on masked steps)
      lengths  int32 (B,) ; reverse, s : int32 (s = processing step, t = s or T-1-s)
    No argument may alias another.
    """
    G = GATES[cell]
    DT = NP_DTYPES[dtype]
    ZERO, HALF = DT(0), DT(0.5)   # typed constants: a float64 literal would promote f32 math
    IS_LSTM, IS_GRU, IS_RELU = cell == "lstm", cell == "gru", cell == "rnn_relu"

    def kernel(gx, gh, b_rec, h, c, gates, y, lengths, reverse, s):
        idx = cuda.grid(1)
        T = gx.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t = T - 1 - s if reverse else s
            t_in = t + reverse
            t_out = t + 1 - reverse
            r0 = gh[b, u]
            r1 = ZERO
            r2 = ZERO
            r3 = ZERO
            if G > 1:
                r1 = gh[b, H + u]
                r2 = gh[b, 2 * H + u]
            if G > 3:
                r3 = gh[b, 3 * H + u]
            h_in = h[t_in, b, u]
            active = t < lengths[b]
            # --- cell math, identical in persistent.make_fwd ---
            if IS_LSTM:
                # sigmoid as 0.5*tanh(a/2)+0.5: no exp overflow; the NumPy reference's form
                i = HALF * math.tanh(HALF * (gx[t, b, u] + r0)) + HALF
                f = HALF * math.tanh(HALF * (gx[t, b, H + u] + r1)) + HALF
                gg = math.tanh(gx[t, b, 2 * H + u] + r2)
                o = HALF * math.tanh(HALF * (gx[t, b, 3 * H + u] + r3)) + HALF
                gates[t, b, u] = i
                gates[t, b, H + u] = f
                gates[t, b, 2 * H + u] = gg
                gates[t, b, 3 * H + u] = o
                c_in = c[t_in, b, u]
                c_out = c_in
                h_out = h_in
                if active:
                    c_out = f * c_in + i * gg
                    h_out = o * math.tanh(c_out)
                c[t_out, b, u] = c_out
            elif IS_GRU:
                r = HALF * math.tanh(HALF * (gx[t, b, u] + r0)) + HALF
                z = HALF * math.tanh(HALF * (gx[t, b, H + u] + r1)) + HALF
                hn = r2 + b_rec[2 * H + u]
                n = math.tanh(gx[t, b, 2 * H + u] + r * hn)
                gates[t, b, u] = r
                gates[t, b, H + u] = z
                gates[t, b, 2 * H + u] = n
                gates[t, b, 3 * H + u] = hn
                h_out = h_in
                if active:
                    h_out = n + z * (h_in - n)
            else:
                h_out = h_in
                if active:
                    a = gx[t, b, u] + r0
                    if IS_RELU:
                        h_out = a if a > ZERO else ZERO
                    else:
                        h_out = math.tanh(a)
            # masked steps (t >= lengths[b]) keep their gates but copy the state through
            h[t_out, b, u] = h_out
            y[t, b, u] = h_out if active else ZERO

    kernel.__name__ = f"{cell}_pointwise_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(cell: str, dtype: str):
    """Pointwise backward of processing step `s` for cell, dtype.

    Arguments (C-contiguous, compute dtype unless said otherwise):
      h, c, gates            the forward's reserve; read only ((1,1,1) placeholders where none)
      dy        (T, B, H)    read only; ignored on masked steps
      dh_rec    (B, H)       dgh[step processed after s] @ W_hh (zeros for the last step)
      dgh       (T, B, G*H)  recurrent-side gate gradients, written at step t
      dgx       (T, B, G*H)  GRU input-side gate gradients (written); else (1,1,1) placeholder
      dh_carry  (B, H)       in/out: direct part of dL/dh_out -> of dL/dh_in
      dc_carry  (B, H)       LSTM in/out dL/dc_out -> dL/dc_in; else (1,1) placeholder
      lengths   int32 (B,) ; reverse, s : int32
    No argument may alias another.
    """
    G = GATES[cell]
    DT = NP_DTYPES[dtype]
    ZERO, ONE = DT(0), DT(1)
    IS_LSTM, IS_GRU, IS_RELU = cell == "lstm", cell == "gru", cell == "rnn_relu"

    def kernel(h, c, gates, dy, dh_rec, dgh, dgx, dh_carry, dc_carry, lengths, reverse, s):
        idx = cuda.grid(1)
        T = dy.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t = T - 1 - s if reverse else s
            t_in = t + reverse
            t_out = t + 1 - reverse
            dh = dh_carry[b, u] + dh_rec[b, u]
            if t >= lengths[b]:
                # masked step: the state was copied through, y was a constant 0
                dh_carry[b, u] = dh
                for g in range(G):
                    dgh[t, b, g * H + u] = ZERO
                    if IS_GRU:
                        dgx[t, b, g * H + u] = ZERO
            else:
                dh += dy[t, b, u]
                # --- cell math, identical in persistent.make_bwd ---
                if IS_LSTM:
                    i = gates[t, b, u]
                    f = gates[t, b, H + u]
                    gg = gates[t, b, 2 * H + u]
                    o = gates[t, b, 3 * H + u]
                    tanh_c = math.tanh(c[t_out, b, u])
                    dc = dc_carry[b, u] + dh * o * (ONE - tanh_c * tanh_c)
                    dgh[t, b, u] = dc * gg * (i * (ONE - i))
                    dgh[t, b, H + u] = dc * c[t_in, b, u] * (f * (ONE - f))
                    dgh[t, b, 2 * H + u] = dc * i * (ONE - gg * gg)
                    dgh[t, b, 3 * H + u] = dh * tanh_c * (o * (ONE - o))
                    dc_carry[b, u] = dc * f
                    dh_carry[b, u] = ZERO
                elif IS_GRU:
                    r = gates[t, b, u]
                    z = gates[t, b, H + u]
                    n = gates[t, b, 2 * H + u]
                    hn = gates[t, b, 3 * H + u]
                    dan = dh * (ONE - z) * (ONE - n * n)
                    daz = dh * (h[t_in, b, u] - n) * (z * (ONE - z))
                    dar = dan * hn * (r * (ONE - r))
                    dgx[t, b, u] = dar
                    dgx[t, b, H + u] = daz
                    dgx[t, b, 2 * H + u] = dan
                    dgh[t, b, u] = dar
                    dgh[t, b, H + u] = daz
                    dgh[t, b, 2 * H + u] = dan * r
                    dh_carry[b, u] = dh * z
                else:
                    h_out = h[t_out, b, u]
                    if IS_RELU:
                        da = dh if h_out > ZERO else ZERO
                    else:
                        da = dh * (ONE - h_out * h_out)
                    dgh[t, b, u] = da
                    dh_carry[b, u] = ZERO

    kernel.__name__ = f"{cell}_pointwise_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel
