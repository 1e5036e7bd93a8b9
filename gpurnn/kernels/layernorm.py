"""The LayerNormLSTM's kernels (math, parameters, saved layout and the `noise` dict:
gpurnn/layernorm.py; per-unit math: cellmath.make_layernorm; host side:
gpurnn/backends/cuda_layernorm.py; plan: gpurnn/planning/layernorm.py).

The x side is the host's: xg = x W_ih^T for all T*B rows (one GEMM), its per-row statistics,
xhat, and gx = g_x*xhat + b_x + b_ih + b_hh (and, backward, the LN-x backward, dW_ih, dx after
the recurrence). Inside the kernels only the h side (LN over the 4H recurrent pre-activations)
and the c side (LN over the H cell values c~) remain; their statistics span every block.

Ownership: block j of P owns the unit slice U_j = [j*U, min((j+1)*U, H)), U = ceil(H/P), i.e.
the 4 gate features g*H + u of each of its units; a block past H owns none and only joins the
barriers. The batch is staged in tiles of bt rows (the plan's batch_tile).

Grid-wide row statistics, deterministic: per batch row b each block writes ONE partial of its
own features into the global buffer part (2, P, B, 2) [0: h side, 1: c side]; after a grid
barrier every block that needs the row's statistic reads all P partials in block order (no
atomics, the same sum in every block). Forward partials are (S_j, M2_j): the block's sum and
its sum of squared deviations about its own mean (a two-pass sum over the block's few values),
combined exactly as M2 = sum_j M2_j + n_j (S_j/n_j - mean)^2 (Chan et al.), so the variance is
not a one-pass E[v^2] - mean^2 difference. Backward partials are plain sums (of dchat and
dchat*chat over H; of dhhat and dhhat*hhat over 4H).

Persistent forward: half-phases q in [q_begin, q_end) of [0, 2T+1), s = q // 2. TWO grid
barriers per step (2T in a launch of all steps):
  phase 1 (q even)  per tile: (s > 0) the previous step's c statistics of the tile's rows from
                    part[1] -> block barrier -> stage h_{t-1}: every block computes the whole
                    h_{t-1} = zoneout(o * tanh(LN(c~))) of the previous step from the global
                    c~ and gates (owners also write h and y; block 0 the saved c statistics),
                    times the recurrent-dropout mask (s = 0: h0) -> block barrier -> the raw
                    recurrent pre-activations of U_j's 4 gates (W_hh rows of U_j in shared
                    memory), kept in `pre` and written to hhat[t] -> block barrier -> one thread
                    per row: (S, M2) of its 4*|U_j| values -> part[0] -> GRID BARRIER
  phase 2 (q odd)   per tile: one thread per row: mean_h, rstd_h from all of part[0] -> block
                    barrier -> one thread per (b, u) of U_j: hhat, the gates, c~ (into `pre`
                    and the global ctil), c_t with zoneout -> block barrier -> one thread per
                    row: (S, M2) of its |U_j| c~ -> part[1] -> GRID BARRIER
  The tail q = 2T (phase 1 of s = T) only forms and writes the last step's h and y.
  Why two, not three: the h output of step t needs the c statistics of every block (barrier 2),
  and the next step's products need all of h_t; instead of a third barrier after h_t, every
  block forms the whole h_t itself while staging it (B*H extra tanh per block and step, about
  1/(4U) of its multiply-adds), so "h_t complete" and "c~ statistics complete" are one barrier.
Persistent backward (BPTT): half-phases q in [q_begin, q_end) of [0, 2T+1), kk = q // 2 the
kk-th step taken backward (s = T-1-kk; s = -1 in the tail that only finishes dh0). TWO grid
barriers per step, the same idea turned round:
  phase A (q even)  per tile: (has_next) the row means of dhhat and dhhat*hhat of the step
                    processed before (part[0]) -> block barrier -> stage its
                    da = dL/d(h W_hh^T) = rstd_h (g_h dz - m1 - hhat m2) for all 4H features,
                    computed by every block (owners write da for the host's dW_hh) -> block
                    barrier -> dh_rec[b, u] = sum_f da[b, f] W_hh[f, u] (W_hh columns of U_j);
                    dH = carry + mask * dh_rec (+ dy); the c-side backward per (b, u)
                    (cellmath bwd_c_unit: dz_o, dl, dchat, the zoneout-h direct carry) with
                    (dchat, dchat*chat) into `cp` -> block barrier -> one thread per row: its
                    sums -> part[1] (tail: dh0 = carry + mask * dh_rec only) -> GRID BARRIER
  phase B (q odd)   per tile: one thread per row: m1, m2 of the c side from all of part[1]
                    -> block barrier -> one thread per (b, u): dc~ (LN-c backward), dz of i, f,
                    g, the dc carry (zoneout-c), dhhat = g_h dz and dhhat*hhat of its 4
                    features into `cp` -> block barrier -> one thread per row: the sums ->
                    part[0] -> GRID BARRIER
Weight and LN-parameter gradients, dx and the LN-x backward are the host's afterwards.

Shared memory (smem_bytes, the one model the plan sizes by; all in the compute dtype):
  forward   W_hh rows 4U x S(H, Lf) | staged h bt x H | pre bt x 4U | scratch `threads` |
            row statistics 2 bt        (Lf = lanes_per_output(bt*4U))
  backward  W_hh columns U x S(4H, Lb) | staged da bt x 4H | scratch `threads` |
            cp 2 bt U | row means 2 bt  (Lb = lanes_per_output(bt*U))
S = layout.padded_row; a dot product is split over L lanes whose partials meet in the scratch
and are added by lane 0 in lane order (deterministic, no atomics, no shuffles).
Block barriers (per tile; every one reached by every thread of a block, loop bounds uniform
per block): forward phase 1: after the row statistics (s > 0), after the staging, one in the
dot product when L > 1, one before the row sums read `pre`, and in the tail one between tiles
(the next tile's row statistics overwrite what this tile's outputs read); phase 2: after the
row statistics, before the row sums read `pre`. Backward phase A: after the row means
(has_next), after the staging, one in the dot product when L > 1 (has_next), one before the
row sums read `cp` (s >= 0), and one between tiles where no staging barrier orders the next
tile's `cp` writes after this tile's row sums (the first step taken, which stages nothing);
phase B: after the row means, before the row sums read `cp`. No other barrier is needed
between tiles: each tile's first writes to a region come after a barrier that every reader of
the previous tile's values has passed. tests/test_sim_layernorm.py deletes each barrier in
turn.
Registers (ptxas -v, sm_80 / sm_90): forward 208 / 175 (f32), 200 / 178 (f64); backward
192 / 139 (f32), 200 / 172 (f64); no spills. That is above the plain kernels'
layout.KERNEL_REGS_MAX (192): the layer norm's staging, statistics and row sums add to the
plain step's working set, so the plan holds these kernels to planning.layernorm.KERNEL_REGS
(224) and refuses block sizes that leave fewer (the default 256 threads leave 255). What was
tried: each phase recomputes its lane split and offsets (as the mLSTM kernels do: -30 on
sm_80), row sums without integer division (-18), the raw products written to global memory
after the `pre` barrier rather than inside the dot product (-10), the per-unit math one thread
per (b, u) rather than a per-row loop (parallel; about the same registers), the LN parameters
and the zoneout masks packed into one array each (fewer kernel parameters; no measurable
change).
Stepwise path: the host's GEMM and h-side statistics per step and the pointwise kernels below
(gates + c~; host c statistics; output h), backward the mirror (pointwise c-side; host c means;
pointwise gate side; host da).
"""
from __future__ import annotations

