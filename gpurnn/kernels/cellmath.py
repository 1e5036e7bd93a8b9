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
# the regularised kernels' flags (which masks are on) and cells live in gpurnn.kernels.layout,
# which the host reads without importing numba.cuda
from .layout import NOISE_REC, NOISE_ZC, NOISE_ZH, REGULARISED_CELLS, noise_flags  # noqa: F401

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
def make(cell: str, dtype: str, regularised: bool = False):
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

    regularised=True (REGULARISED_CELLS only): the same two with three more arguments,
    fwd_unit(..., save_gates, zh, zc, noise) and bwd_unit(..., dh, zh, zc, noise): zh, zc
    (T, B, H) the zoneout masks d_h, d_c (compute dtype), noise the NOISE_* bits saying which
    are on (an absent one is a placeholder, never read). On an active step, with c~, h~ the
    cell's own new values, c_t = d_c*c_{t-1} + (1-d_c)*c~ and h_t = d_h*h_{t-1} + (1-d_h)*h~
    (LSTM: h~ = o*tanh(c~)); the backward splits dL/dh_t (dL/dc_t) into d*(.) carried to the
    previous state and (1-d)*(.) into the cell, recomputing LSTM's c~ = f*c_{t-1} + i*g from
    the gates and an RNN's h~ = (h_t - d*h_{t-1}) / (1-d) (the NumPy reference's recovery).
    Variational recurrent dropout is the callers': it only touches the recurrent product
    (the staged h forward, dh_rec backward), never h_in here. Without `regularised` the
    plain functions are these with noise = 0 fixed at compile time: nothing of it is left.

    The variants (gpurnn.variants), per unit, a_* the pre-activations (gx + recurrent part):
      peephole  i = sig(a_i + w_ci*c_in), f = sig(a_f + w_cf*c_in), g = tanh(a_g),
                c_new = f*c_in + i*g, o = sig(a_o + w_co*c_new), h = o*tanh(c_new)
      cifg      as lstm with f = 1 - i (gates [i, g, o]; with peephole no w_cf)
    On a masked step the gates are still formed (o from c_new, the step's would-be cell) and
    saved, but c and h copy through. Backward, dc = dc_carry + dh*o*(1 - tanh^2) + dpre_o*w_co;
    dc_carry <- dc*f + dpre_i*w_ci + dpre_f*w_cf (cifg: f = 1-i, and dpre_i = dc*(g - c_in)*
    i*(1-i)). The peephole weights' own gradients are the host's (from dgh and c).
    """
    if regularised and cell not in REGULARISED_CELLS:
        raise ValueError(f"no regularised kernels for cell {cell!r}; they exist for "
                         f"{REGULARISED_CELLS}")
    fwd_reg, bwd_reg = units(cell, dtype)[:2]
    if regularised:
        return fwd_reg, bwd_reg
    NOISE_OFF = 0

    # the plain cell: the same math with every mask off, fixed at compile time (c stands in
    # for the masks; with noise = 0 it is never read)
    @cuda.jit(device=True, inline=True)
    def fwd_unit(gx, b_rec, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3, h_in,
                 save_gates):
        fwd_reg(gx, b_rec, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3, h_in,
                save_gates, c, c, NOISE_OFF)

    @cuda.jit(device=True, inline=True)
    def bwd_unit(b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out,
                 b, u, dh):
        bwd_reg(b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out, b,
                u, dh, c, c, NOISE_OFF)

    return fwd_unit, bwd_unit


@functools.lru_cache(maxsize=None)
def make_stacked(cell: str, dtype: str):
    """(fwd_unit, bwd_unit) of make(cell, dtype) for a kernel whose b_rec stacks several
    layers' (the layer wavefront, gpurnn.kernels.wavefront): each takes one more argument after
    b_rec, rb, where the layer's b_rec starts; the math is make()'s, index for index."""
    _, _, fwd_at, bwd_at = units(cell, dtype)
    NOISE_OFF = 0

    @cuda.jit(device=True, inline=True)
    def fwd_unit(gx, b_rec, rb, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3,
                 h_in, save_gates):
        fwd_at(gx, b_rec, rb, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3,
               h_in, save_gates, c, c, NOISE_OFF)

    @cuda.jit(device=True, inline=True)
    def bwd_unit(b_rec, rb, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in,
                 t_out, b, u, dh):
        bwd_at(b_rec, rb, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out,
               b, u, dh, c, c, NOISE_OFF)

    return fwd_unit, bwd_unit


@functools.lru_cache(maxsize=None)
def units(cell: str, dtype: str):
    """(fwd_reg, bwd_reg, fwd_at, bwd_at): make()'s functions with the three noise arguments,
    for any kernel cell (the kernels' shared bodies call these; the LSTM variants always with
    noise = 0). fwd_at / bwd_at take one more argument after b_rec, rb: where the unit's
    b_rec starts in a b_rec that stacks several layers' (the layer wavefront's); fwd_reg and
    bwd_reg are them with rb = 0."""
    DT = NP_COMPUTE[dtype]
    LOAD, STORE = codec(dtype)
    ZERO, HALF, ONE = DT(0), DT(0.5), DT(1)
    IS_LSTM, IS_GRU, IS_RELU = cell == "lstm", cell == "gru", cell == "rnn_relu"
    IS_PEEP_LSTM = cell == "lstm_peephole"
    IS_CIFG = cell in ("cifg", "cifg_peephole")
    PEEP = cell in ("lstm_peephole", "cifg_peephole")
    G = {"lstm": 4, "lstm_peephole": 4, "gru": 3, "cifg": 3, "cifg_peephole": 3}.get(cell, 1)

    @cuda.jit(device=True, inline=True)
    def fwd_at(gx, b_rec, rb, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3,
               h_in, save_gates, zh, zc, noise):
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
                if noise & NOISE_ZC:
                    d = zc[t, b, u]
                    c_out = (ONE - d) * c_out + d * c_in
            c[t_out, b, u] = c_out
        elif IS_PEEP_LSTM:
            c_in = c[t_in, b, u]
            i = HALF * math.tanh(HALF * (gx[t, b, u] + r0 + b_rec[rb + u] * c_in)) + HALF
            f = HALF * math.tanh(HALF * (gx[t, b, H + u] + r1 + b_rec[rb + H + u] * c_in)) + HALF
            gg = math.tanh(gx[t, b, 2 * H + u] + r2)
            c_new = f * c_in + i * gg
            a_o = gx[t, b, 3 * H + u] + r3 + b_rec[rb + 2 * H + u] * c_new
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
                a_i += b_rec[rb + u] * c_in
            i = HALF * math.tanh(HALF * a_i) + HALF
            gg = math.tanh(gx[t, b, H + u] + r1)
            c_new = c_in + i * (gg - c_in)          # (1 - i)*c_in + i*g
            if PEEP:
                a_o += b_rec[rb + H + u] * c_new
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
            hn = r2 + b_rec[rb + 2 * H + u]
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
        if noise & NOISE_ZH:
            if active:
                d = zh[t, b, u]
                h_out = (ONE - d) * h_out + d * h_in
        h[t_out, b, u] = STORE(h_out)
        y[t, b, u] = STORE(h_out if active else ZERO)

    @cuda.jit(device=True, inline=True)
    def bwd_at(b_rec, rb, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in,
               t_out, b, u, dh, zh, zc, noise):
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
        # zoneout: d*dL/dh_t goes straight to h_{t-1} (held), (1-d)*dL/dh_t into the cell
        held = ZERO
        if noise & NOISE_ZH:
            d = zh[t, b, u]
            held = d * dh
            dh = (ONE - d) * dh
        if IS_LSTM:
            i = LOAD(gates[t, b, u])
            f = LOAD(gates[t, b, H + u])
            gg = LOAD(gates[t, b, 2 * H + u])
            o = LOAD(gates[t, b, 3 * H + u])
            held_c = ZERO
            if noise & NOISE_ZC:
                # c[t_out] is c_t after zoneout: the cell's own c~ from its gates and c_{t-1};
                # d_c*dL/dc_t goes straight to c_{t-1}, (1-d_c)*dL/dc_t into c~
                tanh_c = math.tanh(f * c[t_in, b, u] + i * gg)
                d_c = zc[t, b, u]
                dC = dc_carry[b, u]
                held_c = d_c * dC
                dc = (ONE - d_c) * dC + dh * o * (ONE - tanh_c * tanh_c)
            else:
                tanh_c = math.tanh(c[t_out, b, u])
                dc = dc_carry[b, u] + dh * o * (ONE - tanh_c * tanh_c)
            dgh[t, b, u] = dc * gg * (i * (ONE - i))
            dgh[t, b, H + u] = dc * c[t_in, b, u] * (f * (ONE - f))
            dgh[t, b, 2 * H + u] = dc * i * (ONE - gg * gg)
            dgh[t, b, 3 * H + u] = dh * tanh_c * (o * (ONE - o))
            if noise & NOISE_ZC:
                dc_carry[b, u] = dc * f + held_c
            else:
                dc_carry[b, u] = dc * f
            dh_carry[b, u] = held
        elif IS_PEEP_LSTM:
            i = LOAD(gates[t, b, u])
            f = LOAD(gates[t, b, H + u])
            gg = LOAD(gates[t, b, 2 * H + u])
            o = LOAD(gates[t, b, 3 * H + u])
            c_in = c[t_in, b, u]
            tanh_c = math.tanh(c[t_out, b, u])
            da_o = dh * tanh_c * (o * (ONE - o))
            dc = dc_carry[b, u] + dh * o * (ONE - tanh_c * tanh_c) + da_o * b_rec[rb + 2 * H + u]
            da_i = dc * gg * (i * (ONE - i))
            da_f = dc * c_in * (f * (ONE - f))
            dgh[t, b, u] = da_i
            dgh[t, b, H + u] = da_f
            dgh[t, b, 2 * H + u] = dc * i * (ONE - gg * gg)
            dgh[t, b, 3 * H + u] = da_o
            dc_carry[b, u] = dc * f + da_i * b_rec[rb + u] + da_f * b_rec[rb + H + u]
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
                dc += da_o * b_rec[rb + H + u]
            da_i = dc * (gg - c_in) * (i * (ONE - i))
            dgh[t, b, u] = da_i
            dgh[t, b, H + u] = dc * i * (ONE - gg * gg)
            dgh[t, b, 2 * H + u] = da_o
            dc_in = dc * (ONE - i)
            if PEEP:
                dc_in += da_i * b_rec[rb + u]
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
            if noise & NOISE_ZH:
                dh_carry[b, u] = dh * z + held
            else:
                dh_carry[b, u] = dh * z
        else:
            h_out = LOAD(h[t_out, b, u])
            if noise & NOISE_ZH:
                # h~ from h_t = d*h_{t-1} + (1-d)*h~ (exact for d = 0; unused for d = 1)
                d = zh[t, b, u]
                keep = ONE - d
                h_out = (h_out - d * LOAD(h[t_in, b, u])) / (keep if keep != ZERO else ONE)
            if IS_RELU:
                da = dh if h_out > ZERO else ZERO
            else:
                da = dh * (ONE - h_out * h_out)
            dgh[t, b, u] = da
            dh_carry[b, u] = held

    @cuda.jit(device=True, inline=True)
    def fwd_reg(gx, b_rec, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3, h_in,
                save_gates, zh, zc, noise):
        fwd_at(gx, b_rec, 0, h, c, gates, y, lengths, t, t_in, t_out, b, u, r0, r1, r2, r3,
               h_in, save_gates, zh, zc, noise)

    @cuda.jit(device=True, inline=True)
    def bwd_reg(b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out,
                b, u, dh, zh, zc, noise):
        bwd_at(b_rec, 0, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, t, t_in, t_out,
               b, u, dh, zh, zc, noise)

    return fwd_reg, bwd_reg, fwd_at, bwd_at


# ---------------------------------------------------------------- LayerNormLSTM
# The LayerNormLSTM's per-unit math (gpurnn/layernorm.py is the contract; the kernels are
# gpurnn/kernels/layernorm.py), shared by its persistent and pointwise kernels. This section
# only adds functions; nothing above uses it. `noise` is a bit mask: LN_REC (variational
# recurrent dropout, applied by the callers to the staged h), LN_ZH, LN_ZC (zoneout of h, c).
LN_REC, LN_ZH, LN_ZC = 1, 2, 4


@functools.lru_cache(maxsize=None)
def make_layernorm(dtype: str):
    """(gates_unit, out_unit, bwd_c_unit, bwd_gates_unit, stage_da) for dtype (float32/64).

    gates_unit(gx, lnp, ah, hhat, gates, c, ctil, zone, lengths, t, ta, ts, t_in, t_out, b,
               u, mean_h, rstd_h, noise, save) -> c~
        hhat_g = (ah[ta, b, g*H+u] - mean_h) * rstd_h (stored at hhat[ts] when save);
        z_g = gx[t, b, g*H+u] + lnp[0, g*H+u] * hhat_g + lnp[1, g*H+u]; writes the activated
        gates at gates[ts], c~ = f*c_in + i*g at ctil[b, u] and c[t_out, b, u] (zoneout_c
        applied; c_in on a masked step).
    out_unit(gates, ctil, h, lnp, zone, lengths, t, ts, t_in, b, u, mean_c, rstd_c, noise) -> h_t
        o * tanh(g_c[u] * (c~ - mean_c) * rstd_c + b_c[u]) with zoneout_h; h_in on a masked
        step. Writes nothing.
    bwd_c_unit(gates, c, stats, lnp, zone, dy, dh_carry, dz, dl, lengths, t, t_in, b, u, dH,
               noise) -> (dchat, chat): dH = dL/dh_t without dy (added here on an active
        step); writes dz[t, b, 3H+u] (o), dl[t, b, u] = dL/dLN(c~)
        and dh_carry[b, u] (the direct part: zoneout's d_h*dH, all of dH on a masked step).
    bwd_gates_unit(gates, c, stats, lnp, zone, hhat, dz, dchat, dc_carry, lengths, t, t_in, b,
                   u, m1, m2, noise) -> (sum_g dhhat_g, sum_g dhhat_g * hhat_g)
        the c-side LN backward dc~ = rstd_c * (dchat - m1 - chat*m2) (m1, m2: the row means of
        dchat and dchat*chat over H) plus the carried dc; writes dz[t, b, g*H+u] of i, f, g
        (o read back), dc_carry[b, u]; dhhat = lnp[0] * dz.
    stage_da(dz, hhat, lnp, stats, lengths, t, b, f, m1, m2) -> dL/d(h W_hh^T)[b, f]
        rstd_h * (lnp[0,f]*dz - m1 - hhat*m2) (m1, m2: the row means over 4H); 0 if masked.
    """
    DT = NP_COMPUTE[dtype]
    ZERO, HALF, ONE = DT(0), DT(0.5), DT(1)

    @cuda.jit(device=True, inline=True)
    def gates_unit(gx, lnp, ah, hhat, gates, c, ctil, zone, lengths, t, ta, ts, t_in, t_out, b,
                   u, mean_h, rstd_h, noise, save):
        H = c.shape[2]
        n0 = (ah[ta, b, u] - mean_h) * rstd_h
        n1 = (ah[ta, b, H + u] - mean_h) * rstd_h
        n2 = (ah[ta, b, 2 * H + u] - mean_h) * rstd_h
        n3 = (ah[ta, b, 3 * H + u] - mean_h) * rstd_h
        if save:
            hhat[ts, b, u] = n0
            hhat[ts, b, H + u] = n1
            hhat[ts, b, 2 * H + u] = n2
            hhat[ts, b, 3 * H + u] = n3
        z0 = gx[t, b, u] + lnp[0, u] * n0 + lnp[1, u]
        z1 = gx[t, b, H + u] + lnp[0, H + u] * n1 + lnp[1, H + u]
        z2 = gx[t, b, 2 * H + u] + lnp[0, 2 * H + u] * n2 + lnp[1, 2 * H + u]
        z3 = gx[t, b, 3 * H + u] + lnp[0, 3 * H + u] * n3 + lnp[1, 3 * H + u]
        i = HALF * math.tanh(HALF * z0) + HALF
        f = HALF * math.tanh(HALF * z1) + HALF
        gg = math.tanh(z2)
        o = HALF * math.tanh(HALF * z3) + HALF
        gates[ts, b, u] = i
        gates[ts, b, H + u] = f
        gates[ts, b, 2 * H + u] = gg
        gates[ts, b, 3 * H + u] = o
        c_in = c[t_in, b, u]
        ct = f * c_in + i * gg
        ctil[b, u] = ct
        c_out = c_in
        if t < lengths[b]:
            c_out = ct
            if noise & LN_ZC:
                d = zone[1, t, b, u]
                c_out = d * c_in + (ONE - d) * ct
        c[t_out, b, u] = c_out
        return ct

    @cuda.jit(device=True, inline=True)
    def out_unit(gates, ctil, h, lnp, zone, lengths, t, ts, t_in, b, u, mean_c, rstd_c, noise):
        H = h.shape[2]
        h_in = h[t_in, b, u]
        if t >= lengths[b]:
            return h_in
        v = lnp[0, 4 * H + u] * ((ctil[b, u] - mean_c) * rstd_c) + lnp[1, 4 * H + u]
        hn = gates[ts, b, 3 * H + u] * math.tanh(v)
        if noise & LN_ZH:
            d = zone[0, t, b, u]
            hn = d * h_in + (ONE - d) * hn
        return hn

    @cuda.jit(device=True, inline=True)
    def bwd_c_unit(gates, c, stats, lnp, zone, dy, dh_carry, dz, dl, lengths, t, t_in, b, u, dH,
                   noise):
        H = c.shape[2]
        if t >= lengths[b]:
            dh_carry[b, u] = dH
            dz[t, b, 3 * H + u] = ZERO
            dl[t, b, u] = ZERO
            return ZERO, ZERO
        dH += dy[t, b, u]
        i = gates[t, b, u]
        f = gates[t, b, H + u]
        gg = gates[t, b, 2 * H + u]
        o = gates[t, b, 3 * H + u]
        chat = (f * c[t_in, b, u] + i * gg - stats[t, b, 4]) * stats[t, b, 5]
        th = math.tanh(lnp[0, 4 * H + u] * chat + lnp[1, 4 * H + u])
        dhn = dH
        direct = ZERO
        if noise & LN_ZH:
            d = zone[0, t, b, u]
            dhn = (ONE - d) * dH
            direct = d * dH
        dh_carry[b, u] = direct
        dz[t, b, 3 * H + u] = dhn * th * (o * (ONE - o))
        dlv = dhn * o * (ONE - th * th)
        dl[t, b, u] = dlv
        return dlv * lnp[0, 4 * H + u], chat

    @cuda.jit(device=True, inline=True)
    def bwd_gates_unit(gates, c, stats, lnp, zone, hhat, dz, dchat, dc_carry, lengths, t, t_in, b,
                       u, m1, m2, noise):
        H = c.shape[2]
        if t >= lengths[b]:
            dz[t, b, u] = ZERO
            dz[t, b, H + u] = ZERO
            dz[t, b, 2 * H + u] = ZERO
            return ZERO, ZERO
        i = gates[t, b, u]
        f = gates[t, b, H + u]
        gg = gates[t, b, 2 * H + u]
        c_in = c[t_in, b, u]
        rstd_c = stats[t, b, 5]
        chat = (f * c_in + i * gg - stats[t, b, 4]) * rstd_c
        dC = dc_carry[b, u]
        dct = rstd_c * (dchat[b, u] - m1 - chat * m2)
        if noise & LN_ZC:
            d = zone[1, t, b, u]
            dct += (ONE - d) * dC
            dc_carry[b, u] = d * dC + f * dct
        else:
            dct += dC
            dc_carry[b, u] = f * dct
        d0 = dct * gg * (i * (ONE - i))
        d1 = dct * c_in * (f * (ONE - f))
        d2 = dct * i * (ONE - gg * gg)
        d3 = dz[t, b, 3 * H + u]
        dz[t, b, u] = d0
        dz[t, b, H + u] = d1
        dz[t, b, 2 * H + u] = d2
        e0 = lnp[0, u] * d0
        e1 = lnp[0, H + u] * d1
        e2 = lnp[0, 2 * H + u] * d2
        e3 = lnp[0, 3 * H + u] * d3
        s2 = (e0 * hhat[t, b, u] + e1 * hhat[t, b, H + u] + e2 * hhat[t, b, 2 * H + u]
              + e3 * hhat[t, b, 3 * H + u])
        return e0 + e1 + e2 + e3, s2

    @cuda.jit(device=True, inline=True)
    def stage_da(dz, hhat, lnp, stats, lengths, t, b, f, m1, m2):
        if t >= lengths[b]:
            return ZERO
        return stats[t, b, 3] * (lnp[0, f] * dz[t, b, f] - m1 - hhat[t, b, f] * m2)

    return gates_unit, out_unit, bwd_c_unit, bwd_gates_unit, stage_da
