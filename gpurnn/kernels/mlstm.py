"""The multiplicative LSTM's kernels (mLSTM, Krause et al. 2016; math: gpurnn/variants.py):
    m_t = (x_t W_mx^T) * (h_{t-1} W_mh^T)          W_mx (H, I), W_mh (H, H), no bias
    gates = x_t W_ih^T + b_ih + m_t W_hh^T + b_hh   W_hh (4H, H) acts on m, not on h
then the LSTM's per-unit math (cellmath.make("lstm", dtype), not rewritten here). The host
forms Gx = x W_ih^T + b_ih + b_hh and mx = x W_mx^T for all T*B rows (two GEMMs) first.

Ownership: block j of P owns the unit slice U_j = [j*U, min((j+1)*U, H)), U = ceil(H/P)
(gpurnn.kernels.layout), the same slice of m as of h and c; a block past H owns none and only
joins the barriers. The batch is staged in tiles of bt rows (the plan's batch_tile).

Persistent forward: half-steps q in [q_begin, q_end) of [0, 2T), step s = q // 2, phase q % 2.
Every gate needs the whole m_t, and m_t needs the whole h_{t-1}: TWO grid barriers per step.
  phase 1 (m)      stage h_{t-1} of the tile; mh[b, u] = sum_k W_mh[u, k] h_{t-1}[b, k] for
                   u in U_j (W_mh rows of U_j in shared memory); m[b, u] = mx[t, b, u] * mh into
                   the (B, H) buffer `m` (and the saved mh) -> grid barrier
  phase 2 (gates)  stage m of the tile; the 4 recurrent pre-activations of U_j from the W_hh
                   rows of U_j (shared memory), the LSTM's fwd_unit (h_in from global) -> grid
                   barrier
Persistent backward: half-phases q in [q_begin, q_end) of [0, 2T+1), kk = q // 2 the kk-th step
taken backward (s = T-1-kk; s = -1 in the tail that only finishes dh0). Two grid barriers a
step, for the same reason turned round: dm needs every unit's gate gradients, and dh_{t-1}
needs every unit's dmh.
  phase A (q even) stage dmh of the step processed before (has_next); dh = carry +
                   sum_k dmh[b, k] W_mh[k, u] (W_mh columns of U_j); the LSTM's bwd_unit ->
                   dgh[t] of U_j and the carries; in the tail dh0 = carry + that sum -> grid
  phase B (q odd)  stage dgh[t] of the tile; dm[b, k] = sum_row W_hh[row, k] dgh[t, b, row]
                   (W_hh columns of U_j); dmh = dm * mx, dmx = dm * mh, both exactly 0 on
                   masked steps (so a NaN in padded x never reaches a gradient) -> grid
Weight gradients and dx are the host's GEMMs afterwards (gpurnn.backends.cuda_mlstm).
Shared memory (smem_bytes below, the model the plan sizes by; weights first, then compute
values from the first compute-aligned element): forward W_mh rows U x S(H, L1) | W_hh rows
4U x S(H, L2) | staged h or m bt x H | pre-activations bt x 4U | scratch one per thread;
backward W_mh columns U x S(H, L) | W_hh columns U x S(4H, L) | staged dmh or dgh bt x 4H |
scratch. S = layout.padded_row (bank-conflict-free rows), L = layout.lanes_per_output of the
phase's nominal outputs (L1 of bt*U, L2 of bt*4U, L of bt*U): a dot product is split over L
lanes whose partial sums meet in the scratch and are added by lane 0 in lane order —
deterministic, no atomics, no shuffles.
Block barriers, per batch tile: one after each staging (and its weights, loaded once per
launch, are first read after it); with L > 1 one before lane 0 reads the scratch (one round:
L x outputs <= threads); forward phase 2 one before the pointwise update reads `pre`; between
tiles one only where the next tile's writes could meet this tile's reads (phase 1 and phase B
with L = 1; phase A where (L = 1) == has_next, as gpurnn.kernels.persistent). Every barrier is
reached by every thread of a block the same number of times (loop bounds uniform per block).
tests/test_sim_mlstm.py deletes each one in turn.
Registers: each phase recomputes its lane split and offsets instead of keeping both phases'
live across the step loop (that cost ~50 registers on sm_80, past layout.KERNEL_REGS_MAX).
Stepwise path: the host's GEMMs per step and the plain LSTM's pointwise kernels
(gpurnn.kernels.pointwise), plus `make_pointwise_dm` below for the backward's dm split.
"""
from __future__ import annotations