import functools
import math

from numba import cuda, int32, void

from .cellmath import LN_REC, NUMBA_COMPUTE, make_layernorm, step_times
from .dtypes import NP_COMPUTE, SHORT
from .layout import KernelSpec, lanes_per_output, padded_row
from .persistent import _grid_group_sync, _lane_split, _owned_units, _padded_row, _this_grid

CELL = "layernorm_lstm"
GATES = 4
DTYPES = ("float32", "float64")
EPS = 1e-5                              # gpurnn.layernorm.EPS
KINDS = ("persistent_fwd", "persistent_bwd", "pointwise_fwd_gates", "pointwise_fwd_out",
         "pointwise_bwd_c", "pointwise_bwd_gates")


def smem_regions(direction: str, hidden: int, batch_tile: int, units: int, threads: int):
    """(weight elements, other elements) of one persistent block's dynamic shared memory."""
    if direction == "fwd":
        row = padded_row(hidden, lanes_per_output(batch_tile * GATES * units, threads))
        return (GATES * units * row,
                batch_tile * hidden + batch_tile * GATES * units + threads + 2 * batch_tile)
    if direction == "bwd":
        row = padded_row(GATES * hidden, lanes_per_output(batch_tile * units, threads))
        return (units * row,
                batch_tile * GATES * hidden + threads + 2 * batch_tile * units + 2 * batch_tile)
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


def smem_bytes(direction: str, hidden: int, batch_tile: int, units: int, dtype: str, *,
               threads: int) -> int:
    """Bytes of dynamic shared memory one persistent LayerNormLSTM block is launched with."""
    weights, rest = smem_regions(direction, hidden, batch_tile, units, threads)
    return (weights + rest) * NP_COMPUTE[dtype](0).itemsize


def _row_stats_fn(dtype):
    DT = NP_COMPUTE[dtype]
    ZERO, ONE, EPS_T = DT(0), DT(1), DT(EPS)

    @cuda.jit(device=True, inline=True)
    def row_stats(part, which, b, units, width, H):
        """(mean, rstd) of row b over width*H features from the P partials (S_j, M2_j)."""
        P = part.shape[1]
        n = DT(width * H)
        total = ZERO
        for jj in range(P):                     # fixed block order: deterministic
            total += part[which, jj, b, 0]
        mean = total / n
        m2 = ZERO
        for jj in range(P):
            nj = width * max(0, min(units, H - jj * units))
            if nj > 0:
                d = part[which, jj, b, 0] / DT(nj) - mean
                m2 += part[which, jj, b, 1] + DT(nj) * d * d
        return mean, ONE / math.sqrt(m2 / n + EPS_T)

    return row_stats


@functools.lru_cache(maxsize=None)
def make_fwd(dtype: str):
    """The persistent LayerNormLSTM forward for dtype (a plain function, cuda.jit-able).

    Arguments (C-contiguous compute-dtype arrays, none aliasing another):
      gx      (T, B, 4H)  g_x*xhat + b_x (+ b_ih + b_hh); read only
      w_hh    (4H, H)     read only, rows of U_j once per launch
      lnp     (2, 5H)     [layernorm_h_weight, layernorm_c_weight; the two biases] (one array:
                          fewer kernel parameters held in registers)
      rmask   (B, H)      recurrent-dropout mask (noise & LN_REC), else a (1, 1) placeholder
      zone    (2, T, B, H) the zoneout masks [zoneout_h; zoneout_c] (read where noise & LN_ZH /
                          LN_ZC), else a (2, 1, 1, 1) placeholder
      h, c    (T+1, B, H) h0, c0 at [0] (forward) / [T] (reverse) on entry; written
      gates, hhat (Tg, B, 4H), stats (Tg, B, 6)  Tg = T when save (the saved arrays; stats
                          [:, :, 0:2] are the host's), else 1: one step's working copy
                          (hhat holds the raw h W_hh^T between the two phases)
      y       (T, B, H)   written (0 on masked steps)
      ctil    (B, H)      buffer: the step's c~
      part    (2, P, B, 2) buffer: the per-block row partials
      lengths int32 (B,) ; reverse, q_begin, q_end (of [0, 2T+1)), units, save, batch_tile,
      noise (bit mask cellmath.LN_*): int32
    Dynamic shared memory: smem_bytes('fwd', H, batch_tile, units, dtype, threads=...).
    """
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    ZERO = DT(0)
    gates_unit, out_unit, _, _, _ = make_layernorm(dtype)
    row_stats = _row_stats_fn(dtype)

    def kernel(gx, w_hh, lnp, rmask, zone, h, c, gates, hhat, stats, y, ctil, part, lengths,
               reverse, q_begin, q_end, units, save, batch_tile, noise):
        grid = _this_grid()
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = gx.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        j = cuda.blockIdx.x
        u0, nu = _owned_units(units, H)
        gu = 4 * units
        row = _padded_row(H, _lane_split(batch_tile * gu, stride)[0])

        for idx in range(tid, 4 * nu * H, stride):       # coalesced over the columns
            col = idx % H
            r = idx // H
            k = r % nu
            g = r // nu
            smem[(g * units + k) * row + col] = w_hh[g * H + u0 + k, col]
        # no barrier here: the rows are first read after a staging barrier

        for q in range(q_begin, q_end):
            s = q // 2
            t, t_in, t_out = step_times(T, s, reverse)
            ts = t * save
            if q % 2 == 0:
                # phase 1: h_{t-1} (the previous step's output) staged, the raw products
                tp, tp_in, tp_out = step_times(T, s - 1, reverse)
                tsp = tp * save
                lanes, groups = _lane_split(batch_tile * gu, stride)
                lane = tid % lanes
                row = _padded_row(H, lanes)
                st_off = gu * row
                pre_off = st_off + batch_tile * H
                scr_off = pre_off + batch_tile * gu
                rs_off = scr_off + stride
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if s > 0:
                        if s == T and b0 > 0:
                            cuda.syncthreads()  # tail: the last tile's outputs read the stats
                        if tid < nb:
                            mc, rc = row_stats(part, 1, b0 + tid, units, 1, H)
                            smem[rs_off + 2 * tid] = mc
                            smem[rs_off + 2 * tid + 1] = rc
                            if j == 0 and save:
                                stats[tp, b0 + tid, 4] = mc
                                stats[tp, b0 + tid, 5] = rc
                        cuda.syncthreads()
                    for idx in range(tid, nb * H, stride):
                        bl = idx // H
                        u = idx % H
                        b = b0 + bl
                        if s > 0:
                            hv = out_unit(gates, ctil, h, lnp, zone, lengths, tp, tsp, tp_in, b, u,
                                          smem[rs_off + 2 * bl], smem[rs_off + 2 * bl + 1],
                                          noise)
                            if u >= u0 and u < u0 + nu:
                                h[tp_out, b, u] = hv
                                y[tp, b, u] = hv if tp < lengths[b] else ZERO
                        else:
                            hv = h[t_in, b, u]
                        if s < T:
                            if noise & LN_REC:
                                hv = hv * rmask[b, u]
                            smem[st_off + idx] = hv
                    if s < T:
                        cuda.syncthreads()
                        n_out = nb * 4 * nu
                        for rnd in range((n_out + groups - 1) // groups):
                            oi = rnd * groups + tid // lanes
                            k = 0
                            g = 0
                            bl = 0
                            acc = ZERO
                            if oi < n_out:
                                k = oi % nu
                                bg = oi // nu
                                g = bg % 4
                                bl = bg // 4
                                w_at = (g * units + k) * row
                                h_at = st_off + bl * H
                                for col in range(lane, H, lanes):
                                    acc += smem[w_at + col] * smem[h_at + col]
                            if lanes > 1:
                                smem[scr_off + tid] = acc
                                cuda.syncthreads()
                                if lane == 0 and oi < n_out:
                                    acc = ZERO
                                    for jl in range(lanes):     # fixed order: deterministic
                                        acc += smem[scr_off + tid + jl]
                            if lane == 0 and oi < n_out:
                                smem[pre_off + (bl * 4 + g) * units + k] = acc
                        cuda.syncthreads()      # `pre` complete before the row sums read it
                        for idx in range(tid, nb * 4 * nu, stride):
                            k = idx % nu
                            bg = idx // nu
                            hhat[ts, b0 + bg // 4, (bg % 4) * H + u0 + k] = smem[
                                pre_off + bg * units + k]
                        if tid < nb:
                            p_at = pre_off + tid * gu
                            tot = ZERO
                            for g in range(4):
                                for k in range(nu):
                                    tot += smem[p_at + g * units + k]
                            m2 = ZERO
                            if nu > 0:
                                mean = tot / DT(4 * nu)
                                for g in range(4):
                                    for k in range(nu):
                                        d = smem[p_at + g * units + k] - mean
                                        m2 += d * d
                            part[0, j, b0 + tid, 0] = tot
                            part[0, j, b0 + tid, 1] = m2
            else:
                # phase 2: LN of the products, the gates, c~ and c_t of the block's units
                pre_off = 4 * units * _padded_row(H, _lane_split(batch_tile * 4 * units,
                                                                 stride)[0]) + batch_tile * H
                rs_off = pre_off + batch_tile * 4 * units + stride
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if tid < nb:
                        mh, rh = row_stats(part, 0, b0 + tid, units, 4, H)
                        smem[rs_off + 2 * tid] = mh
                        smem[rs_off + 2 * tid + 1] = rh
                        if j == 0 and save:
                            stats[t, b0 + tid, 2] = mh
                            stats[t, b0 + tid, 3] = rh
                    cuda.syncthreads()
                    for idx in range(tid, nb * nu, stride):
                        bl = idx // nu
                        k = idx % nu
                        smem[pre_off + bl * units + k] = gates_unit(
                            gx, lnp, hhat, hhat, gates, c, ctil, zone, lengths, t, ts, ts, t_in,
                            t_out, b0 + bl, u0 + k, smem[rs_off + 2 * bl],
                            smem[rs_off + 2 * bl + 1], noise, save)
                    cuda.syncthreads()          # c~ of the tile complete before the row sums
                    if tid < nb:
                        p_at = pre_off + tid * units
                        tot = ZERO
                        for k in range(nu):
                            tot += smem[p_at + k]
                        m2 = ZERO
                        if nu > 0:
                            mean = tot / DT(nu)
                            for k in range(nu):
                                d = smem[p_at + k] - mean
                                m2 += d * d
                        part[1, j, b0 + tid, 0] = tot
                        part[1, j, b0 + tid, 1] = m2
            if q + 1 < q_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{CELL}_persistent_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(dtype: str):
    """The persistent LayerNormLSTM backward (BPTT) for dtype.

    Arguments (C-contiguous compute-dtype arrays, none aliasing another):
      w_hh    (4H, H)     read only, columns of U_j once per launch
      lnp (2, 5H), rmask, zone: as make_fwd's
      c (T+1, B, H), gates, hhat (T, B, 4H), stats (T, B, 6): the forward's saved; read only
      dy      (T, B, H)   read only
      dz      (T, B, 4H)  written: dL/d(gate pre-activations) (0 on masked steps)
      da      (T, B, 4H)  written: dL/d(h_{t-1} W_hh^T) (0 on masked steps)
      dl      (T, B, H)   written: dL/d LN(c~) (0 on masked steps)
      dchat   (B, H)      buffer: the step's dL/d chat
      dh_carry, dc_carry (B, H)  in dL/dh_n, dL/dc_n; out dL/dh0, dL/dc0
      part    (2, P, B, 2) buffer
      lengths int32 (B,) ; reverse, q_begin, q_end (of [0, 2T+1)), units, batch_tile, noise
    Dynamic shared memory: smem_bytes('bwd', H, batch_tile, units, dtype, threads=...).
    """
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    ZERO = DT(0)
    _, _, bwd_c_unit, bwd_gates_unit, stage_da = make_layernorm(dtype)

    def kernel(w_hh, lnp, rmask, zone, c, gates, hhat, stats, dy, dz, da, dl, dchat, dh_carry,
               dc_carry, part, lengths, reverse, q_begin, q_end, units, batch_tile,
               noise):
        grid = _this_grid()
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = dy.shape[0]
        B = c.shape[1]
        H = c.shape[2]
        GH = 4 * H
        P = part.shape[1]
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        j = cuda.blockIdx.x
        u0, nu = _owned_units(units, H)
        lanes, groups = _lane_split(batch_tile * units, stride)
        lane = tid % lanes
        row = _padded_row(GH, lanes)
        st_off = units * row
        scr_off = st_off + batch_tile * GH
        cp_off = scr_off + stride
        rs_off = cp_off + 2 * batch_tile * units

        # global reads coalesce over k; these once-per-launch stores are strided
        for idx in range(tid, GH * nu, stride):
            k = idx % nu
            r = idx // nu
            smem[k * row + r] = w_hh[r, u0 + k]
        # no barrier here: the columns are first read after a staging barrier

        for q in range(q_begin, q_end):
            kk = q // 2
            s = T - 1 - kk          # processing step; -1 in the dh0 tail
            t, t_in, t_out = step_times(T, s, reverse)
            if q % 2 == 0:
                # phase A: stage da of the step processed before, dh, the c-side backward
                has_next = kk > 0   # uniform over the block: the barriers below are safe
                t_next = T - 2 - s if reverse else s + 1
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if b0 > 0 and not has_next:
                        cuda.syncthreads()      # the last tile's row sums read `cp`
                    if has_next:
                        if tid < nb:
                            s1 = ZERO
                            s2 = ZERO
                            for jj in range(P):             # fixed block order
                                s1 += part[0, jj, b0 + tid, 0]
                                s2 += part[0, jj, b0 + tid, 1]
                            smem[rs_off + 2 * tid] = s1 / DT(GH)
                            smem[rs_off + 2 * tid + 1] = s2 / DT(GH)
                        cuda.syncthreads()
                        for idx in range(tid, nb * GH, stride):
                            bl = idx // GH
                            f = idx % GH
                            v = stage_da(dz, hhat, lnp, stats, lengths, t_next, b0 + bl, f,
                                         smem[rs_off + 2 * bl], smem[rs_off + 2 * bl + 1])
                            smem[st_off + idx] = v
                            uf = f % H
                            if uf >= u0 and uf < u0 + nu:
                                da[t_next, b0 + bl, f] = v
                        cuda.syncthreads()
                    n_out = nb * nu
                    for rnd in range((n_out + groups - 1) // groups):
                        oi = rnd * groups + tid // lanes
                        rec = ZERO
                        if oi < n_out and has_next:
                            w_at = (oi % nu) * row
                            d_at = st_off + (oi // nu) * GH
                            for r in range(lane, GH, lanes):
                                rec += smem[w_at + r] * smem[d_at + r]
                        if lanes > 1 and has_next:
                            smem[scr_off + tid] = rec
                            cuda.syncthreads()
                            if lane == 0 and oi < n_out:
                                rec = ZERO
                                for jl in range(lanes):         # fixed order: deterministic
                                    rec += smem[scr_off + tid + jl]
                        if lane == 0 and oi < n_out:
                            bl = oi // nu
                            k = oi % nu
                            b = b0 + bl
                            u = u0 + k
                            if noise & LN_REC:
                                rec = rec * rmask[b, u]
                            dH = dh_carry[b, u] + rec
                            if s < 0:
                                dh_carry[b, u] = dH
                            else:
                                dch, ch = bwd_c_unit(gates, c, stats, lnp, zone, dy, dh_carry, dz,
                                                     dl, lengths, t, t_in, b, u, dH, noise)
                                dchat[b, u] = dch
                                smem[cp_off + 2 * (bl * units + k)] = dch
                                smem[cp_off + 2 * (bl * units + k) + 1] = dch * ch
                    if s >= 0:
                        cuda.syncthreads()      # `cp` complete before the row sums read it
                        if tid < nb:
                            s1 = ZERO
                            s2 = ZERO
                            for k in range(nu):
                                s1 += smem[cp_off + 2 * (tid * units + k)]
                                s2 += smem[cp_off + 2 * (tid * units + k) + 1]
                            part[1, j, b0 + tid, 0] = s1
                            part[1, j, b0 + tid, 1] = s2
            else:
                # phase B: the LN-c backward, dz of i, f, g, the h-side sums
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if tid < nb:
                        s1 = ZERO
                        s2 = ZERO
                        for jj in range(P):                 # fixed block order
                            s1 += part[1, jj, b0 + tid, 0]
                            s2 += part[1, jj, b0 + tid, 1]
                        smem[rs_off + 2 * tid] = s1 / DT(H)
                        smem[rs_off + 2 * tid + 1] = s2 / DT(H)
                    cuda.syncthreads()
                    for idx in range(tid, nb * nu, stride):
                        bl = idx // nu
                        k = idx % nu
                        e1, e2 = bwd_gates_unit(gates, c, stats, lnp, zone, hhat, dz, dchat,
                                                dc_carry, lengths, t, t_in, b0 + bl, u0 + k,
                                                smem[rs_off + 2 * bl], smem[rs_off + 2 * bl + 1],
                                                noise)
                        smem[cp_off + 2 * (bl * units + k)] = e1
                        smem[cp_off + 2 * (bl * units + k) + 1] = e2
                    cuda.syncthreads()          # `cp` complete before the row sums read it
                    if tid < nb:
                        s1 = ZERO
                        s2 = ZERO
                        for k in range(nu):
                            s1 += smem[cp_off + 2 * (tid * units + k)]
                            s2 += smem[cp_off + 2 * (tid * units + k) + 1]
                        part[0, j, b0 + tid, 0] = s1
                        part[0, j, b0 + tid, 1] = s2
            if q + 1 < q_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{CELL}_persistent_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_pointwise_fwd_gates(dtype: str):
    """Stepwise forward, first kernel of processing step s: one thread per (b, u).

    gx (T, B, 4H); lnp (2, 5H); ah (1, B, 4H) the host's h_{t-1} W_hh^T (masked h); hhat,
    gates (Tg, B, 4H) (Tg = T when save, else 1); c (T+1, B, H); ctil (B, H) written (c~);
    zone; rowstat (B, 2) the host's (mean_h, rstd_h); lengths; reverse, s, save, noise int32.
    """
    gates_unit, _, _, _, _ = make_layernorm(dtype)

    def kernel(gx, lnp, ah, hhat, gates, c, ctil, zone, rowstat, lengths, reverse, s, save,
               noise):
        idx = cuda.grid(1)
        T = gx.shape[0]
        B = c.shape[1]
        H = c.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, t_in, t_out = step_times(T, s, reverse)
            gates_unit(gx, lnp, ah, hhat, gates, c, ctil, zone, lengths, t, 0, t * save, t_in,
                       t_out, b, u, rowstat[b, 0], rowstat[b, 1], noise, save)

    kernel.__name__ = f"{CELL}_pointwise_fwd_gates_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_pointwise_fwd_out(dtype: str):
    """Stepwise forward, second kernel: h_t and y_t from c~ and the host's (mean_c, rstd_c)
    in rowstat (B, 2). gates (Tg, B, 4H); ctil (B, H); h (T+1, B, H), y (T, B, H) written."""
    _, out_unit, _, _, _ = make_layernorm(dtype)
    ZERO = NP_COMPUTE[dtype](0)

    def kernel(gates, ctil, h, y, lnp, zone, rowstat, lengths, reverse, s, save, noise):
        idx = cuda.grid(1)
        T = y.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, t_in, t_out = step_times(T, s, reverse)
            hv = out_unit(gates, ctil, h, lnp, zone, lengths, t, t * save, t_in, b, u,
                          rowstat[b, 0], rowstat[b, 1], noise)
            h[t_out, b, u] = hv
            y[t, b, u] = hv if t < lengths[b] else ZERO

    kernel.__name__ = f"{CELL}_pointwise_fwd_out_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_pointwise_bwd_c(dtype: str):
    """Stepwise backward, first kernel of processing step s: dH = dh_carry + dhrec (the host's
    (da_next W_hh) * mask), the c-side backward; writes dz[t, :, 3H+u], dl[t], dh_carry, and
    dchat, cprod = dchat*chat (B, H) for the host's row means."""
    _, _, bwd_c_unit, _, _ = make_layernorm(dtype)

    def kernel(gates, c, stats, lnp, zone, dy, dhrec, dh_carry, dz, dl, dchat, cprod, lengths,
               reverse, s, noise):
        idx = cuda.grid(1)
        T = dy.shape[0]
        B = c.shape[1]
        H = c.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, t_in, _ = step_times(T, s, reverse)
            dch, ch = bwd_c_unit(gates, c, stats, lnp, zone, dy, dh_carry, dz, dl, lengths, t,
                                 t_in, b, u, dh_carry[b, u] + dhrec[b, u], noise)
            dchat[b, u] = dch
            cprod[b, u] = dch * ch

    kernel.__name__ = f"{CELL}_pointwise_bwd_c_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_pointwise_bwd_gates(dtype: str):
    """Stepwise backward, second kernel: the LN-c backward with the host's row means (m1, m2)
    in rowstat (B, 2); writes dz[t, :, i f g] and dc_carry."""
    _, _, _, bwd_gates_unit, _ = make_layernorm(dtype)

    def kernel(gates, c, stats, lnp, zone, hhat, dz, dchat, dc_carry, rowstat, lengths, reverse, s,
               noise):
        idx = cuda.grid(1)
        T = dz.shape[0]
        B = c.shape[1]
        H = c.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, t_in, _ = step_times(T, s, reverse)
            bwd_gates_unit(gates, c, stats, lnp, zone, hhat, dz, dchat, dc_carry, lengths, t, t_in,
                           b, u, rowstat[b, 0], rowstat[b, 1], noise)

    kernel.__name__ = f"{CELL}_pointwise_bwd_gates_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


def signature(kind: str, dtype: str):
    """The Numba signature of a LayerNormLSTM kernel kind (arrays C-contiguous, scalars int32)."""
    c = NUMBA_COMPUTE[dtype]
    c2, c3, c4 = c[:, ::1], c[:, :, ::1], c[:, :, :, ::1]
    i1 = int32[::1]
    if kind == "persistent_fwd":
        # gx, w_hh, lnp, rmask, zone, h, c, gates, hhat, stats, y, ctil, part, lengths,
        # reverse, q_begin, q_end, units, save, batch_tile, noise
        return void(c3, c2, c2, c2, c4, c3, c3, c3, c3, c3, c3, c2, c4, i1, int32, int32, int32,
                    int32, int32, int32, int32)
    if kind == "persistent_bwd":
        # w_hh, lnp, rmask, zone, c, gates, hhat, stats, dy, dz, da, dl, dchat, dh_carry,
        # dc_carry, part, lengths, reverse, q_begin, q_end, units, batch_tile, noise
        return void(c2, c2, c2, c4, c3, c3, c3, c3, c3, c3, c3, c3, c2, c2, c2, c4, i1, int32,
                    int32, int32, int32, int32, int32)
    if kind == "pointwise_fwd_gates":
        # gx, lnp, ah, hhat, gates, c, ctil, zone, rowstat, lengths, reverse, s, save, noise
        return void(c3, c2, c3, c3, c3, c3, c2, c4, c2, i1, int32, int32, int32, int32)
    if kind == "pointwise_fwd_out":
        # gates, ctil, h, y, lnp, zone, rowstat, lengths, reverse, s, save, noise
        return void(c3, c2, c3, c3, c2, c4, c2, i1, int32, int32, int32, int32)
    if kind == "pointwise_bwd_c":
        # gates, c, stats, lnp, zone, dy, dhrec, dh_carry, dz, dl, dchat, cprod, lengths,
        # reverse, s, noise
        return void(c3, c3, c3, c2, c4, c3, c2, c2, c3, c3, c2, c2, i1, int32, int32, int32)
    if kind == "pointwise_bwd_gates":
        # gates, c, stats, lnp, zone, hhat, dz, dchat, dc_carry, rowstat, lengths, reverse, s,
        # noise
        return void(c3, c3, c3, c2, c4, c3, c3, c2, c2, c2, i1, int32, int32, int32)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")

_FACTORIES = {"persistent_fwd": make_fwd, "persistent_bwd": make_bwd,
              "pointwise_fwd_gates": make_pointwise_fwd_gates,
              "pointwise_fwd_out": make_pointwise_fwd_out,
              "pointwise_bwd_c": make_pointwise_bwd_c,
              "pointwise_bwd_gates": make_pointwise_bwd_gates}


@functools.lru_cache(maxsize=None)
def spec(kind: str, dtype: str) -> KernelSpec:
    """The specialization of one LayerNormLSTM kernel kind for dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    if kind not in _FACTORIES:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    func = _FACTORIES[kind](dtype)
    return KernelSpec(name=func.__name__, func=func, signature=signature(kind, dtype), cell=CELL,
                      kind=kind, dtype=dtype, grid_sync=kind.startswith("persistent"))


def specializations() -> list[KernelSpec]:
    """Every LayerNormLSTM kernel: float32/float64 x the six KINDS."""
    return [spec(kind, dtype) for dtype in DTYPES for kind in KINDS]
