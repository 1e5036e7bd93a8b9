"""The gated-feedback RNN's kernels (math, parameters, saved layout: gpurnn/feedback.py; host
side gpurnn/backends/cuda_feedback.py; plan gpurnn/planning/feedback.py). One persistent launch
runs the WHOLE stack of L layers, every step, forward or backward.

Ownership: block p of P owns the unit slice U_p = [p*U, min((p+1)*U, H)), U = ceil(H/P), of
EVERY layer (as source and as target); a block past H owns none and only joins the barriers.
Gate rows of weight_gh (L*L of them, r = j*L + i: u_g^{i->j}) go round-robin: row r to block
r % P (NG = ceil(L*L/P) rows per block). One thread per output, strided over the block; the
dot products read their weights from shared memory (loaded once per launch, rows padded to
layout.padded_row(., 1) so consecutive rows fall in distinct banks) and their activations from
global memory (L2), unstaged.

Forward, per step: phase 0, then the layers 1..L, each phase behind a GRID barrier:
  phase 0    everything that reads h*_{t-1} (every layer's previous state): for each target
             layer j, source i and own unit u the feedback partial pfb[j, i, b, u] =
             U^{i->j}[u, :] . h^i_{t-1}; each layer's own recurrent rows rec[j, b, q*H + u] =
             W_hh^j[q*H + u, :] . h^j_{t-1}; the owned gate rows sh[b, r] = u_g^r . h*_{t-1}
             -> grid barrier (every layer phase reads all of sh)
  layer j    its input x_j = h_t^{j-1} * mask (j > 1; the host's x W_ih^T, x W_gx^T for j = 1):
             in one pass every block forms all L reset gates g^{i->j} of every row into shared
             memory (redundantly: B*L dot products of length H, cheaper than a barrier) and
             the G input pre-activations of its units (W_ih^j rows of U_p) into the buffer gxl
             (a thread per output, not per unit: ~30 fewer registers on sm_80) -> block
             barrier -> one thread per (b, own u): fb = sum_i g^{i->j} pfb[j, i, b, u], the
             cell update -> grid barrier (layer j+1 needs all of h_t^j; after the last layer,
             the next step's phase 0 needs h*_t)
  So a step costs 1 + L grid barriers (the phase-0 barrier, because every gate needs every
  block's sh, and one per layer, because layer j+1 reads all of h_t^j), T*(1+L) - 1 a launch.
Backward (BPTT, the mirror), per step t from T-1 down: the layers L..1, then phase Z:
  layer l    (l < L) every block forms ds_{l+1}[b, i] = g(1-g) sum_u dfb_{l+1}[b, u]
             pfb[l+1, i, t, b, u] (the host's pfb of the saved h) into shared memory, block 0
             writes it out -> block barrier -> one thread per (b, own u): dh = carry + (dy, top
             layer) + (d_in * mask, d_in = dgx_{l+1} W_ih^{l+1}[:, u] + ds_{l+1} W_gx^{l+1}[:, u],
             columns of U_p), the cell backward -> dgx[l, t], dfb[l, t], dc carry, and the
             direct part of dL/dh_{t-1}^l (GRU dh*z) into carry_h -> grid barrier (layer l-1
             reads every unit's dgx and dfb of layer l)
  phase Z    ds_1 as above -> block barrier -> one thread per (b, source layer i, own k):
             carry_h[b, iH+k] += sum_j g^{i->j} dfb_j W_fb^j[:, iH+k] + sum_j ds_j
             W_gh^j[:, iH+k] + dgx_i(rec rows) W_hh^i[:, k] -> block barrier (the next step's
             layers read carry_h of the block's units, written by other threads of the block)
  So a step costs L grid barriers (phase Z needs every layer's dgx, dfb and ds, which the
  barrier after layer 1 provides; nothing of phase Z is read by another block before the next
  grid barrier: every array it reads is indexed by t), T*L a launch.
Block barriers: forward one after the weights load (phase 0 reads them at once) and one per
layer phase (the reset gates and gxl); backward one per phase but the top layer's (ds) and one
after phase Z, and one after its weight load that only fences the compiler (no phase reads the
columns before its ds barrier; without it, sm_80 needs 232 registers). tests/test_sim_feedback.py
deletes each barrier in turn (the fence: the static compile's register check catches it).
Padded steps (t >= lengths[b]): forward copies h (and c) through but still saves the gates and
reset gates (the reference's values on the zeroed input); backward writes exact zeros for the
step's gate gradients and leaves the carries alone.
Shared memory (compute dtype, elements; S(n) = layout.padded_row(n, 1)): forward W_fb rows
L*U*S(LH) | W_hh rows L*HH*U*S(H) | W_ih rows of layers > 1 (L-1)*G*U*S(H) | W_gx of layers > 1,
whole, (L-1)*L*S(H) | owned W_gh rows NG*S(LH) | reset gates B*L. Backward W_fb columns
L*L*U*S(H) | W_gh columns L*L*U*L | W_hh columns L*U*S(HH*H) | W_ih columns of layers > 1
(L-1)*U*S(G*H) | W_gx columns (L-1)*U*L | ds B*L. (smem_elements below, the plan's model.)
Stepwise path: the host's GEMMs per step and layer plus the pointwise kernels below, which run
the same cell math (one place for it: `cell_math`).
"""
from __future__ import annotations

