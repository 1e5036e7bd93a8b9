"""The per-element cell math of one step, forward and backward, as device functions shared by the
persistent and the pointwise (stepwise) kernels — written once, so both paths write the same
reserve (layout: gpurnn.cells) and a new cell is added in one place.

One call handles one (batch row b, hidden unit u) of the step at time t; the caller has formed
the recurrent pre-activations of that unit (r0..r3, gate order as gpurnn.cells, without b_hh:
GRU's b_hn is added here, inside the reset product) and knows the step's input state h_in.
Masked steps (t >= lengths[b]) keep their gates but copy the state through and output 0.
Sigmoid is 0.5*tanh(a/2) + 0.5: no exp overflow, the NumPy reference's form.
Constants are typed per compute dtype: a float64 literal would promote float32 math. 16-bit
storage (gpurnn.kernels.dtypes): h, y, the reserve gates and dy go through the dtype's
load/store; gx, b_hh, c and every gradient are in the compute dtype.
"""
from __future__ import annotations

import functools
import math

from numba import cuda, float32, int32, types, uint16
from numba.core.types import float16
from numba.cuda import libdevice

from .dtypes import COMPUTE, KERNEL_VIEW, NP_COMPUTE, STORAGE

# Numba element types per storage dtype, of gpurnn.kernels.dtypes' names: bfloat16 as raw words
NUMBA_COMPUTE = {name: getattr(types, COMPUTE[name]) for name in STORAGE}
NUMBA_STORAGE = {name: getattr(types, KERNEL_VIEW[name]) for name in STORAGE}


@cuda.jit(device=True, inline=True)
def _same(v):
    return v


@cuda.jit(device=True, inline=True)
def _half_to_float(v):
    return float32(v)


@cuda.jit(device=True, inline=True)
def _float_to_half(v):
    return float16(v)


@cuda.jit(device=True, inline=True)
def _bf16_to_float(w):
    return libdevice.int_as_float(int32(w) << 16)


@cuda.jit(device=True, inline=True)
def _float_to_bf16(v):
    if v != v:
        return uint16(0x7FC0)                       # a quiet NaN
    # round to nearest even on the float32's bits; in int32 nothing overflows for a non-NaN,
    # and the low 16 bits of the arithmetic shift are those of a logical one
    u = libdevice.float_as_int(v)
    return uint16(((u + int32(0x7FFF) + ((u >> 16) & int32(1))) >> 16) & int32(0xFFFF))


def codec(dtype: str):
    """(load, store) device functions: storage value -> compute value, and back."""
    if dtype == "float16":
        return _half_to_float, _float_to_half
    if dtype == "bfloat16":
        return _bf16_to_float, _float_to_bf16
    return _same, _same


@cuda.jit(device=True, inline=True)
def step_times(T, s, reverse):
    """(t, t_in, t_out) of processing step s: its time index and where its input and output
    states sit in the reserve's (T+1, B, H) boundary states (gpurnn.cells)."""
    t = T - 1 - s if reverse else s
    return t, t + reverse, t + 1 - reverse