import functools

from numba import cuda, int32, void

from . import cellmath
from .cellmath import NUMBA_COMPUTE, NUMBA_STORAGE, codec, step_times
from .dtypes import ITEMSIZE, NP_COMPUTE, SHORT
from .layout import KernelSpec, lanes_per_output, padded_row
from .persistent import _grid_group_sync, _lane_split, _owned_units, _padded_row, _this_grid

CELL = "mlstm"
GATES = 4
DTYPES = ("float32", "float64")       # the LSTM variants run in these (gpurnn.variants)
KINDS = ("persistent_fwd", "persistent_bwd", "pointwise_dm")


def smem_regions(direction: str, hidden: int, batch_tile: int, units: int, threads: int):
    """(weight elements, compute elements) of one persistent block's dynamic shared memory."""
    if direction == "fwd":
        row_m = padded_row(hidden, lanes_per_output(batch_tile * units, threads))
        row_g = padded_row(hidden, lanes_per_output(batch_tile * GATES * units, threads))
        weights = units * row_m + GATES * units * row_g
        return weights, batch_tile * hidden + batch_tile * GATES * units + threads
    if direction == "bwd":
        lanes = lanes_per_output(batch_tile * units, threads)
        weights = units * padded_row(hidden, lanes) + units * padded_row(GATES * hidden, lanes)
        return weights, batch_tile * GATES * hidden + threads
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