import functools
import math

from numba import cuda, int32, void

from .cellmath import NUMBA_COMPUTE
from .dtypes import NP_COMPUTE, SHORT
from .layout import KernelSpec, padded_row
from .persistent import _grid_group_sync, _owned_units, _padded_row, _this_grid

CELLS = ("gf_rnn_tanh", "gf_rnn_relu", "gf_gru", "gf_lstm")
DTYPES = ("float32", "float64")
KINDS = ("persistent_fwd", "persistent_bwd", "pointwise_fwd", "pointwise_bwd")
GATES = {"gf_rnn_tanh": 1, "gf_rnn_relu": 1, "gf_gru": 3, "gf_lstm": 4}
HH_GATES = {"gf_rnn_tanh": 0, "gf_rnn_relu": 0, "gf_gru": 2, "gf_lstm": 3}
SAVED_GATES = {"gf_rnn_tanh": 0, "gf_rnn_relu": 0, "gf_gru": 4, "gf_lstm": 4}
CELL_ID = {"gf_rnn_tanh": 0, "gf_rnn_relu": 1, "gf_gru": 2, "gf_lstm": 3}


def gate_rows(num_layers: int, blocks: int) -> int:
    """NG: the weight_gh rows (of L*L) a block owns, row r going to block r % P."""
    return -(-num_layers * num_layers // blocks)


def smem_elements(direction, cell, hidden, num_layers, batch, units, blocks):
    """Elements of dynamic shared memory (compute dtype) one persistent block is launched with."""
    G, HH, H, L, U = GATES[cell], HH_GATES[cell], hidden, num_layers, units
    sh, slh = padded_row(H, 1), padded_row(L * H, 1)
    if direction == "fwd":
        return (L * U * slh + L * HH * U * sh + (L - 1) * G * U * sh + (L - 1) * L * sh
                + gate_rows(L, blocks) * slh + batch * L)
    if direction == "bwd":
        return (L * L * U * sh + L * L * U * L + L * U * padded_row(HH * H, 1)
                + (L - 1) * U * padded_row(G * H, 1) + (L - 1) * U * L + batch * L)
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


def smem_bytes(direction, cell, hidden, num_layers, batch, units, blocks, dtype):
    return smem_elements(direction, cell, hidden, num_layers, batch, units,
                         blocks) * NP_COMPUTE[dtype](0).itemsize


@functools.lru_cache(maxsize=None)
def cell_math(cell: str, dtype: str):
    """(fwd, bwd) device functions of one unit of one layer.
    fwd(a0, a1, a2, a3, fb, r0, r1, r2, bhn, h_in, c_in) -> (h, c, s0, s1, s2, s3)
        a*: the input-side pre-activations (bias folded; GRU's n without b_hn), fb the gated
        feedback, r*: the own-state rows (GRU r, z; LSTM i, f, o), s*: what is saved.
    bwd(dh, dc, s0, s1, s2, s3, h_in, c_in, c_out, h_out) -> (d0, d1, d2, d3, dfb, dh_direct,
        dc_prev): the pre-activation gradients of the G input rows, of fb, the direct part of
        dL/dh_in (GRU dh*z) and dL/dc_in."""
    DT = NP_COMPUTE[dtype]
    ZERO, ONE, HALF = DT(0), DT(1), DT(0.5)
    ID = CELL_ID[cell]

    @cuda.jit(device=True, inline=True)
    def sig(a):
        return HALF * math.tanh(HALF * a) + HALF

    @cuda.jit(device=True, inline=True)
    def fwd(a0, a1, a2, a3, fb, r0, r1, r2, bhn, h_in, c_in):
        if ID == 0:
            return math.tanh(a0 + fb), ZERO, ZERO, ZERO, ZERO, ZERO
        if ID == 1:
            v = a0 + fb
            return (v if v > ZERO else ZERO), ZERO, ZERO, ZERO, ZERO, ZERO
        if ID == 2:
            r = sig(a0 + r0)
            z = sig(a1 + r1)
            hn = fb + bhn
            n = math.tanh(r * hn + a2)
            return (h_in - n) * z + n, ZERO, r, z, n, hn
        i = sig(a0 + r0)
        f = sig(a1 + r1)
        g = math.tanh(a2 + fb)
        o = sig(a3 + r2)
        c = f * c_in + i * g
        return o * math.tanh(c), c, i, f, g, o

    @cuda.jit(device=True, inline=True)
    def bwd(dh, dc, s0, s1, s2, s3, h_in, c_in, c_out, h_out):
        if ID == 0:
            d = dh * (ONE - h_out * h_out)
            return d, ZERO, ZERO, ZERO, d, ZERO, ZERO
        if ID == 1:
            d = dh if h_out > ZERO else ZERO
            return d, ZERO, ZERO, ZERO, d, ZERO, ZERO
        if ID == 2:
            dan = dh * (ONE - s1) * (ONE - s2 * s2)
            dz = dh * (h_in - s2) * (s1 * (ONE - s1))
            dr = dan * s3 * (s0 * (ONE - s0))
            return dr, dz, dan, ZERO, dan * s0, dh * s1, ZERO
        tc = math.tanh(c_out)
        dct = dc + dh * s3 * (ONE - tc * tc)
        do = dh * tc * (s3 * (ONE - s3))
        di = dct * s2 * (s0 * (ONE - s0))
        df = dct * c_in * (s1 * (ONE - s1))
        dg = dct * s0 * (ONE - s2 * s2)
        return di, df, dg, do, dg, ZERO, dct * s1

    return fwd, bwd


@functools.lru_cache(maxsize=None)
def _unit_io(cell: str, dtype: str):
    """(update_fwd, update_bwd): one unit's update read from and written to the saved arrays."""
    fwd, bwd = cell_math(cell, dtype)
    ZERO = NP_COMPUTE[dtype](0)
    LSTM = cell == "gf_lstm"
    SG = SAVED_GATES[cell]
    G = GATES[cell]

    @cuda.jit(device=True, inline=True)
    def update_fwd(h, c, gates, lengths, t, b, col, gcol, a0, a1, a2, a3, fb, r0, r1, r2, bhn,
                   hidden, save):
        """col = layer*H + u in h/c; gcol = layer*4H + u in gates."""
        h_in = h[t, b, col]
        c_in = ZERO
        if LSTM:
            c_in = c[t, b, col]
        hv, cv, s0, s1, s2, s3 = fwd(a0, a1, a2, a3, fb, r0, r1, r2, bhn, h_in, c_in)
        active = t < lengths[b]
        h[t + 1, b, col] = hv if active else h_in
        if LSTM:
            c[t + 1, b, col] = cv if active else c_in
        if SG and save:
            gates[t, b, gcol] = s0
            gates[t, b, gcol + hidden] = s1
            gates[t, b, gcol + 2 * hidden] = s2
            gates[t, b, gcol + 3 * hidden] = s3

    @cuda.jit(device=True, inline=True)
    def update_bwd(h, c, gates, dgx, dfb, carry_c, lengths, t, b, layer, u, hidden, dh):
        """Writes dgx[layer, t, b, q*H + u], dfb[layer, t, b, u] (zeros on a padded step) and
        the LSTM's carry_c; returns the direct part of dL/dh_in (0 on a padded step: the
        caller keeps the carry there)."""
        col = layer * hidden + u
        if t >= lengths[b]:
            for q in range(G):
                dgx[layer, t, b, q * hidden + u] = ZERO
            dfb[layer, t, b, u] = ZERO
            return ZERO
        s0 = ZERO
        s1 = ZERO
        s2 = ZERO
        s3 = ZERO
        if SG:
            gcol = layer * 4 * hidden + u
            s0 = gates[t, b, gcol]
            s1 = gates[t, b, gcol + hidden]
            s2 = gates[t, b, gcol + 2 * hidden]
            s3 = gates[t, b, gcol + 3 * hidden]
        c_in = ZERO
        c_out = ZERO
        dc = ZERO
        if LSTM:
            c_in = c[t, b, col]
            c_out = c[t + 1, b, col]
            dc = carry_c[b, col]
        d0, d1, d2, d3, dfbv, direct, dc_prev = bwd(dh, dc, s0, s1, s2, s3, h[t, b, col], c_in,
                                                     c_out, h[t + 1, b, col])
        dgx[layer, t, b, u] = d0
        if G > 1:
            dgx[layer, t, b, hidden + u] = d1
            dgx[layer, t, b, 2 * hidden + u] = d2
        if G > 3:
            dgx[layer, t, b, 3 * hidden + u] = d3
        dfb[layer, t, b, u] = dfbv
        if LSTM:
            carry_c[b, col] = dc_prev
        return direct

    return update_fwd, update_bwd


# ---------------------------------------------------------------- the stepwise kernels

@functools.lru_cache(maxsize=None)
def make_pointwise_fwd(cell: str, dtype: str):
    """One layer of one step, one thread per (b, u).
      pre     (B, G*H)   input-side pre-activations with folded bias (GRU n: b_in only); read
      fb      (B, H)     the gated feedback (without b_hn); read
      rec     (B, R)     the own-state rows h_{t-1}^j W_hh^T (R = HH*H, or 1: unread); read
      bhn     (H,)       GRU's b_hn (zeros without bias; any cell reads it only if GRU)
      h, c    (T+1, B, L*H) written at [t+1, b, layer*H + u]; c a (1,1,1) placeholder but LSTM
      gates   (T, B, L*4H) written when save (GRU, LSTM); else a (1,1,1) placeholder
      lengths int32 (B,) ; t, layer, save: int32.  No shared memory, no barrier."""
    update_fwd, _ = _unit_io(cell, dtype)
    ZERO = NP_COMPUTE[dtype](0)
    G, HH, ID = GATES[cell], HH_GATES[cell], CELL_ID[cell]

    def kernel(pre, fb, rec, bhn, h, c, gates, lengths, t, layer, save):
        idx = cuda.grid(1)
        B = pre.shape[0]
        H = fb.shape[1]
        if idx < B * H:
            b = idx // H
            u = idx % H
            a1 = ZERO
            a2 = ZERO
            a3 = ZERO
            r0 = ZERO
            r1 = ZERO
            r2 = ZERO
            bh = ZERO
            a0 = pre[b, u]
            if G > 1:
                a1 = pre[b, H + u]
                a2 = pre[b, 2 * H + u]
            if G > 3:
                a3 = pre[b, 3 * H + u]
            if HH > 0:
                r0 = rec[b, u]
                r1 = rec[b, H + u]
            if HH > 2:
                r2 = rec[b, 2 * H + u]
            if ID == 2:
                bh = bhn[u]
            update_fwd(h, c, gates, lengths, t, b, layer * H + u, layer * 4 * H + u, a0, a1, a2,
                       a3, fb[b, u], r0, r1, r2, bh, H, save)

    kernel.__name__ = f"{cell}_pointwise_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_pointwise_bwd(cell: str, dtype: str):
    """One layer of one backward step, one thread per (b, u).
      h, c, gates         the saved arrays (c, gates placeholders where the cell has none); read
      dh      (B, H)      dL/dh_t^layer (carry + dy + d_in * mask, the host's); read
      dgx     (L, T, B, G*H), dfb (L, T, B, H): written at [layer, t, b, .]
      carry_c (B, L*H)    LSTM: dL/dc_t in, dL/dc_{t-1} out at layer's columns; else (1, 1)
      direct  (B, H)      written: the direct part of dL/dh_{t-1}^layer (0 on a padded row)
      lengths int32 (B,) ; t, layer: int32.  No shared memory, no barrier."""
    _, update_bwd = _unit_io(cell, dtype)

    def kernel(h, c, gates, dh, dgx, dfb, carry_c, direct, lengths, t, layer):
        idx = cuda.grid(1)
        B = dh.shape[0]
        H = dh.shape[1]
        if idx < B * H:
            b = idx // H
            u = idx % H
            direct[b, u] = update_bwd(h, c, gates, dgx, dfb, carry_c, lengths, t, b, layer, u, H,
                                      dh[b, u])

    kernel.__name__ = f"{cell}_pointwise_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


# ---------------------------------------------------------------- the persistent kernels

@functools.lru_cache(maxsize=None)
def make_fwd(cell: str, dtype: str):
    """The persistent forward of the whole stack (phases q in [q_begin, q_end) of [0, T*(L+1)):
    step q // (L+1), phase q % (L+1): 0 the h*_{t-1} products, j >= 1 layer j).

    Arguments (C-contiguous compute dtype, none aliasing another; LH = L*H, R = max(HH,1)*H,
    Lm = max(L-1, 1)):
      gx0     (T, B, G*H)  layer 1's x W_ih^T + folded bias (of x with padded steps zeroed)
      gs0     (T, B, L)    layer 1's x W_gx^T + bias_g
      w_ih    (Lm, G*H, H) weight_ih of layers 2..L (unread for L = 1)
      w_hh    (L, R, H)    weight_hh of every layer (unread for the RNN cells)
      w_fb    (L, H, LH)   weight_fb;  w_gx (Lm, L, H) weight_gx of layers 2..L;
      w_gh    (L, L, LH)   weight_gh
      b_in    (L, G*H)     folded input bias (row 0 unread); b_hn (L, H) GRU's b_hn;
      b_g     (L, L)       bias_g (row 0 unread); all zeros without bias
      masks   (Lm, T, B, H) dropout masks of layers 2..L's input when use_mask, else (1,1,1,1)
      h       (T+1, B, LH) h[0] the initial states on entry; written
      c       (T+1, B, LH) LSTM, c[0] on entry; written; else (1,1,1)
      gates   (T, B, L*4H) written when save (GRU, LSTM); else (1,1,1)
      fbgate  (T, B, L*L)  written when save; else (1,1,1)
      pfb     (L, L, B, H), rec (L, B, R), sh (B, L*L): buffers, written in phase 0, read after
      gxl     (B, G*H)     buffer: layer j > 1's input pre-activations (the block's units)
      lengths int32 (B,) ; q_begin, q_end, units, save, use_mask: int32
    Dynamic shared memory: smem_bytes('fwd', cell, H, L, B, units, P, dtype)."""
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    ZERO, HALF = DT(0), DT(0.5)
    G, HH, ID = GATES[cell], HH_GATES[cell], CELL_ID[cell]
    update_fwd, _ = _unit_io(cell, dtype)

    def kernel(gx0, gs0, w_ih, w_hh, w_fb, w_gx, w_gh, b_in, b_hn, b_g, masks, h, c, gates,
               fbgate, pfb, rec, sh, gxl, lengths, q_begin, q_end, units, save, use_mask):
        grid = _this_grid()
        wsm = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = gx0.shape[0]
        B = h.shape[1]
        L = w_fb.shape[0]
        H = w_fb.shape[1]
        LH = L * H
        P = cuda.gridDim.x
        blk = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        u0, nu = _owned_units(units, H)
        ng = (L * L + P - 1) // P
        own_rows = (L * L - blk + P - 1) // P         # rows r = blk, blk + P, ... < L*L
        s_h = _padded_row(H, 1)
        s_lh = _padded_row(LH, 1)
        off_hh = L * units * s_lh
        off_ih = off_hh + L * HH * units * s_h
        off_gx = off_ih + (L - 1) * G * units * s_h
        off_gh = off_gx + (L - 1) * L * s_h
        off_g = off_gh + ng * s_lh

        for idx in range(tid, L * nu * LH, stride):
            col = idx % LH
            row = idx // LH                   # j*nu + k
            k = row % nu
            j = row // nu
            wsm[(j * units + k) * s_lh + col] = w_fb[j, u0 + k, col]
        for idx in range(tid, L * HH * nu * H, stride):
            col = idx % H
            row = idx // H
            k = row % nu
            q = (row // nu) % HH
            j = row // (nu * HH)
            wsm[off_hh + ((j * HH + q) * units + k) * s_h + col] = w_hh[j, q * H + u0 + k, col]
        for idx in range(tid, (L - 1) * G * nu * H, stride):
            col = idx % H
            row = idx // H
            k = row % nu
            q = (row // nu) % G
            j = row // (nu * G)               # layer j + 1
            wsm[off_ih + ((j * G + q) * units + k) * s_h + col] = w_ih[j, q * H + u0 + k, col]
        for idx in range(tid, (L - 1) * L * H, stride):
            col = idx % H
            row = idx // H
            wsm[off_gx + row * s_h + col] = w_gx[row // L, row % L, col]
        for idx in range(tid, own_rows * LH, stride):
            col = idx % LH
            m = idx // LH
            r = blk + m * P
            wsm[off_gh + m * s_lh + col] = w_gh[r // L, r % L, col]
        cuda.syncthreads()          # the weights, before the first phase reads them

        for q in range(q_begin, q_end):
            t = q // (L + 1)
            ph = q % (L + 1)
            if ph == 0:
                # every product against h*_{t-1}: feedback partials, own-state rows, gate rows
                n_fb = L * L * B * nu
                n_rec = L * HH * B * nu
                for idx in range(tid, n_fb + n_rec + own_rows * B, stride):
                    acc = ZERO
                    if idx < n_fb:
                        k = idx % nu
                        rest = idx // nu
                        b = rest % B
                        ji = rest // B            # j*L + i
                        i = ji % L
                        j = ji // L
                        w_at = (j * units + k) * s_lh + i * H
                        for col in range(H):
                            acc += wsm[w_at + col] * h[t, b, i * H + col]
                        pfb[j, i, b, u0 + k] = acc
                    elif idx < n_fb + n_rec:
                        e = idx - n_fb
                        k = e % nu
                        rest = e // nu
                        b = rest % B
                        jq = rest // B            # j*HH + q
                        j = jq // HH
                        w_at = off_hh + (jq * units + k) * s_h
                        for col in range(H):
                            acc += wsm[w_at + col] * h[t, b, j * H + col]
                        rec[j, b, (jq % HH) * H + u0 + k] = acc
                    else:
                        e = idx - n_fb - n_rec
                        b = e % B
                        m = e // B
                        w_at = off_gh + m * s_lh
                        for col in range(LH):
                            acc += wsm[w_at + col] * h[t, b, col]
                        sh[b, blk + m * P] = acc
            else:
                j = ph - 1
                # one pass: the L reset gates into layer j of every row (redundant in every
                # block: B*L dot products, cheaper than a grid barrier) and, for j > 0, the G
                # input pre-activations of the block's units into gxl
                n_in = 0 if j == 0 else B * G * nu
                for idx in range(tid, B * L + n_in, stride):
                    if idx < B * L:
                        i = idx % L
                        b = idx // L
                        s = ZERO
                        if j == 0:
                            s = gs0[t, b, i]
                        else:
                            w_at = off_gx + ((j - 1) * L + i) * s_h
                            for col in range(H):
                                xv = h[t + 1, b, (j - 1) * H + col]
                                if use_mask:
                                    xv = xv * masks[j - 1, t, b, col]
                                s += wsm[w_at + col] * xv
                            s += b_g[j, i]
                        s += sh[b, j * L + i]
                        g = HALF * math.tanh(HALF * s) + HALF
                        wsm[off_g + idx] = g
                        if save and blk == 0:
                            fbgate[t, b, j * L + i] = g
                    else:
                        e = idx - B * L
                        k = e % nu
                        rest = e // nu
                        gq = rest % G
                        b = rest // G
                        w_at = off_ih + (((j - 1) * G + gq) * units + k) * s_h
                        acc = ZERO
                        for col in range(H):
                            xv = h[t + 1, b, (j - 1) * H + col]
                            if use_mask:
                                xv = xv * masks[j - 1, t, b, col]
                            acc += wsm[w_at + col] * xv
                        gxl[b, gq * H + u0 + k] = acc + b_in[j, gq * H + u0 + k]
                cuda.syncthreads()      # the gates and gxl, before the units read them
                for idx in range(tid, B * nu, stride):
                    k = idx % nu
                    b = idx // nu
                    u = u0 + k
                    a0 = ZERO
                    a1 = ZERO
                    a2 = ZERO
                    a3 = ZERO
                    if j == 0:
                        a0 = gx0[t, b, u]
                        if G > 1:
                            a1 = gx0[t, b, H + u]
                            a2 = gx0[t, b, 2 * H + u]
                        if G > 3:
                            a3 = gx0[t, b, 3 * H + u]
                    else:
                        a0 = gxl[b, u]
                        if G > 1:
                            a1 = gxl[b, H + u]
                            a2 = gxl[b, 2 * H + u]
                        if G > 3:
                            a3 = gxl[b, 3 * H + u]
                    fb = ZERO
                    for i in range(L):
                        fb += wsm[off_g + b * L + i] * pfb[j, i, b, u]
                    r0 = ZERO
                    r1 = ZERO
                    r2 = ZERO
                    if HH > 0:
                        r0 = rec[j, b, u]
                        r1 = rec[j, b, H + u]
                    if HH > 2:
                        r2 = rec[j, b, 2 * H + u]
                    bh = ZERO
                    if ID == 2:
                        bh = b_hn[j, u]
                    update_fwd(h, c, gates, lengths, t, b, j * H + u, j * 4 * H + u, a0, a1, a2,
                               a3, fb, r0, r1, r2, bh, H, save)
            if q + 1 < q_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{cell}_persistent_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(cell: str, dtype: str):
    """The persistent backward (BPTT) of the whole stack: phases q in [q_begin, q_end) of
    [0, T*(L+1)): step t = T-1 - q // (L+1), phase ph = q % (L+1): layer L-1-ph (0-based) for
    ph < L, phase Z for ph = L.

    Arguments (C-contiguous compute dtype, none aliasing another; shapes as make_fwd's):
      w_ih (Lm, G*H, H), w_hh (L, R, H), w_fb (L, H, LH), w_gx (Lm, L, H), w_gh (L, L, LH): read
      masks   (Lm, T, B, H) when use_mask, else (1,1,1,1); read
      h, c, gates, fbgate  the forward's saved arrays (placeholders as make_fwd's); read
      pfb     (L, L, T, B, H) pfb[j, i, t, b, u] = U^{i->j}[u, :] . h^i_{t-1} (the host's); read
      dy      (T, B, H) read
      dgx     (L, T, B, G*H), dfb (L, T, B, H), ds (L, T, B, L): written (read back later)
      carry_h (B, LH) in dL/dh_n, out dL/dh0;  carry_c (B, LH) LSTM in dL/dc_n, out dL/dc0,
              else (1, 1)
      lengths int32 (B,) ; q_begin, q_end, units, use_mask: int32
    Dynamic shared memory: smem_bytes('bwd', cell, H, L, B, units, P, dtype)."""
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    ZERO, ONE = DT(0), DT(1)
    G, HH = GATES[cell], HH_GATES[cell]
    _, update_bwd = _unit_io(cell, dtype)

    @cuda.jit(device=True, inline=True)
    def reset_gate_grads(wsm, off_ds, tid, stride, fbgate, pfb, dfb, ds, lengths, t, j, blk):
        """ds_j[b, i] of every row into shared memory (block 0 also to ds); exact 0 padded."""
        B = pfb.shape[3]
        H = pfb.shape[4]
        L = pfb.shape[0]
        for idx in range(tid, B * L, stride):
            i = idx % L
            b = idx // L
            v = ZERO
            if t < lengths[b]:
                acc = ZERO
                for u in range(H):
                    acc += dfb[j, t, b, u] * pfb[j, i, t, b, u]
                g = fbgate[t, b, j * L + i]
                v = acc * (g * (ONE - g))
            wsm[off_ds + idx] = v
            if blk == 0:
                ds[j, t, b, i] = v

    def kernel(w_ih, w_hh, w_fb, w_gx, w_gh, masks, h, c, gates, fbgate, pfb, dy, dgx, dfb, ds,
               carry_h, carry_c, lengths, q_begin, q_end, units, use_mask):
        grid = _this_grid()
        wsm = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = dy.shape[0]
        B = dy.shape[1]
        L = w_fb.shape[0]
        H = w_fb.shape[1]
        GH = G * H
        blk = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        u0, nu = _owned_units(units, H)
        s_h = _padded_row(H, 1)
        s_hh = _padded_row(HH * H, 1)
        s_gh = _padded_row(GH, 1)
        off_gh = L * L * units * s_h
        off_hh = off_gh + L * L * units * L
        off_ih = off_hh + L * units * s_hh
        off_gx = off_ih + (L - 1) * units * s_gh
        off_ds = off_gx + (L - 1) * units * L

        # columns of the block's units; the global reads coalesce over the row index's fastest
        # dimension where the layout allows, these once-per-launch stores are strided
        for idx in range(tid, L * L * nu * H, stride):
            v = idx % H
            rest = idx // H
            k = rest % nu
            jl = rest // nu                      # j*L + l: target j, source l
            wsm[(jl * units + k) * s_h + v] = w_fb[jl // L, v, (jl % L) * H + u0 + k]
        for idx in range(tid, L * L * nu * L, stride):
            r = idx % L
            rest = idx // L
            k = rest % nu
            jl = rest // nu
            wsm[off_gh + (jl * units + k) * L + r] = w_gh[jl // L, r, (jl % L) * H + u0 + k]
        for idx in range(tid, L * nu * HH * H, stride):
            row = idx % (HH * H)
            rest = idx // (HH * H)
            k = rest % nu
            l = rest // nu
            wsm[off_hh + (l * units + k) * s_hh + row] = w_hh[l, row, u0 + k]
        for idx in range(tid, (L - 1) * nu * GH, stride):
            row = idx % GH
            rest = idx // GH
            k = rest % nu
            l = rest // nu                       # layer l + 1
            wsm[off_ih + (l * units + k) * s_gh + row] = w_ih[l, row, u0 + k]
        for idx in range(tid, (L - 1) * nu * L, stride):
            i = idx % L
            rest = idx // L
            k = rest % nu
            l = rest // nu
            wsm[off_gx + (l * units + k) * L + i] = w_gx[l, i, u0 + k]
        # not for correctness (every phase that reads the columns does so after its ds barrier,
        # the top layer's reads none): without it ptxas interleaves these loads with the first
        # phase and the kernel needs 232 registers on sm_80 instead of 178
        cuda.syncthreads()  # register fence

        for q in range(q_begin, q_end):
            t = T - 1 - q // (L + 1)
            ph = q % (L + 1)
            if ph < L:
                l = L - 1 - ph
                if l < L - 1:
                    reset_gate_grads(wsm, off_ds, tid, stride, fbgate, pfb, dfb, ds, lengths, t,
                                     l + 1, blk)
                    cuda.syncthreads()  # ds of the layer above, before d_in reads it
                for idx in range(tid, B * nu, stride):
                    k = idx % nu
                    b = idx // nu
                    u = u0 + k
                    col = l * H + u
                    dh = carry_h[b, col]
                    if l == L - 1:
                        dh += dy[t, b, u]
                    elif t < lengths[b]:
                        w_at = off_ih + (l * units + k) * s_gh
                        d_in = ZERO
                        for row in range(GH):
                            d_in += dgx[l + 1, t, b, row] * wsm[w_at + row]
                        x_at = off_gx + (l * units + k) * L
                        for i in range(L):
                            d_in += wsm[off_ds + b * L + i] * wsm[x_at + i]
                        if use_mask:
                            d_in = d_in * masks[l, t, b, u]
                        dh += d_in
                    direct = update_bwd(h, c, gates, dgx, dfb, carry_c, lengths, t, b, l, u, H,
                                        dh)
                    if t < lengths[b]:
                        carry_h[b, col] = direct
                _grid_group_sync(grid)
            else:
                reset_gate_grads(wsm, off_ds, tid, stride, fbgate, pfb, dfb, ds, lengths, t, 0,
                                 blk)
                cuda.syncthreads()      # ds of layer 1, before the sums read it
                for idx in range(tid, B * L * nu, stride):
                    k = idx % nu
                    rest = idx // nu
                    i = rest % L                  # the source layer of dL/dh_{t-1}^i
                    b = rest // L
                    u = u0 + k
                    if t < lengths[b]:
                        acc = carry_h[b, i * H + u]
                        for j in range(L):
                            w_at = ((j * L + i) * units + k) * s_h
                            part = ZERO
                            for v in range(H):
                                part += dfb[j, t, b, v] * wsm[w_at + v]
                            acc += fbgate[t, b, j * L + i] * part
                            g_at = off_gh + ((j * L + i) * units + k) * L
                            for r in range(L):
                                if j == 0:
                                    acc += wsm[off_ds + b * L + r] * wsm[g_at + r]
                                else:
                                    acc += ds[j, t, b, r] * wsm[g_at + r]
                        h_at = off_hh + (i * units + k) * s_hh
                        for row in range(HH * H):
                            gq = row // H
                            if gq == 2:
                                gq = 3                # LSTM's o row: gate 3 of dgx
                            acc += dgx[i, t, b, gq * H + row % H] * wsm[h_at + row]
                        carry_h[b, i * H + u] = acc
                if q + 1 < q_end:
                    cuda.syncthreads()  # carry_h of the block's units, before the next step

    kernel.__name__ = f"{cell}_persistent_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


def signature(kind: str, cell: str, dtype: str):
    """The Numba signature of a gated-feedback kernel kind (arrays C-contiguous)."""
    c = NUMBA_COMPUTE[dtype]
    c1, c2, c3, c4, c5 = c[::1], c[:, ::1], c[:, :, ::1], c[:, :, :, ::1], c[:, :, :, :, ::1]
    i1 = int32[::1]
    if kind == "persistent_fwd":
        # gx0, gs0, w_ih, w_hh, w_fb, w_gx, w_gh, b_in, b_hn, b_g, masks, h, c, gates, fbgate,
        # pfb, rec, sh, gxl, lengths, q_begin, q_end, units, save, use_mask
        return void(c3, c3, c3, c3, c3, c3, c3, c2, c2, c2, c4, c3, c3, c3, c3, c4, c3, c2, c2, i1,
                    int32, int32, int32, int32, int32)
    if kind == "persistent_bwd":
        # w_ih, w_hh, w_fb, w_gx, w_gh, masks, h, c, gates, fbgate, pfb, dy, dgx, dfb, ds,
        # carry_h, carry_c, lengths, q_begin, q_end, units, use_mask
        return void(c3, c3, c3, c3, c3, c4, c3, c3, c3, c3, c5, c3, c4, c4, c4, c2, c2, i1,
                    int32, int32, int32, int32)
    if kind == "pointwise_fwd":
        # pre, fb, rec, bhn, h, c, gates, lengths, t, layer, save
        return void(c2, c2, c2, c1, c3, c3, c3, i1, int32, int32, int32)
    if kind == "pointwise_bwd":
        # h, c, gates, dh, dgx, dfb, carry_c, direct, lengths, t, layer
        return void(c3, c3, c3, c2, c4, c4, c2, c2, i1, int32, int32)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


_FACTORIES = {"persistent_fwd": make_fwd, "persistent_bwd": make_bwd,
              "pointwise_fwd": make_pointwise_fwd, "pointwise_bwd": make_pointwise_bwd}


@functools.lru_cache(maxsize=None)
def spec(kind: str, cell: str, dtype: str) -> KernelSpec:
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    if kind not in _FACTORIES:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    func = _FACTORIES[kind](cell, dtype)
    return KernelSpec(name=func.__name__, func=func, signature=signature(kind, cell, dtype),
                      cell=cell, kind=kind, dtype=dtype, grid_sync=kind.startswith("persistent"))


def specializations() -> list[KernelSpec]:
    """Every gated-feedback kernel: 4 cells x float32/float64 x the 4 kinds."""
    return [spec(kind, cell, dtype) for cell in CELLS for dtype in DTYPES for kind in KINDS]


def specializations_f32() -> list[KernelSpec]:
    """specializations() at float32 (the static checks compile the two halves side by side)."""
    return [sp for sp in specializations() if sp.dtype == "float32"]


def specializations_f64() -> list[KernelSpec]:
    return [sp for sp in specializations() if sp.dtype == "float64"]
