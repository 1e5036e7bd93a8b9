"""Persistent recurrence kernels: one cooperative launch runs a range of steps of one layer and
direction, with the recurrent weights held in shared memory for the whole launch.

Ownership and barriers (layout contract: gpurnn/kernels/layout.py):
  Grid      P blocks, 1-D. Block j owns hidden units U_j = [j*U, min((j+1)*U, H)), U = `units`;
            a block may own no unit (P*U > H) and then only takes part in the grid barriers.
  Forward   block j keeps W_hh rows of every gate of U_j in shared memory, loaded once per
            launch: w_slice[(g*U + k)*S + m] = W_hh[g*H + j*U + k, m], the row stride S
            padded (layout.padded_row) so that the lanes of a group (consecutive m) and the
            groups of a warp (consecutive rows) read distinct banks.
            Per step, per batch tile of bt rows (the plan's `batch_tile`, so that the weights,
            not B, set the capacity): all threads stage the tile's h_in (bt x H) ->
            syncthreads -> a group of L lanes per (b, g, k) forms the recurrent
            pre-activation into `pre` (each lane a strided part of the H-long dot product;
            partials meet in `scratch`, syncthreads, lane 0 adds them in lane order) ->
            syncthreads -> thread per (b, k) does the pointwise update and writes h, c,
            gates, y -> (another tile: syncthreads, its staging overwrites h_in and pre) ->
            grid barrier (the next step reads every block's h_out). Barriers per step:
            n_tiles x (2, 3 with L > 1) + (n_tiles - 1) block, 1 grid.
  Backward  block j keeps the columns W_hh[:, U_j], one unit's column per padded row:
            w_cols[k*S + row] = W_hh[row, j*U + k] (S >= G*H, layout.padded_row).
            Phase kk = 0..T (kk = T is the tail that only finishes dh0), per batch tile:
            stage the tile's gate gradients dgh of the step processed in phase kk-1
            (bt x G*H) -> syncthreads -> a group of L lanes per (b, k) forms
            dh_rec = W_hh[:, u]^T dgh_next[b] (strided partials, added by lane 0 in lane order
            after a syncthreads: no atomics, deterministic), and lane 0 does the pointwise
            backward of its step, writing dgh (and GRU dgx) and its own carries -> (another
            tile: a syncthreads where its writes would meet this tile's reads) -> grid
            barrier. Barriers per phase: n_tiles x (1, 2 with L > 1) block, at most
            n_tiles - 1 more between tiles, 1 grid.
  Lanes     L = the largest power of two <= 32 with L x outputs <= threads
            (layout.lanes_per_output); L = 1 skips the scratch round trip. Every loop that
            holds a barrier runs the same number of rounds in every thread of a block; with
            L > 1 that is one round (L x outputs <= threads), so rounds need no barrier
            between them. tests/test_sim_mutations.py deletes each barrier in turn.
  Threads   any multiple of 32; every loop strides by blockDim.x.
  Regularisers (zoneout, variational recurrent dropout; gpurnn/layernorm.py's contract)
            make_fwd/make_bwd(cell, dtype, regularised=True) build a separate specialization
            taking the masks and a flags word (cellmath.NOISE_*) after the plain arguments; the
            plain kernel is the same body with the flags fixed to 0 at compile time, so nothing
            of it is compiled in (its PTX is what it was before the regularisers). Recurrent
            dropout masks the staged h (forward; the update then reads its own units' h_{t-1}
            unmasked from global memory, for GRU's z*h, zoneout and padded steps) and dh_rec
            (backward, before it is carried); zoneout is cellmath's. No barrier is added. With
            recurrent dropout on, the update no longer reads the staged h, which makes the
            barrier between batch tiles redundant there (the staging barrier orders `pre`);
            with zoneout alone it is needed as in the plain kernel (test_sim_mutations.py).
Step ranges: forward launches cover processing steps s in [t_begin, t_end) (s = 0 is the first
step taken: t = s forward, t = T-1-s reverse); backward launches cover phases [k_begin,
k_end) within [0, T+1). On a GPU, and in gpurnn's strict simulator, one launch covers
everything; only Numba's stock simulator (where the grid barrier is only a block barrier)
needs a multi-block grid launched once per step/phase.
"""
from __future__ import annotations