def smem_bytes(direction: str, hidden: int, batch_tile: int, units: int, dtype: str, *,
               threads: int) -> int:
    """Bytes of dynamic shared memory one persistent mLSTM block is launched with."""
    weights, rest = smem_regions(direction, hidden, batch_tile, units, threads)
    w_bytes, c_bytes = ITEMSIZE[dtype], NP_COMPUTE[dtype](0).itemsize
    return -(-weights * w_bytes // c_bytes) * c_bytes + rest * c_bytes


@functools.lru_cache(maxsize=None)
def make_fwd(dtype: str):
    """The persistent mLSTM forward for dtype (a plain function, cuda.jit-able).

    Arguments (C-contiguous, none aliasing another; [S] storage dtype, else compute dtype —
    the same at float32/float64):
      gx       (T, B, 4H)  x W_ih^T + b_ih + b_hh; read only
      mx       (T, B, H)   x W_mx^T; read only
      w_mh     (H, H)      [S] read only, rows of U_j once per launch
      w_hh     (4H, H)     [S] read only, rows of every gate of U_j once per launch
      b_rec    (1,)        the cell math's b_rec, unused by the LSTM: a placeholder
      h        (T+1, B, H) [S] h0 at h[0] (forward) / h[T] (reverse) on entry; written
      c        (T+1, B, H) c0 placed like h0; written
      gates    (T, B, 4H)  [S] activated gates, written when save; else a (1,1,1) placeholder
      y        (T, B, H)   [S] written (0 on masked steps)
      mh       (T, B, H)   h_{t-1} W_mh^T, written when save; else a (1,1,1) placeholder
      m        (B, H)      the step's m, a buffer written in phase 1, read in phase 2
      lengths  int32 (B,) ; reverse, q_begin, q_end (half-steps), units, save, batch_tile: int32
    Dynamic shared memory: smem_bytes('fwd', H, batch_tile, units, dtype, threads=...).
    """
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    W_SMEM_TYPE = NUMBA_STORAGE[dtype]
    W_BYTES, C_BYTES = ITEMSIZE[dtype], DT(0).itemsize
    LOAD, _ = codec(dtype)
    ZERO = DT(0)
    fwd_unit, _ = cellmath.make("lstm", dtype)

    def kernel(gx, mx, w_mh, w_hh, b_rec, h, c, gates, y, mh, m, lengths, reverse, q_begin,
               q_end, units, save, batch_tile):
        grid = _this_grid()
        wsm = cuda.shared.array(0, dtype=W_SMEM_TYPE)     # one buffer: weights, then compute
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = gx.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        u0, nu = _owned_units(units, H)
        gu = 4 * units
        # the layout (smem_regions); each phase recomputes its own lane split and offsets, as
        # keeping both phases' live across the step loop cost ~50 registers on sm_80
        row_m = _padded_row(H, _lane_split(batch_tile * units, stride)[0])
        row_g = _padded_row(H, _lane_split(batch_tile * gu, stride)[0])
        wg_off = units * row_m
        st_off = ((wg_off + gu * row_g) * W_BYTES + C_BYTES - 1) // C_BYTES

        # consecutive threads read consecutive columns of one row: coalesced
        for idx in range(tid, nu * H, stride):
            k = idx // H
            col = idx % H
            wsm[k * row_m + col] = w_mh[u0 + k, col]
        for idx in range(tid, 4 * nu * H, stride):
            col = idx % H
            row = idx // H
            k = row % nu
            g = row // nu
            wsm[wg_off + (g * units + k) * row_g + col] = w_hh[g * H + u0 + k, col]
        # no barrier here: the weights are first read after a staging barrier

        for q in range(q_begin, q_end):
            t, t_in, t_out = step_times(T, q // 2, reverse)
            if q % 2 == 0:
                # phase 1: mh and m of the block's units
                lanes_m, groups_m = _lane_split(batch_tile * units, stride)
                lane_m = tid % lanes_m
                row_m = _padded_row(H, lanes_m)
                scr_off = st_off + batch_tile * H + batch_tile * gu
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if b0 > 0 and lanes_m == 1:
                        cuda.syncthreads()      # the last tile's dot products read h_prev
                    for idx in range(tid, nb * H, stride):
                        smem[st_off + idx] = LOAD(h[t_in, b0 + idx // H, idx % H])
                    cuda.syncthreads()
                    n_out = nb * nu
                    for rnd in range((n_out + groups_m - 1) // groups_m):
                        oi = rnd * groups_m + tid // lanes_m
                        acc = ZERO
                        if oi < n_out:
                            w_at = (oi % nu) * row_m
                            h_at = st_off + (oi // nu) * H
                            for col in range(lane_m, H, lanes_m):
                                acc += LOAD(wsm[w_at + col]) * smem[h_at + col]
                        if lanes_m > 1:
                            smem[scr_off + tid] = acc
                            cuda.syncthreads()
                            if lane_m == 0 and oi < n_out:
                                acc = ZERO
                                for j in range(lanes_m):        # fixed order: deterministic
                                    acc += smem[scr_off + tid + j]
                        if lane_m == 0 and oi < n_out:
                            b = b0 + oi // nu
                            u = u0 + oi % nu
                            if save:
                                mh[t, b, u] = acc
                            m[b, u] = mx[t, b, u] * acc
            else:
                # phase 2: the gates of the block's units from the whole m
                lanes_g, groups_g = _lane_split(batch_tile * gu, stride)
                lane_g = tid % lanes_g
                row_g = _padded_row(H, lanes_g)
                wg_off = units * _padded_row(H, _lane_split(batch_tile * units, stride)[0])
                pre_off = st_off + batch_tile * H
                scr_off = pre_off + batch_tile * gu
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    # no barrier between tiles: the update reads h_in from global, and `pre`
                    # and the scratch are rewritten only after the staging barrier below
                    for idx in range(tid, nb * H, stride):
                        smem[st_off + idx] = m[b0 + idx // H, idx % H]
                    cuda.syncthreads()
                    n_out = nb * 4 * nu
                    for rnd in range((n_out + groups_g - 1) // groups_g):
                        oi = rnd * groups_g + tid // lanes_g
                        k = 0
                        g = 0
                        b = 0
                        acc = ZERO
                        if oi < n_out:
                            k = oi % nu
                            bg = oi // nu
                            g = bg % 4
                            b = bg // 4
                            w_at = wg_off + (g * units + k) * row_g
                            m_at = st_off + b * H
                            for col in range(lane_g, H, lanes_g):
                                acc += LOAD(wsm[w_at + col]) * smem[m_at + col]
                        if lanes_g == 1:
                            if oi < n_out:
                                smem[pre_off + (b * 4 + g) * units + k] = acc
                        else:
                            smem[scr_off + tid] = acc
                            cuda.syncthreads()
                            if lane_g == 0 and oi < n_out:
                                total = ZERO
                                for j in range(lanes_g):        # fixed order: deterministic
                                    total += smem[scr_off + tid + j]
                                smem[pre_off + (b * 4 + g) * units + k] = total
                    cuda.syncthreads()          # `pre` complete before the update reads it
                    for idx in range(tid, nb * nu, stride):
                        k = idx % nu
                        b = idx // nu
                        p = pre_off + b * gu + k
                        u = u0 + k
                        h_in = LOAD(h[t_in, b0 + b, u])
                        fwd_unit(gx, b_rec, h, c, gates, y, lengths, t, t_in, t_out, b0 + b, u,
                                 smem[p], smem[p + units], smem[p + 2 * units],
                                 smem[p + 3 * units], h_in, save)
            if q + 1 < q_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{CELL}_persistent_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(dtype: str):
    """The persistent mLSTM backward (BPTT) for dtype.

    Arguments (C-contiguous, none aliasing another; [S] storage dtype, else compute dtype):
      w_mh      (H, H)      [S] read only, columns of U_j once per launch
      w_hh      (4H, H)     [S] read only, columns of U_j once per launch
      b_rec     (1,)        placeholder (the cell math's b_rec; unused by the LSTM)
      h, c, gates           the forward's saved h, c, gates ([S] h, gates); read only
      dy        (T, B, H)   [S] read only
      mx, mh    (T, B, H)   the forward's saved x W_mx^T and h_{t-1} W_mh^T; read only
      dgh       (T, B, 4H)  gate pre-activation gradients (written; read back one phase later)
      dgx       (1, 1, 1)   placeholder (the cell math's GRU-only dgx)
      dmh, dmx  (T, B, H)   dL/dmh, dL/dmx (written; dmh read back one phase later)
      dh_carry  (B, H)      in dL/dh_n, out dL/dh0
      dc_carry  (B, H)      in dL/dc_n, out dL/dc0
      lengths   int32 (B,) ; reverse, q_begin, q_end (half-phases of [0, 2T+1)), units,
      batch_tile: int32
    Dynamic shared memory: smem_bytes('bwd', H, batch_tile, units, dtype, threads=...).
    """
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    W_SMEM_TYPE = NUMBA_STORAGE[dtype]
    W_BYTES, C_BYTES = ITEMSIZE[dtype], DT(0).itemsize
    LOAD, _ = codec(dtype)
    ZERO = DT(0)
    _, bwd_unit = cellmath.make("lstm", dtype)

    def kernel(w_mh, w_hh, b_rec, h, c, gates, dy, mx, mh, dgh, dgx, dmh, dmx, dh_carry,
               dc_carry, lengths, reverse, q_begin, q_end, units, batch_tile):
        grid = _this_grid()
        wsm = cuda.shared.array(0, dtype=W_SMEM_TYPE)
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = dy.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        GH = 4 * H
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        u0, nu = _owned_units(units, H)
        lanes, groups = _lane_split(batch_tile * units, stride)
        lane = tid % lanes
        row_m = _padded_row(H, lanes)
        row_g = _padded_row(GH, lanes)
        wg_off = units * row_m
        st_off = ((wg_off + units * row_g) * W_BYTES + C_BYTES - 1) // C_BYTES
        scr_off = st_off + batch_tile * GH

        # global reads coalesce over k; these once-per-launch stores are the only strided
        # shared-memory accesses
        for idx in range(tid, H * nu, stride):
            k = idx % nu
            r = idx // nu
            wsm[k * row_m + r] = w_mh[r, u0 + k]
        for idx in range(tid, GH * nu, stride):
            k = idx % nu
            r = idx // nu
            wsm[wg_off + k * row_g + r] = w_hh[r, u0 + k]
        # no barrier here: the columns are first read after a staging barrier

        for q in range(q_begin, q_end):
            kk = q // 2
            s = T - 1 - kk          # processing step; -1 in the dh0 tail
            t, t_in, t_out = step_times(T, s, reverse)
            if q % 2 == 0:
                # phase A: dh of the block's units, the LSTM backward -> dgh[t]
                has_next = kk > 0   # uniform over the block: the barriers below are safe
                t_next = T - 2 - s if reverse else s + 1
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if b0 > 0 and (lanes == 1) == has_next:
                        cuda.syncthreads()  # the last tile read the staged dmh or the scratch
                    if has_next:
                        for idx in range(tid, nb * H, stride):
                            smem[st_off + idx] = dmh[t_next, b0 + idx // H, idx % H]
                        cuda.syncthreads()
                    n_out = nb * nu
                    for rnd in range((n_out + groups - 1) // groups):
                        oi = rnd * groups + tid // lanes
                        dh_rec = ZERO
                        if oi < n_out and has_next:
                            w_at = (oi % nu) * row_m
                            d_at = st_off + (oi // nu) * H
                            for r in range(lane, H, lanes):
                                dh_rec += LOAD(wsm[w_at + r]) * smem[d_at + r]
                        if lanes > 1:
                            smem[scr_off + tid] = dh_rec
                            cuda.syncthreads()
                            if lane == 0 and oi < n_out:
                                dh_rec = ZERO
                                for j in range(lanes):          # fixed order: deterministic
                                    dh_rec += smem[scr_off + tid + j]
                        if lane == 0 and oi < n_out:
                            b = b0 + oi // nu
                            u = u0 + oi % nu
                            dh = dh_carry[b, u] + dh_rec
                            if s < 0:
                                dh_carry[b, u] = dh
                            else:
                                bwd_unit(b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry,
                                         lengths, t, t_in, t_out, b, u, dh)
            else:
                # phase B: dm of the block's units from every unit's dgh[t]; dmh, dmx
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if b0 > 0 and lanes == 1:
                        cuda.syncthreads()      # the last tile's dot products read dgh
                    for idx in range(tid, nb * GH, stride):
                        smem[st_off + idx] = dgh[t, b0 + idx // GH, idx % GH]
                    cuda.syncthreads()
                    n_out = nb * nu
                    for rnd in range((n_out + groups - 1) // groups):
                        oi = rnd * groups + tid // lanes
                        dm = ZERO
                        if oi < n_out:
                            w_at = wg_off + (oi % nu) * row_g
                            d_at = st_off + (oi // nu) * GH
                            for r in range(lane, GH, lanes):
                                dm += LOAD(wsm[w_at + r]) * smem[d_at + r]
                        if lanes > 1:
                            smem[scr_off + tid] = dm
                            cuda.syncthreads()
                            if lane == 0 and oi < n_out:
                                dm = ZERO
                                for j in range(lanes):          # fixed order: deterministic
                                    dm += smem[scr_off + tid + j]
                        if lane == 0 and oi < n_out:
                            b = b0 + oi // nu
                            u = u0 + oi % nu
                            if t < lengths[b]:
                                dmh[t, b, u] = dm * mx[t, b, u]
                                dmx[t, b, u] = dm * mh[t, b, u]
                            else:
                                # masked: m reached nothing (and mx may hold padding's NaN)
                                dmh[t, b, u] = ZERO
                                dmx[t, b, u] = ZERO
            if q + 1 < q_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{CELL}_persistent_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_pointwise_dm(dtype: str):
    """The stepwise backward's dm split of processing step s: one thread per (b, u).

    Arguments (C-contiguous, compute dtype, none aliasing another):
      dm        (B, H)     dgh[t] W_hh of this step; read only
      mx, mh    (T, B, H)  the forward's saved x W_mx^T, h_{t-1} W_mh^T; read only
      dmh, dmx  (T, B, H)  written at t: dm * mx and dm * mh, exactly 0 on masked steps
      lengths   int32 (B,) ; reverse, s : int32
    No shared memory, no barriers: the kernel boundary orders it with the step's GEMMs.
    """
    ZERO = NP_COMPUTE[dtype](0)

    def kernel(dm, mx, mh, dmh, dmx, lengths, reverse, s):
        idx = cuda.grid(1)
        T = mx.shape[0]
        B = mx.shape[1]
        H = mx.shape[2]
        if idx < B * H:
            b = idx // H
            u = idx % H
            t, _, _ = step_times(T, s, reverse)
            if t < lengths[b]:
                dmh[t, b, u] = dm[b, u] * mx[t, b, u]
                dmx[t, b, u] = dm[b, u] * mh[t, b, u]
            else:
                dmh[t, b, u] = ZERO
                dmx[t, b, u] = ZERO

    kernel.__name__ = f"{CELL}_pointwise_dm_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


def signature(kind: str, dtype: str):
    """The Numba signature of an mLSTM kernel kind (arrays C-contiguous, scalars int32)."""
    s, c = NUMBA_STORAGE[dtype], NUMBA_COMPUTE[dtype]
    s2, s3 = s[:, ::1], s[:, :, ::1]
    c1, c2, c3 = c[::1], c[:, ::1], c[:, :, ::1]
    i1 = int32[::1]
    if kind == "persistent_fwd":
        # gx, mx, w_mh, w_hh, b_rec, h, c, gates, y, mh, m, lengths, reverse, q_begin, q_end,
        # units, save, batch_tile
        return void(c3, c3, s2, s2, c1, s3, c3, s3, s3, c3, c2, i1, int32, int32, int32, int32,
                    int32, int32)
    if kind == "persistent_bwd":
        # w_mh, w_hh, b_rec, h, c, gates, dy, mx, mh, dgh, dgx, dmh, dmx, dh_carry, dc_carry,
        # lengths, reverse, q_begin, q_end, units, batch_tile
        return void(s2, s2, c1, s3, c3, s3, s3, c3, c3, c3, c3, c3, c3, c2, c2, i1, int32, int32,
                    int32, int32, int32)
    if kind == "pointwise_dm":
        # dm, mx, mh, dmh, dmx, lengths, reverse, s
        return void(c2, c3, c3, c3, c3, i1, int32, int32)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


_FACTORIES = {"persistent_fwd": make_fwd, "persistent_bwd": make_bwd,
              "pointwise_dm": make_pointwise_dm}


@functools.lru_cache(maxsize=None)
def spec(kind: str, dtype: str) -> KernelSpec:
    """The specialization of one mLSTM kernel kind for dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    if kind not in _FACTORIES:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    func = _FACTORIES[kind](dtype)
    return KernelSpec(name=func.__name__, func=func, signature=signature(kind, dtype), cell=CELL,
                      kind=kind, dtype=dtype, grid_sync=kind.startswith("persistent"))


def specializations() -> list[KernelSpec]:
    """Every mLSTM kernel: float32/float64 x persistent_fwd, persistent_bwd, pointwise_dm."""
    return [spec(kind, dtype) for dtype in DTYPES for kind in KINDS]
