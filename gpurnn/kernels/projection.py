"""Kernels of the LSTM projection (torch.nn.LSTM's proj_size): h_t = (o*tanh(c_t)) W_hr^T, for
the per-unit cells lstm, lstm_peephole, cifg, cifg_peephole (gpurnn.variants.LSTMForm
.kernel_cell). H hidden units (c, the gates), R projected features (h, y), G gates,
W_hh (G*H, R), W_hr (R, H). The per-unit cell math is cellmath.make(cell)'s, unchanged: its
fwd_unit writes m = o*tanh(c_t) where it would write h, into a (T+1, B, H) buffer, and its
bwd_unit takes dL/dm through its dy argument.

Ownership and barriers:
  Grid      P blocks, 1-D. Block j owns hidden units U_j = [j*U, min((j+1)*U, H)),
            U = `units` = ceil(H/P), and projected features Q_j = [j*Q, min((j+1)*Q, R)),
            Q = `feats` = ceil(R/P); a block may own no unit or no feature and then only takes
            part in the barriers (every barrier is reached by every thread of every block).
  Forward   shared memory, loaded once per launch (rows padded, layout.padded_row, so that
            the lanes of a group and the groups of a warp read distinct banks):
              w_hh rows  whh[(g*U + k)*S1 + m] = W_hh[g*H + j*U + k, m]   (G*U rows, S1 >= R)
              w_hr rows  whr[k*S2 + m] = W_hr[j*Q + k, m]                 (Q rows, S2 >= H)
            then the compute regions: stage (bt*max(R, H)), pre (bt*G*U), scratch (threads).
            Per step, two phases, a grid barrier after each:
              phase 1, per batch tile of bt rows: stage h_in (bt x R) -> syncthreads -> a
                group of L1 lanes per (b, g, k) forms the R-long recurrent pre-activation
                (partials in scratch, syncthreads, lane 0 adds them in lane order) ->
                syncthreads -> thread per (b, k): cellmath's fwd_unit writes c, gates and
                m[t_out, b, u] (h_in is passed as 0: a masked row's m is 0 and never read).
                No barrier between tiles: the pointwise update reads `pre` only, which the
                next tile rewrites after its staging barrier.
              grid barrier: every block's m before any block projects it.
              phase 2, per tile: (between tiles with L2 = 1: syncthreads, the last tile's dot
                products read the stage) stage m[t_out] (bt x H) -> syncthreads -> a group of
                L2 lanes per (b, q) forms h_out[b, q] = W_hr[q, :] . m[b, :] (scratch and
                syncthreads with L2 > 1); lane 0 writes h[t_out, b, q] and y[t, b, q]: on
                masked steps h_in and 0.
              grid barrier (not after the launch's last step): the next step stages every
                block's h_out.
            Block barriers per step: n_tiles x (2, 3 with L1 > 1) in phase 1, n_tiles x
            (1, 2 with L2 > 1) + (n_tiles - 1 with L2 = 1) in phase 2; 2 grid barriers.
  Backward  (BPTT) shared memory, once per launch:
              w_hh cols  wa[k*SA + row] = W_hh[row, j*Q + k]   (Q columns, SA >= G*H)
              w_hr cols  wb[k*SB + q] = W_hr[q, j*U + k]       (U columns, SB >= R)
            then stage (bt*max(G*H, R)) and scratch (threads).
            Phase kk = 0..T (s = T-1-kk; kk = T is the tail that only finishes dh0):
              phase A, per q, per tile: stage dgh of the step processed in phase kk-1
                (bt x G*H; none in phase 0) -> syncthreads -> dh_rec = W_hh[:, q]^T dgh[b]
                (lanes LA, scratch as above) -> lane 0: dh = dh_carry + dh_rec; active row:
                dhp[t, b, q] = dh + dy[t, b, q], dh_carry = 0; masked row: dhp = 0,
                dh_carry = dh (h copied through); tail: dh_carry = dh (dL/dh0).
                Between tiles a syncthreads where the next tile's writes would meet this
                tile's reads (staging with LA = 1, scratch with LA > 1 and no staging).
              grid barrier (not in the tail): every feature's dhp before any unit uses it.
              phase B, per u, per tile: (between tiles with LB = 1: syncthreads) stage
                dhp[t] (bt x R) -> syncthreads -> dm = W_hr[:, u]^T dhp[b] (lanes LB) ->
                lane 0 writes dm[t, b, u] and runs cellmath's bwd_unit with dh = 0 and
                dy = dm (it adds dm on active steps), writing dgh[t, b, :u] and dc_carry.
              grid barrier (not after the launch's last phase): the next phase stages every
                block's dgh.
            Grid barriers per step: 2 (the tail: none). Block barriers per step:
            n_tiles x (1, 2 with L > 1) per phase (phase A of phase 0 stages nothing: one
            fewer per tile), plus the between-tile ones.
            dW_hh, dW_hr, dW_ih, db, dW_ch and dx are the host's GEMMs afterwards (from
            dgh, dhp, the saved h, c, gates and m recomputed as o*tanh(c)).
  Lanes     as gpurnn.kernels.persistent: L = the largest power of two <= 32 with
            L x outputs <= threads for the nominal tile (layout.lanes_per_output), one per
            phase; with L > 1 a tile's dot products take one round, so rounds need no barrier.
            Every partial sum is added in a fixed order: deterministic, no atomics.
  Threads   any multiple of 32; every loop strides by blockDim.x.
Stepwise  per step the host's GEMMs (h_in W_hh^T before `proj_pointwise_fwd`, m W_hr^T and the
          masked copy after it; backward dh = carry + dgh_next W_hh + dy and the masking, then
          dm = dhp W_hr before `proj_pointwise_bwd`): 1-D grid over the B*H (b, u), no shared
          memory, no barriers (the kernel boundary is the step's barrier).
Float32 and float64 only (the LSTM variants' dtypes): weights and every shared region in
the one dtype.
"""
from __future__ import annotations