import functools

from numba import cuda
from numba.cuda.core import config

from . import cellmath
from ..cells import GATES
from .cellmath import step_times
from .cellmath import NUMBA_COMPUTE, NUMBA_STORAGE, codec
from .dtypes import ITEMSIZE, NP_COMPUTE, SHORT

if config.ENABLE_CUDASIM:
    # Numba's own simulator has no cooperative-groups intrinsics; its grid.sync() is only a
    # block barrier (the stock fallback therefore launches once per step when P > 1). gpurnn's
    # strict simulator (gpurnn.sim) reads these device functions' source like any other.
    @cuda.jit(device=True)
    def _this_grid():
        return cuda.cg.this_grid()

    @cuda.jit(device=True)
    def _grid_group_sync(grid):
        grid.sync()
else:
    # The intrinsics, unlike cuda.cg.this_grid(), compile without a driver (static checks).
    from numba.cuda.cg import _grid_group_sync, _this_grid



NOISE_OFF = 0       # the plain kernels' noise flags: every mask off, at compile time


@cuda.jit(device=True, inline=True)
def _lane_split(n_nominal, threads):
    """(L, groups): L lanes share each dot product, threads // L groups take a tile's outputs
    in rounds. L follows layout.lanes_per_output for the nominal tile (n_nominal: a full
    block's outputs for a full batch tile), so every block and tile agree with the host's
    shared-memory layout, including a last block with fewer units and a last, shorter tile.
    Uniform over a block, so the barriers inside a round are reached by every thread."""
    lanes = 1
    while lanes < 32 and 2 * lanes * n_nominal <= threads:
        lanes *= 2
    return lanes, threads // lanes


@cuda.jit(device=True, inline=True)
def _owned_units(units, hidden):
    """(u0, nu): this block's first unit and how many it owns (0 for a block past H)."""
    u0 = cuda.blockIdx.x * units
    return u0, max(0, min(units, hidden - u0))


@cuda.jit(device=True, inline=True)
def _padded_row(length, lanes):
    """layout.padded_row: the shared-memory row stride of a weight slice."""
    return length + (lanes - length % 32 + 32) % 32