@functools.lru_cache(maxsize=None)
def make(cell: str, dtype: str):
    """(fwd_unit, bwd_unit) device functions for cell, dtype (any kernel cell of gpurnn.cells:
    the torch-facing ones and the kernel-only LSTM variants lstm_peephole, cifg, cifg_peephole).

    fwd_unit(gx, b_rec, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3, h_in,
             save_gates)
        reads gx[t, b, gate*H + u] and (LSTM family) c[t_in, b, u]; writes gates[t, b, :] of
        unit u when save_gates (a training forward: the reserve), (LSTM family)
        c[t_out, b, u], h[t_out, b, u] and y[t, b, u]. b_rec: GRU's b_hh; the peephole cells'
        peephole vector (lstm_peephole [w_ci; w_cf; w_co] (3H,), cifg_peephole [w_ci; w_co]
        (2H,)); read by no other cell (a placeholder). The 3-gate cells (GRU, cifg*) ignore r3.
    bwd_unit(b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out, b,
             u, dh)
        dh = dL/dh_out from the carry and the recurrence (without dy, added here on active
        steps); writes dgh[t, b, gate*H + u] (G gates; GRU also dgx), dh_carry[b, u] (the
        direct part of dL/dh_in) and (LSTM family) dc_carry[b, u]. b_rec as in fwd_unit (read
        by the peephole cells only).

    The variants (gpurnn.variants), per unit, a_* the pre-activations (gx + recurrent part):
      peephole  i = sig(a_i + w_ci*c_in), f = sig(a_f + w_cf*c_in), g = tanh(a_g),
                c_new = f*c_in + i*g, o = sig(a_o + w_co*c_new), h = o*tanh(c_new)
      cifg      as lstm with f = 1 - i (gates [i, g, o]; with peephole no w_cf)
    On a masked step the gates are still formed (o from c_new, the step's would-be cell) and
    saved, but c and h copy through. Backward, dc = dc_carry + dh*o*(1 - tanh^2) + dpre_o*w_co;
    dc_carry <- dc*f + dpre_i*w_ci + dpre_f*w_cf (cifg: f = 1-i, and dpre_i = dc*(g - c_in)*
    i*(1-i)). The peephole weights' own gradients are the host's (from dgh and c).
    """
    DT = NP_COMPUTE[dtype]
    LOAD, STORE = codec(dtype)
    ZERO, HALF, ONE = DT(0), DT(0.5), DT(1)
    IS_LSTM, IS_GRU, IS_RELU = cell == "lstm", cell == "gru", cell == "rnn_relu"
    IS_PEEP_LSTM = cell == "lstm_peephole"
    IS_CIFG = cell in ("cifg", "cifg_peephole")
    PEEP = cell in ("lstm_peephole", "cifg_peephole")
    G = {"lstm": 4, "lstm_peephole": 4, "gru": 3, "cifg": 3, "cifg_peephole": 3}.get(cell, 1)

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
                gates[t, b, u] = STORE(i)
                gates[t, b, H + u] = STORE(f)
                gates[t, b, 2 * H + u] = STORE(gg)
                gates[t, b, 3 * H + u] = STORE(o)
            c_in = c[t_in, b, u]
            c_out = c_in
            h_out = h_in
            if active:
                c_out = f * c_in + i * gg
                h_out = o * math.tanh(c_out)
            c[t_out, b, u] = c_out
        elif IS_PEEP_LSTM:
            c_in = c[t_in, b, u]
            i = HALF * math.tanh(HALF * (gx[t, b, u] + r0 + b_rec[u] * c_in)) + HALF
            f = HALF * math.tanh(HALF * (gx[t, b, H + u] + r1 + b_rec[H + u] * c_in)) + HALF
            gg = math.tanh(gx[t, b, 2 * H + u] + r2)
            c_new = f * c_in + i * gg
            a_o = gx[t, b, 3 * H + u] + r3 + b_rec[2 * H + u] * c_new
            o = HALF * math.tanh(HALF * a_o) + HALF
            if save_gates:
                gates[t, b, u] = STORE(i)
                gates[t, b, H + u] = STORE(f)
                gates[t, b, 2 * H + u] = STORE(gg)
                gates[t, b, 3 * H + u] = STORE(o)
            c_out = c_in
            h_out = h_in
            if active:
                c_out = c_new
                h_out = o * math.tanh(c_new)
            c[t_out, b, u] = c_out
        elif IS_CIFG:
            c_in = c[t_in, b, u]
            a_i = gx[t, b, u] + r0
            a_o = gx[t, b, 2 * H + u] + r2
            if PEEP:
                a_i += b_rec[u] * c_in
            i = HALF * math.tanh(HALF * a_i) + HALF
            gg = math.tanh(gx[t, b, H + u] + r1)
            c_new = c_in + i * (gg - c_in)          # (1 - i)*c_in + i*g
            if PEEP:
                a_o += b_rec[H + u] * c_new
            o = HALF * math.tanh(HALF * a_o) + HALF
            if save_gates:
                gates[t, b, u] = STORE(i)
                gates[t, b, H + u] = STORE(gg)
                gates[t, b, 2 * H + u] = STORE(o)
            c_out = c_in
            h_out = h_in
            if active:
                c_out = c_new
                h_out = o * math.tanh(c_new)
            c[t_out, b, u] = c_out
        elif IS_GRU:
            r = HALF * math.tanh(HALF * (gx[t, b, u] + r0)) + HALF
            z = HALF * math.tanh(HALF * (gx[t, b, H + u] + r1)) + HALF
            hn = r2 + b_rec[2 * H + u]
            n = math.tanh(gx[t, b, 2 * H + u] + r * hn)
            if save_gates:
                gates[t, b, u] = STORE(r)
                gates[t, b, H + u] = STORE(z)
                gates[t, b, 2 * H + u] = STORE(n)
                gates[t, b, 3 * H + u] = STORE(hn)
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
        h[t_out, b, u] = STORE(h_out)
        y[t, b, u] = STORE(h_out if active else ZERO)

    @cuda.jit(device=True, inline=True)
    def bwd_unit(b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out,
                 b, u, dh):
        H = h.shape[2]
        if t >= lengths[b]:
            # masked step: the state was copied through, y was a constant 0
            dh_carry[b, u] = dh
            for g in range(G):
                dgh[t, b, g * H + u] = ZERO
                if IS_GRU:
                    dgx[t, b, g * H + u] = ZERO
            return
        dh += LOAD(dy[t, b, u])
        if IS_LSTM:
            i = LOAD(gates[t, b, u])
            f = LOAD(gates[t, b, H + u])
            gg = LOAD(gates[t, b, 2 * H + u])
            o = LOAD(gates[t, b, 3 * H + u])
            tanh_c = math.tanh(c[t_out, b, u])
            dc = dc_carry[b, u] + dh * o * (ONE - tanh_c * tanh_c)
            dgh[t, b, u] = dc * gg * (i * (ONE - i))
            dgh[t, b, H + u] = dc * c[t_in, b, u] * (f * (ONE - f))
            dgh[t, b, 2 * H + u] = dc * i * (ONE - gg * gg)
            dgh[t, b, 3 * H + u] = dh * tanh_c * (o * (ONE - o))
            dc_carry[b, u] = dc * f
            dh_carry[b, u] = ZERO
        elif IS_PEEP_LSTM:
            i = LOAD(gates[t, b, u])
            f = LOAD(gates[t, b, H + u])
            gg = LOAD(gates[t, b, 2 * H + u])
            o = LOAD(gates[t, b, 3 * H + u])
            c_in = c[t_in, b, u]
            tanh_c = math.tanh(c[t_out, b, u])
            da_o = dh * tanh_c * (o * (ONE - o))
            dc = dc_carry[b, u] + dh * o * (ONE - tanh_c * tanh_c) + da_o * b_rec[2 * H + u]
            da_i = dc * gg * (i * (ONE - i))
            da_f = dc * c_in * (f * (ONE - f))
            dgh[t, b, u] = da_i
            dgh[t, b, H + u] = da_f
            dgh[t, b, 2 * H + u] = dc * i * (ONE - gg * gg)
            dgh[t, b, 3 * H + u] = da_o
            dc_carry[b, u] = dc * f + da_i * b_rec[u] + da_f * b_rec[H + u]
            dh_carry[b, u] = ZERO
        elif IS_CIFG:
            i = LOAD(gates[t, b, u])
            gg = LOAD(gates[t, b, H + u])
            o = LOAD(gates[t, b, 2 * H + u])
            c_in = c[t_in, b, u]
            tanh_c = math.tanh(c[t_out, b, u])
            da_o = dh * tanh_c * (o * (ONE - o))
            dc = dc_carry[b, u] + dh * o * (ONE - tanh_c * tanh_c)
            if PEEP:
                dc += da_o * b_rec[H + u]
            da_i = dc * (gg - c_in) * (i * (ONE - i))
            dgh[t, b, u] = da_i
            dgh[t, b, H + u] = dc * i * (ONE - gg * gg)
            dgh[t, b, 2 * H + u] = da_o
            dc_in = dc * (ONE - i)
            if PEEP:
                dc_in += da_i * b_rec[u]
            dc_carry[b, u] = dc_in
            dh_carry[b, u] = ZERO
        elif IS_GRU:
            r = LOAD(gates[t, b, u])
            z = LOAD(gates[t, b, H + u])
            n = LOAD(gates[t, b, 2 * H + u])
            hn = LOAD(gates[t, b, 3 * H + u])
            dan = dh * (ONE - z) * (ONE - n * n)
            daz = dh * (LOAD(h[t_in, b, u]) - n) * (z * (ONE - z))
            dar = dan * hn * (r * (ONE - r))
            dgx[t, b, u] = dar
            dgx[t, b, H + u] = daz
            dgx[t, b, 2 * H + u] = dan
            dgh[t, b, u] = dar
            dgh[t, b, H + u] = daz
            dgh[t, b, 2 * H + u] = dan * r          # the recurrent side of n is r * hn
            dh_carry[b, u] = dh * z
        else:
            h_out = LOAD(h[t_out, b, u])
            if IS_RELU:
                da = dh if h_out > ZERO else ZERO
            else:
                da = dh * (ONE - h_out * h_out)
            dgh[t, b, u] = da
            dh_carry[b, u] = ZERO

    return fwd_unit, bwd_unit