import functools

from numba import cuda, int32, void

from . import cellmath
from .cellmath import NUMBA_COMPUTE, step_times
from .dtypes import NP_COMPUTE, SHORT
from .layout import KernelSpec, lanes_per_output, padded_row
# the persistent kernels' device helpers: the grid intrinsics, the lane split, a block's share
# of units (here also of projected features) and the padded row stride
from .persistent import _grid_group_sync, _this_grid
from .persistent import _lane_split as _lanes
from .persistent import _owned_units as _owned
from .persistent import _padded_row as _row_stride

CELLS = ("lstm", "lstm_peephole", "cifg", "cifg_peephole")
GATES = {"lstm": 4, "lstm_peephole": 4, "cifg": 3, "cifg_peephole": 3}
DTYPES = ("float32", "float64")
KINDS = ("proj_persistent_fwd", "proj_persistent_bwd", "proj_pointwise_fwd",
         "proj_pointwise_bwd")
# Registers per thread the projection kernels are held to (tests/test_sim_projection.py checks
# ptxas' counts against it): the persistent ones, with both phases' dot products unrolled,
# take up to ~250 on sm_80/sm_90 (the registry kernels' layout.KERNEL_REGS_MAX is 192), so a
# persistent projection block has at most 256 threads (65536 / 256); the plan refuses more.
REGS_MAX = 255

# ---- the shared-memory contract (host side; the kernels compute the same on the device) ----

def slices(hidden: int, proj: int, blocks: int):
    """(U, Q): hidden units and projected features per block."""
    return -(-hidden // blocks), -(-proj // blocks)


def _regions(direction, gates, hidden, proj, batch_tile, blocks, threads):
    U, Q = slices(hidden, proj, blocks)
    if direction == "fwd":
        s1 = padded_row(proj, lanes_per_output(batch_tile * gates * U, threads))
        s2 = padded_row(hidden, lanes_per_output(batch_tile * Q, threads))
        weights = gates * U * s1 + Q * s2
        return weights, batch_tile * max(proj, hidden) + batch_tile * gates * U + threads
    if direction == "bwd":
        sa = padded_row(gates * hidden, lanes_per_output(batch_tile * Q, threads))
        sb = padded_row(proj, lanes_per_output(batch_tile * U, threads))
        weights = Q * sa + U * sb
        return weights, batch_tile * max(gates * hidden, proj) + threads
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


def smem_elements(direction, gates, hidden, proj, batch_tile, blocks, *, threads):
    """Elements of dynamic shared memory of one block of the persistent projection kernels:
    both weight slices, the stage, (forward) the pre-activations, and the scratch."""
    w, rest = _regions(direction, gates, hidden, proj, batch_tile, blocks, threads)
    return w + rest


def smem_bytes(direction, gates, hidden, proj, batch_tile, blocks, dtype, *, threads):
    """smem_elements in bytes for a dtype name (float32 | float64)."""
    return smem_elements(direction, gates, hidden, proj, batch_tile, blocks,
                         threads=threads) * NP_COMPUTE[dtype](0).itemsize


def _check(cell, dtype):
    if cell not in GATES:
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")


# ---- persistent kernels ----

@functools.lru_cache(maxsize=None)
def make_persistent_fwd(cell: str, dtype: str):
    """The persistent projection forward for cell, dtype (a plain function, cuda.jit-able).

    Arguments (C-contiguous, all in the dtype but lengths):
      gx       (T, B, G*H)  input projection with the folded biases; read only
      w_hh     (G*H, R)     read once per launch;  w_hr (R, H) likewise
      b_rec    peephole vector weight_ch (peephole cells), else a (1,) placeholder
      h        (T+1, B, R)  boundary states, h0 at h[0] (h[T] reverse) on entry
      c        (T+1, B, H)  cell states, c0 placed like h0
      gates    (T, B, G*H)  written when save_gates, else a (1,1,1) placeholder
      y        (T, B, R)    written (0 on masked steps)
      m        (T+1, B, H)  scratch: o*tanh(c_t) at m[t_out] (fwd_unit's h)
      m_y      (T, B, H)    scratch written by fwd_unit as its y; never read
      lengths  int32 (B,);  reverse, t_begin, t_end, units, feats, save_gates, batch_tile int32
    No argument may alias another. Dynamic shared memory:
    smem_bytes('fwd', G, H, R, batch_tile, P, dtype, threads=...).
    """
    _check(cell, dtype)
    G = GATES[cell]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    ZERO = NP_COMPUTE[dtype](0)
    fwd_unit, _ = cellmath.make(cell, dtype)

    def kernel(gx, w_hh, w_hr, b_rec, h, c, gates, y, m, m_y, lengths, reverse, t_begin, t_end,
               units, feats, save_gates, batch_tile):
        grid = _this_grid()
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = gx.shape[0]
        B = h.shape[1]
        R = h.shape[2]
        H = c.shape[2]
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        u0, nu = _owned(units, H)
        q0, nq = _owned(feats, R)
        gu = G * units
        l1, g1 = _lanes(batch_tile * gu, stride)
        l2, g2 = _lanes(batch_tile * feats, stride)
        lane1 = tid % l1
        lane2 = tid % l2
        row1 = _row_stride(R, l1)
        row2 = _row_stride(H, l2)
        hr_off = gu * row1
        st_off = hr_off + feats * row2
        pre_off = st_off + batch_tile * max(R, H)
        scr_off = pre_off + batch_tile * gu

        for idx in range(tid, G * nu * R, stride):          # coalesced over the columns
            col = idx % R
            row = idx // R
            k = row % nu
            g = row // nu
            smem[(g * units + k) * row1 + col] = w_hh[g * H + u0 + k, col]
        for idx in range(tid, nq * H, stride):
            col = idx % H
            k = idx // H
            smem[hr_off + k * row2 + col] = w_hr[q0 + k, col]
        # no barrier here: the slices are first read after a staging barrier

        for s in range(t_begin, t_end):
            t, t_in, t_out = step_times(T, s, reverse)
            # phase 1: the cell, per owned unit
            for b0 in range(0, B, batch_tile):
                nb = min(batch_tile, B - b0)
                for idx in range(tid, nb * R, stride):
                    smem[st_off + idx] = h[t_in, b0 + idx // R, idx % R]
                cuda.syncthreads()
                n_out = nb * G * nu
                for rnd in range((n_out + g1 - 1) // g1):
                    oi = rnd * g1 + tid // l1
                    k = 0
                    g = 0
                    b = 0
                    acc = ZERO
                    if oi < n_out:
                        k = oi % nu
                        bg = oi // nu
                        g = bg % G
                        b = bg // G
                        w_at = (g * units + k) * row1
                        h_at = st_off + b * R
                        for col in range(lane1, R, l1):
                            acc += smem[w_at + col] * smem[h_at + col]
                    if l1 == 1:
                        if oi < n_out:
                            smem[pre_off + (b * G + g) * units + k] = acc
                    else:
                        smem[scr_off + tid] = acc
                        cuda.syncthreads()
                        if lane1 == 0 and oi < n_out:
                            total = ZERO
                            for q in range(l1):             # fixed order: deterministic
                                total += smem[scr_off + tid + q]
                            smem[pre_off + (b * G + g) * units + k] = total
                cuda.syncthreads()                          # `pre` before the update
                for idx in range(tid, nb * nu, stride):
                    k = idx % nu
                    b = idx // nu
                    p = pre_off + b * gu + k
                    r0 = smem[p]
                    r1 = smem[p + units]
                    r2 = smem[p + 2 * units]
                    r3 = ZERO
                    if G > 3:
                        r3 = smem[p + 3 * units]
                    fwd_unit(gx, b_rec, m, c, gates, m_y, lengths, t, t_in, t_out, b0 + b,
                             u0 + k, r0, r1, r2, r3, ZERO, save_gates)
            _grid_group_sync(grid)                          # every unit's m
            # phase 2: the projection, per owned feature
            for b0 in range(0, B, batch_tile):
                nb = min(batch_tile, B - b0)
                if b0 > 0 and l2 == 1:
                    cuda.syncthreads()      # the last tile's dot products read the stage
                for idx in range(tid, nb * H, stride):
                    smem[st_off + idx] = m[t_out, b0 + idx // H, idx % H]
                cuda.syncthreads()
                n_out = nb * nq
                for rnd in range((n_out + g2 - 1) // g2):
                    oi = rnd * g2 + tid // l2
                    k = 0
                    b = 0
                    acc = ZERO
                    if oi < n_out:
                        k = oi % nq
                        b = oi // nq
                        w_at = hr_off + k * row2
                        m_at = st_off + b * H
                        for col in range(lane2, H, l2):
                            acc += smem[w_at + col] * smem[m_at + col]
                    if l2 > 1:
                        smem[scr_off + tid] = acc
                        cuda.syncthreads()
                        if lane2 == 0 and oi < n_out:
                            acc = ZERO
                            for q in range(l2):
                                acc += smem[scr_off + tid + q]
                    if lane2 == 0 and oi < n_out:
                        bb = b0 + b
                        q = q0 + k
                        if t < lengths[bb]:
                            h[t_out, bb, q] = acc
                            y[t, bb, q] = acc
                        else:
                            h[t_out, bb, q] = h[t_in, bb, q]
                            y[t, bb, q] = ZERO
            if s + 1 < t_end:
                _grid_group_sync(grid)                      # every feature's h_out

    kernel.__name__ = f"{cell}_proj_persistent_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_persistent_bwd(cell: str, dtype: str):
    """The persistent projection backward (BPTT) for cell, dtype.

    Arguments (C-contiguous, all in the dtype but lengths):
      w_hh (G*H, R), w_hr (R, H)  read once per launch (columns of the owned slices)
      b_rec      as the forward's
      h_shape    (1, 1, H) placeholder: bwd_unit's h (it reads only the shape)
      c, gates   the forward's saved c (T+1, B, H) and gates (T, B, G*H); read only
      dy         (T, B, R) read only
      dgh        (T, B, G*H) written (read back by every block one phase later)
      dgx        (1, 1, 1) placeholder (bwd_unit's GRU argument)
      dhp        (T, B, R) written: dL/dh_out of active rows (0 on masked ones)
      dm         (T, B, H) written: dL/dm, fed to bwd_unit as its dy
      dh_carry   (B, R) in dL/dh_n, out dL/dh0
      dh_unit    (B, H) scratch: bwd_unit's dh_carry (0 or its dh = 0)
      dc_carry   (B, H) in dL/dc_n, out dL/dc0
      lengths int32 (B,); reverse, k_begin, k_end, units, feats, batch_tile int32
    No argument may alias another. Dynamic shared memory:
    smem_bytes('bwd', G, H, R, batch_tile, P, dtype, threads=...).
    """
    _check(cell, dtype)
    G = GATES[cell]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    ZERO = NP_COMPUTE[dtype](0)
    _, bwd_unit = cellmath.make(cell, dtype)

    def kernel(w_hh, w_hr, b_rec, h_shape, c, gates, dy, dgh, dgx, dhp, dm, dh_carry, dh_unit,
               dc_carry, lengths, reverse, k_begin, k_end, units, feats, batch_tile):
        grid = _this_grid()
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = dy.shape[0]
        B = dy.shape[1]
        R = dy.shape[2]
        H = c.shape[2]
        GH = G * H
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        u0, nu = _owned(units, H)
        q0, nq = _owned(feats, R)
        la, ga = _lanes(batch_tile * feats, stride)
        lb, gb = _lanes(batch_tile * units, stride)
        lane_a = tid % la
        lane_b = tid % lb
        row_a = _row_stride(GH, la)
        row_b = _row_stride(R, lb)
        wb_off = feats * row_a
        st_off = wb_off + units * row_b
        scr_off = st_off + batch_tile * max(GH, R)

        for idx in range(tid, GH * nq, stride):             # coalesced over k
            k = idx % nq
            row = idx // nq
            smem[k * row_a + row] = w_hh[row, q0 + k]
        for idx in range(tid, R * nu, stride):
            k = idx % nu
            q = idx // nu
            smem[wb_off + k * row_b + q] = w_hr[q, u0 + k]
        # no barrier here: the columns are first read after a staging barrier

        for kk in range(k_begin, k_end):
            s = T - 1 - kk          # processing step of this phase; -1 in the dh0 tail
            has_next = kk > 0       # uniform over the grid
            t_next = T - 2 - s if reverse else s + 1
            t, t_in, t_out = step_times(T, s, reverse)
            # phase A: dL/dh_out per owned feature
            for b0 in range(0, B, batch_tile):
                nb = min(batch_tile, B - b0)
                if b0 > 0 and (la == 1) == has_next:
                    cuda.syncthreads()
                if has_next:
                    for idx in range(tid, nb * GH, stride):
                        smem[st_off + idx] = dgh[t_next, b0 + idx // GH, idx % GH]
                    cuda.syncthreads()
                n_out = nb * nq
                for rnd in range((n_out + ga - 1) // ga):
                    oi = rnd * ga + tid // la
                    rec = ZERO
                    if oi < n_out and has_next:
                        w_at = (oi % nq) * row_a
                        dg_at = st_off + (oi // nq) * GH
                        for row in range(lane_a, GH, la):
                            rec += smem[w_at + row] * smem[dg_at + row]
                    if la > 1:
                        smem[scr_off + tid] = rec
                        cuda.syncthreads()
                        if lane_a == 0 and oi < n_out:
                            rec = ZERO
                            for q in range(la):             # fixed order: deterministic
                                rec += smem[scr_off + tid + q]
                    if lane_a == 0 and oi < n_out:
                        bb = b0 + oi // nq
                        q = q0 + oi % nq
                        dh = dh_carry[bb, q] + rec
                        if s < 0:
                            dh_carry[bb, q] = dh
                        elif t < lengths[bb]:
                            dhp[t, bb, q] = dh + dy[t, bb, q]
                            dh_carry[bb, q] = ZERO
                        else:
                            dhp[t, bb, q] = ZERO
                            dh_carry[bb, q] = dh
            if s >= 0:
                _grid_group_sync(grid)                      # every feature's dhp
                # phase B: dL/dm and the cell's backward per owned unit
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if b0 > 0 and lb == 1:
                        cuda.syncthreads()  # the last tile's dot products read the stage
                    for idx in range(tid, nb * R, stride):
                        smem[st_off + idx] = dhp[t, b0 + idx // R, idx % R]
                    cuda.syncthreads()
                    n_out = nb * nu
                    for rnd in range((n_out + gb - 1) // gb):
                        oi = rnd * gb + tid // lb
                        acc = ZERO
                        if oi < n_out:
                            w_at = wb_off + (oi % nu) * row_b
                            d_at = st_off + (oi // nu) * R
                            for q in range(lane_b, R, lb):
                                acc += smem[w_at + q] * smem[d_at + q]
                        if lb > 1:
                            smem[scr_off + tid] = acc
                            cuda.syncthreads()
                            if lane_b == 0 and oi < n_out:
                                acc = ZERO
                                for q in range(lb):
                                    acc += smem[scr_off + tid + q]
                        if lane_b == 0 and oi < n_out:
                            bb = b0 + oi // nu
                            u = u0 + oi % nu
                            dm[t, bb, u] = acc
                            bwd_unit(b_rec, h_shape, c, gates, dm, dgh, dgx, dh_unit, dc_carry,
                                     lengths, t, t_in, t_out, bb, u, ZERO)
            if kk + 1 < k_end:
                _grid_group_sync(grid)                      # every unit's dgh

    kernel.__name__ = f"{cell}_proj_persistent_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


# ---- stepwise (pointwise) kernels ----

@functools.lru_cache(maxsize=None)
def make_pointwise_fwd(cell: str, dtype: str):
    """The cell of processing step s, one thread per (b, u), on the host's gh = h_in W_hh^T:
    kernel(gx, gh (B, G*H), b_rec, m (T+1, B, H), c, gates, m_y (T, B, H), lengths, reverse, s,
    save_gates). Writes c[t_out], gates[t] (when save_gates) and m[t_out] (0 on masked rows);
    the host then forms h_out = m W_hr^T and the masked copy. No argument may alias another."""
    _check(cell, dtype)
    G = GATES[cell]
    ZERO = NP_COMPUTE[dtype](0)
    fwd_unit, _ = cellmath.make(cell, dtype)

    def kernel(gx, gh, b_rec, m, c, gates, m_y, lengths, reverse, s, save_gates):
        idx = cuda.grid(1)
        T = gx.shape[0]
        B = c.shape[1]
        H = c.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, t_in, t_out = step_times(T, s, reverse)
            r3 = ZERO
            if G > 3:
                r3 = gh[b, 3 * H + u]
            fwd_unit(gx, b_rec, m, c, gates, m_y, lengths, t, t_in, t_out, b, u, gh[b, u],
                     gh[b, H + u], gh[b, 2 * H + u], r3, ZERO, save_gates)

    kernel.__name__ = f"{cell}_proj_pointwise_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_pointwise_bwd(cell: str, dtype: str):
    """The cell's backward of processing step s, one thread per (b, u), on the host's
    dm[t] = dhp[t] W_hr: kernel(b_rec, h_shape (1, 1, H), c, gates, dm (T, B, H), dgh, dgx,
    dh_unit (B, H), dc_carry, lengths, reverse, s). Writes dgh[t] and dc_carry. No argument
    may alias another."""
    _check(cell, dtype)
    ZERO = NP_COMPUTE[dtype](0)
    _, bwd_unit = cellmath.make(cell, dtype)

    def kernel(b_rec, h_shape, c, gates, dm, dgh, dgx, dh_unit, dc_carry, lengths, reverse, s):
        idx = cuda.grid(1)
        T = dm.shape[0]
        B = c.shape[1]
        H = c.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, t_in, t_out = step_times(T, s, reverse)
            bwd_unit(b_rec, h_shape, c, gates, dm, dgh, dgx, dh_unit, dc_carry, lengths, t, t_in,
                     t_out, b, u, ZERO)

    kernel.__name__ = f"{cell}_proj_pointwise_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


# ---- the specializations ----

def signature(kind: str, dtype: str):
    """The Numba signature of a projection kernel kind (every array C-contiguous, scalars
    int32, everything in the one dtype)."""
    d = NUMBA_COMPUTE[dtype]
    d1, d2, d3 = d[::1], d[:, ::1], d[:, :, ::1]
    i1 = int32[::1]
    i = int32
    if kind == "proj_persistent_fwd":
        # gx, w_hh, w_hr, b_rec, h, c, gates, y, m, m_y, lengths, reverse, t_begin, t_end,
        # units, feats, save_gates, batch_tile
        return void(d3, d2, d2, d1, d3, d3, d3, d3, d3, d3, i1, i, i, i, i, i, i, i)
    if kind == "proj_persistent_bwd":
        # w_hh, w_hr, b_rec, h_shape, c, gates, dy, dgh, dgx, dhp, dm, dh_carry, dh_unit,
        # dc_carry, lengths, reverse, k_begin, k_end, units, feats, batch_tile
        return void(d2, d2, d1, d3, d3, d3, d3, d3, d3, d3, d3, d2, d2, d2, i1, i, i, i, i, i, i)
    if kind == "proj_pointwise_fwd":
        # gx, gh, b_rec, m, c, gates, m_y, lengths, reverse, s, save_gates
        return void(d3, d2, d1, d3, d3, d3, d3, i1, i, i, i)
    if kind == "proj_pointwise_bwd":
        # b_rec, h_shape, c, gates, dm, dgh, dgx, dh_unit, dc_carry, lengths, reverse, s
        return void(d1, d3, d3, d3, d3, d3, d3, d2, d2, i1, i, i)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


_FACTORIES = {
    "proj_persistent_fwd": make_persistent_fwd,
    "proj_persistent_bwd": make_persistent_bwd,
    "proj_pointwise_fwd": make_pointwise_fwd,
    "proj_pointwise_bwd": make_pointwise_bwd,
}


@functools.lru_cache(maxsize=None)
def spec(cell: str, kind: str, dtype: str) -> KernelSpec:
    """The KernelSpec of one projection kernel."""
    _check(cell, dtype)
    if kind not in _FACTORIES:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    func = _FACTORIES[kind](cell, dtype)
    return KernelSpec(name=func.__name__, func=func, signature=signature(kind, dtype), cell=cell,
                      kind=kind, dtype=dtype, grid_sync="persistent" in kind)


def specializations() -> list:
    """Every projection kernel: 4 cells x float32/float64 x 4 kinds (32 kernels)."""
    return [spec(cell, kind, dtype) for cell in CELLS for dtype in DTYPES for kind in KINDS]