@functools.lru_cache(maxsize=None)
def make_fwd(cell: str, dtype: str, regularised: bool = False):
    """The persistent forward kernel (plain Python function, cuda.jit-able) for cell, dtype;
    with `regularised`, its specialization with zoneout and variational recurrent dropout.

    Arguments (all C-contiguous; [S] storage dtype, else compute dtype: gpurnn.kernels.dtypes):
      gx       (T, B, G*H)  input projection with folded biases; read only
      w_hh     (G*H, H)     [S] recurrent weights; read only, once per launch
      b_rec    (n,)         GRU: b_hh (G*H,; zeros without bias); lstm_peephole: [w_ci; w_cf;
                            w_co] (3H,), cifg_peephole: [w_ci; w_co] (2H,); other cells: any
                            (1,) placeholder
      h        (T+1, B, H)  [S] reserve states: h0 at h[0] (forward) / h[T] (reverse) on entry
      c        (T+1, B, H)  LSTM-family cell states, c0 placed like h0; other cells: (1,1,1)
                            placeholder
      gates    (T, B, S*H)  [S] LSTM-family/GRU activated gates (written when save_gates); else, and for
                            RNN, a (1,1,1) placeholder
      y        (T, B, H)    [S] outputs (written); none of the arrays may alias each other
      lengths  int32 (B,)   per-sequence lengths (T for all when the caller had none)
      reverse, t_begin, t_end, units : int32 (see the module docstring)
      save_gates int32      1 in a training forward (keeps the reserve), 0 for inference
      batch_tile int32      rows of h staged at once, 1..B (the plan's choice)
    regularised only, after batch_tile (compute dtype; an absent mask: any (1,1,1) placeholder):
      rec      (1, B, H)    variational recurrent dropout mask: the staged h (what meets W_hh)
                            is h_{t-1} * rec; the cell update reads the unmasked h_{t-1}
      zh, zc   (T, B, H)    zoneout masks d_h, d_c (cellmath.make)
      noise    int32        cellmath.NOISE_* bits: which of rec, zh, zc are on
    Dynamic shared memory: layout.smem_bytes_for('fwd', G, H, batch_tile, units, dtype).
    The plain kernel is the same body with noise = 0 fixed at compile time.
    """
    G = GATES[cell]
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]        # staged h, pre-activations, partial sums
    W_SMEM_TYPE = NUMBA_STORAGE[dtype]      # the weight slice: 16-bit for 16-bit storage
    W_BYTES, C_BYTES = ITEMSIZE[dtype], DT(0).itemsize
    LOAD, _ = codec(dtype)
    ZERO = DT(0)                  # typed: a float64 literal would promote f32 math
    if regularised:
        cellmath.make(cell, dtype, True)            # a cell without regularised kernels: raise
    fwd_unit = cellmath.units(cell, dtype)[0]       # the cell math with its noise arguments
    NOISE_REC = cellmath.NOISE_REC

    @cuda.jit(device=True, inline=True)
    def body(gx, w_hh, b_rec, h, c, gates, y, lengths, reverse, t_begin, t_end, units,
             save_gates, batch_tile, rec, zh, zc, noise):
        grid = _this_grid()
        # the dynamic shared memory, as weights (storage type) and as compute values: one
        # buffer, the compute regions after the weight slice (the same view at 32/64 bits)
        wsm = cuda.shared.array(0, dtype=W_SMEM_TYPE)
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = gx.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        u0, nu = _owned_units(units, H)
        gu = G * units
        # lanes and the layout follow the nominal tile (a full block's outputs for batch_tile
        # rows), so every tile and every block agree with the host's shared-memory layout
        lanes, groups = _lane_split(batch_tile * gu, stride)
        lane = tid % lanes
        row_len = _padded_row(H, lanes)
        h_off = (gu * row_len * W_BYTES + C_BYTES - 1) // C_BYTES
        pre_off = h_off + batch_tile * H
        scr_off = pre_off + batch_tile * gu

        # consecutive threads read consecutive columns m of one W_hh row: coalesced
        for idx in range(tid, G * nu * H, stride):
            m = idx % H
            row = idx // H
            k = row % nu
            g = row // nu
            wsm[(g * units + k) * row_len + m] = w_hh[g * H + u0 + k, m]
        # no barrier here: the weights are first read after the staging barrier of step one

        for s in range(t_begin, t_end):
            t, t_in, t_out = step_times(T, s, reverse)
            for b0 in range(0, B, batch_tile):
                nb = min(batch_tile, B - b0)
                if b0 > 0:
                    cuda.syncthreads()      # the last tile's update has read h_prev and pre
                for idx in range(tid, nb * H, stride):
                    hv = LOAD(h[t_in, b0 + idx // H, idx % H])
                    if noise & NOISE_REC:       # only the recurrent product sees the mask
                        hv *= rec[0, b0 + idx // H, idx % H]
                    smem[h_off + idx] = hv
                cuda.syncthreads()
                n_out = nb * G * nu                     # dot products of this tile
                for rnd in range((n_out + groups - 1) // groups):
                    oi = rnd * groups + tid // lanes
                    k = 0
                    g = 0
                    b = 0
                    acc = ZERO
                    if oi < n_out:
                        k = oi % nu
                        bg = oi // nu
                        g = bg % G
                        b = bg // G
                        w_at = (g * units + k) * row_len
                        h_at = h_off + b * H
                        for m in range(lane, H, lanes):
                            acc += LOAD(wsm[w_at + m]) * smem[h_at + m]
                    if lanes == 1:
                        if oi < n_out:
                            smem[pre_off + (b * G + g) * units + k] = acc
                    else:
                        smem[scr_off + tid] = acc
                        cuda.syncthreads()
                        if lane == 0 and oi < n_out:
                            total = ZERO
                            for q in range(lanes):          # fixed order: deterministic
                                total += smem[scr_off + tid + q]
                            smem[pre_off + (b * G + g) * units + k] = total
                # With lanes > 1 there is one round (lanes * outputs <= threads), so no barrier
                # is needed between rounds: this one orders `pre` before the pointwise update.
                cuda.syncthreads()
                for idx in range(tid, nb * nu, stride):
                    k = idx % nu
                    b = idx // nu
                    p = pre_off + b * gu + k
                    r0 = smem[p]
                    r1 = ZERO
                    r2 = ZERO
                    r3 = ZERO
                    if G > 1:
                        r1 = smem[p + units]
                        r2 = smem[p + 2 * units]
                    if G > 3:
                        r3 = smem[p + 3 * units]
                    u = u0 + k
                    if noise & NOISE_REC:
                        h_in = LOAD(h[t_in, b0 + b, u])     # the staged copy is masked
                    else:
                        h_in = smem[h_off + b * H + u]
                    fwd_unit(gx, b_rec, h, c, gates, y, lengths, t, t_in, t_out, b0 + b, u, r0,
                             r1, r2, r3, h_in, save_gates, zh, zc, noise)
            if s + 1 < t_end:
                _grid_group_sync(grid)

    if regularised:
        def kernel(gx, w_hh, b_rec, h, c, gates, y, lengths, reverse, t_begin, t_end, units,
                   save_gates, batch_tile, rec, zh, zc, noise):
            body(gx, w_hh, b_rec, h, c, gates, y, lengths, reverse, t_begin, t_end, units,
                 save_gates, batch_tile, rec, zh, zc, noise)
    else:
        def kernel(gx, w_hh, b_rec, h, c, gates, y, lengths, reverse, t_begin, t_end, units,
                   save_gates, batch_tile):
            body(gx, w_hh, b_rec, h, c, gates, y, lengths, reverse, t_begin, t_end, units,
                 save_gates, batch_tile, c, c, c, NOISE_OFF)

    kernel.__name__ = f"{cell}_persistent_fwd_{'reg_' if regularised else ''}{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(cell: str, dtype: str, regularised: bool = False):
    """The persistent backward (BPTT) kernel for cell, dtype; with `regularised`, its
    specialization with zoneout and variational recurrent dropout.

    Arguments (all C-contiguous; [S] storage dtype, else compute dtype: gpurnn.kernels.dtypes):
      w_hh      (G*H, H)     [S] recurrent weights; read only, columns of U_j once per launch
      b_rec     (n,)         the peephole cells' peephole vector (cellmath.make); read only;
                             other cells: any (1,) placeholder
      h, c, gates            the forward's reserve ([S] h and gates; layout: gpurnn.cells); read only; c and
                             gates are (1,1,1) placeholders where the cell has none
      dy        (T, B, H)    [S] output gradient; read only
      dgh       (T, B, G*H)  recurrent-side pre-activation gradients (written; read back by
                             every block one phase later)
      dgx       (T, B, G*H)  GRU: input-side gradients (written); else (1,1,1) placeholder
      dh_carry  (B, H)       in: dL/dh_n; out: dL/dh0
      dc_carry  (B, H)       LSTM: in dL/dc_n, out dL/dc0; else (1,1) placeholder
      lengths   int32 (B,) ; reverse, k_begin, k_end, units : int32 (module docstring)
      batch_tile int32       rows of gate gradients staged at once, 1..B
    regularised only, after batch_tile: rec (1, B, H), zh, zc (T, B, H), noise int32 as in
      make_fwd: dL/dh_{t-1} = (the direct part) + rec * (W_hh^T dgh_t), the recurrent part
      dh_rec masked before it is carried; zoneout in cellmath's bwd_unit.
    No argument may alias another. Dynamic shared memory:
    layout.smem_bytes_for('bwd', G, H, batch_tile, units, dtype).
    The plain kernel is the same body with noise = 0 fixed at compile time.
    """
    G = GATES[cell]
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]        # staged gate gradients, partial sums
    W_SMEM_TYPE = NUMBA_STORAGE[dtype]      # the weight columns
    W_BYTES, C_BYTES = ITEMSIZE[dtype], DT(0).itemsize
    LOAD, _ = codec(dtype)
    ZERO = DT(0)
    if regularised:
        cellmath.make(cell, dtype, True)
    bwd_unit = cellmath.units(cell, dtype)[1]
    NOISE_REC = cellmath.NOISE_REC

    @cuda.jit(device=True, inline=True)
    def body(w_hh, b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, reverse,
             k_begin, k_end, units, batch_tile, rec, zh, zc, noise):
        grid = _this_grid()
        wsm = cuda.shared.array(0, dtype=W_SMEM_TYPE)     # as in the forward: one buffer
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = dy.shape[0]
        B = h.shape[1]
        H = h.shape[2]
        GH = G * H
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        u0, nu = _owned_units(units, H)
        lanes, groups = _lane_split(batch_tile * units, stride)
        lane = tid % lanes
        row_len = _padded_row(GH, lanes)
        dg_off = (units * row_len * W_BYTES + C_BYTES - 1) // C_BYTES
        scr_off = dg_off + batch_tile * GH

        # global reads coalesce over k (consecutive columns); this once-per-launch store is the
        # only strided shared-memory access
        for idx in range(tid, GH * nu, stride):
            k = idx % nu
            row = idx // nu
            wsm[k * row_len + row] = w_hh[row, u0 + k]
        # no barrier here: the columns are first read after a phase's staging barrier

        for kk in range(k_begin, k_end):
            s = T - 1 - kk          # processing step of this phase; -1 in the dh0 tail
            has_next = kk > 0       # uniform over the block: the syncthreads below are safe
            t_next = T - 2 - s if reverse else s + 1
            t, t_in, t_out = step_times(T, s, reverse)
            for b0 in range(0, B, batch_tile):
                nb = min(batch_tile, B - b0)
                # Between tiles: with L = 1 the staging below overwrites gate gradients the
                # last tile's dot products read; with L > 1 and nothing staged, the scratch
                # written below is what lane 0 of the last tile read. (With L > 1 and a
                # staging, its own barrier orders both.)
                if b0 > 0 and (lanes == 1) == has_next:
                    cuda.syncthreads()
                if has_next:
                    for idx in range(tid, nb * GH, stride):
                        smem[dg_off + idx] = dgh[t_next, b0 + idx // GH, idx % GH]
                    cuda.syncthreads()
                n_out = nb * nu                         # dot products of this tile
                for rnd in range((n_out + groups - 1) // groups):
                    oi = rnd * groups + tid // lanes
                    dh_rec = ZERO
                    if oi < n_out and has_next:
                        dg_at = dg_off + (oi // nu) * GH
                        k = oi % nu
                        w_at = k * row_len
                        for row in range(lane, GH, lanes):
                            dh_rec += LOAD(wsm[w_at + row]) * smem[dg_at + row]
                    if lanes > 1:
                        smem[scr_off + tid] = dh_rec
                        cuda.syncthreads()
                        if lane == 0 and oi < n_out:    # as the forward: no group past n_out
                            dh_rec = ZERO
                            for q in range(lanes):      # fixed order: deterministic
                                dh_rec += smem[scr_off + tid + q]
                    if lane == 0 and oi < n_out:
                        k = oi % nu
                        b = b0 + oi // nu
                        u = u0 + k
                        if noise & NOISE_REC:       # the product saw h_{t-1} * rec
                            dh_rec *= rec[0, b, u]
                        dh = dh_carry[b, u] + dh_rec
                        if s < 0:
                            dh_carry[b, u] = dh
                        else:
                            bwd_unit(b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry,
                                     lengths, t, t_in, t_out, b, u, dh, zh, zc, noise)
            # lanes > 1 means one round, and the grid barrier orders this phase's scratch reads
            # before the next phase's writes: no block barrier is needed here.
            if kk + 1 < k_end:
                _grid_group_sync(grid)

    if regularised:
        def kernel(w_hh, b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, reverse,
                   k_begin, k_end, units, batch_tile, rec, zh, zc, noise):
            body(w_hh, b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, reverse,
                 k_begin, k_end, units, batch_tile, rec, zh, zc, noise)
    else:
        def kernel(w_hh, b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, reverse,
                   k_begin, k_end, units, batch_tile):
            body(w_hh, b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, reverse,
                 k_begin, k_end, units, batch_tile, c, c, c, NOISE_OFF)

    kernel.__name__ = f"{cell}_persistent_bwd_{'reg_' if regularised else ''}{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel
