"""The per-element cell math of one step, forward and backward, as device functions shared by the
persistent and the pointwise (stepwise) kernels — written once, so both paths write the same
reserve (layout: gpurnn.cells) and a new cell is added in one place.

One call handles one (batch row b, hidden unit u) of the step at time t; the caller has formed
the recurrent pre-activations of that unit (r0..r3, gate order as gpurnn.cells, without b_hh:
GRU's b_hn is added here, inside the reset product) and knows the step's input state h_in.
Masked steps (t >= lengths[b]) keep their gates but copy the state through and output 0.
Sigmoid is 0.5*tanh(a/2) + 0.5: no exp overflow, the NumPy reference's form.
Constants are typed per dtype: a float64 literal would promote float32 math.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda

NP_DTYPES = {"float32": np.float32, "float64": np.float64}


@cuda.jit(device=True, inline=True)
def step_times(T, s, reverse):
    """(t, t_in, t_out) of processing step s: its time index and where its input and output
    states sit in the reserve's (T+1, B, H) boundary states (gpurnn.cells)."""
    t = T - 1 - s if reverse else s
    return t, t + reverse, t + 1 - reverse


@functools.lru_cache(maxsize=None)
def make(cell: str, dtype: str):
    """(fwd_unit, bwd_unit) device functions for cell, dtype.

    fwd_unit(gx, b_rec, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3, h_in,
             save_gates)
        reads gx[t, b, gate*H + u] and (LSTM) c[t_in, b, u]; writes gates[t, b, :] of unit u
        when save_gates (a training forward: the reserve), (LSTM) c[t_out, b, u],
        h[t_out, b, u] and y[t, b, u].
    bwd_unit(h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out, b, u, dh)
        dh = dL/dh_out from the carry and the recurrence (without dy, added here on active
        steps); writes dgh[t, b, gate*H + u] (GRU also dgx), dh_carry[b, u] (the direct part
        of dL/dh_in) and (LSTM) dc_carry[b, u].
    """
    DT = NP_DTYPES[dtype]
    ZERO, HALF, ONE = DT(0), DT(0.5), DT(1)
    IS_LSTM, IS_GRU, IS_RELU = cell == "lstm", cell == "gru", cell == "rnn_relu"
    G = {"lstm": 4, "gru": 3}.get(cell, 1)

    @cuda.jit(device=True, inline=True)
    def fwd_unit(gx, b_rec, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3, h_in,
                 save_gates):
        H = h.shape[2]
        active = t < lengths[b]
        if IS_LSTM:
            i = HALF * math.tanh(HALF * (gx[t, b, u] + r0)) + HALF
            f = HALF * math.tanh(HALF * (gx[t, b, H + u] + r1)) + HALF
            gg = math.tanh(gx[t, b, 2 * H + u] + r2)
            o = HALF * math.tanh(HALF * (gx[t, b, 3 * H + u] + r3)) + HALF
            if save_gates:
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
            if save_gates:
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
        h[t_out, b, u] = h_out
        y[t, b, u] = h_out if active else ZERO

    @cuda.jit(device=True, inline=True)
    def bwd_unit(h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out, b, u, dh):
        H = h.shape[2]
        if t >= lengths[b]:
            # masked step: the state was copied through, y was a constant 0
            dh_carry[b, u] = dh
            for g in range(G):
                dgh[t, b, g * H + u] = ZERO
                if IS_GRU:
                    dgx[t, b, g * H + u] = ZERO
            return
        dh += dy[t, b, u]
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
            dgh[t, b, 2 * H + u] = dan * r          # the recurrent side of n is r * hn
            dh_carry[b, u] = dh * z
        else:
            h_out = h[t_out, b, u]
            if IS_RELU:
                da = dh if h_out > ZERO else ZERO
            else:
                da = dh * (ONE - h_out * h_out)
            dgh[t, b, u] = da
            dh_carry[b, u] = ZERO

    return fwd_unit, bwd_unit
