"""The layer wavefront of the LSTM with projection (torch.nn.LSTM's proj_size): a whole stacked
unidirectional lstm / lstm_peephole / cifg / cifg_peephole with proj_size R in ONE persistent
cooperative launch each way (host side: gpurnn/backends/cuda_wavefront_proj.py, plan:
gpurnn/planning/wavefront_proj.py). It is gpurnn.kernels.wavefront's stage schedule run over
gpurnn.kernels.projection's two-phase step: every dot product is split over the same lanes
and summed in the same order as the per-layer projection kernels', and the per-unit math is
cellmath.make_stacked(cell)'s (make()'s, told where its layer's peephole vector starts), so
each layer's recurrence is the per-layer kernel's, bit for bit, given the same inputs
(tests/test_sim_wavefront_proj.py).

Stacked layout (as gpurnn.kernels.wavefront): L layers of one H and one R, batch B; every
per-layer array is stacked along the BATCH axis, row l*B + b is layer l's batch row b.
  gx     (T, L*B, G*H)  input pre-activations + (b_ih + b_hh): layer 0's from the host's GEMM;
                        layer l > 0's formed in the launch and written here, then read back by
                        fwd_unit like any Gx
  h      (T+1, L*B, R)  boundary states (h0 at t = 0);  c (T+1, L*B, H) cell states (c0 at 0)
  gates  (T, L*B, G*H)  activated gates (training forward), else (1, 1, 1)
  y      (T, L*B, R)    every layer's output (layer l+1's input)
  m      (T+1, L*B, H)  scratch: o*tanh(c_t) (fwd_unit's h; 0 on masked rows)
  m_y    (T, L*B, H)    scratch: fwd_unit's y, never read
  w_hh (L*G*H, R), w_ih (max(L-1, 1)*G*H, R) (W_ih of layers 1..L-1), w_hr (L*R, H)
  bias   (L*G*H,)       b_ih + b_hh of layers > 0 (layer 0's folded into its gx by the host)
  b_rec  (L*n,)         the peephole vectors (lstm_peephole n = 3H, cifg_peephole 2H), else a
                        placeholder (n = 1); layer l's starts at l*n
Grid: L*P blocks, 1-D; block q belongs to layer l = q // P; with j = q % P it owns hidden units
U_j = [j*U, min((j+1)*U, H)) and projected features Q_j = [j*Q, min((j+1)*Q, R)) of its layer
(U = `units` = ceil(H/P), Q = `feats` = ceil(R/P): gpurnn.kernels.projection.slices). A block
may own no unit or no feature and then only takes part in the barriers.

Half-stages. The launch runs half-stages q = q_begin .. q_end-1: stage s = q // 2, phase q % 2
(uniform over the grid), so the host can run one half-stage per launch where the grid barrier
cannot be trusted (Numba's stock simulator) and the whole stack in one launch elsewhere.
Forward: stage s = 0 .. T+L-2 (2*(T+L-1) half-stages), layer l computes step t = s - l where
  0 <= t < T. Its block keeps, for the whole launch, the W_hh rows of its units (G*U rows of R),
  for l > 0 the W_ih rows of its units (G*U rows of R: its input is layer l-1's h, R wide), and
  the W_hr rows of its features (Q rows of H).
  phase 1 (the cell, per unit), per batch tile of bt rows: stage h_l[t] and (l > 0)
    y_{l-1}[t] (written by layer l-1 one stage earlier) -> syncthreads -> a group of L1 lanes
    per (b, g, k) forms the recurrent product and (l > 0) the input product (partials in the
    scratch, syncthreads with L1 > 1, lane 0 adds each in lane order); lane 0 writes `pre` and
    gx_l[t] = input product + bias -> syncthreads -> thread per (b, k): fwd_unit writes c, gates
    and m_l[t+1] (h_in = 0: a masked row's m is 0 and never read). No barrier between tiles:
    the update reads `pre` and gx only, rewritten by the next tile after its staging barrier.
  phase 2 (the projection, per feature), per tile: (between tiles with L2 = 1: syncthreads,
    the last tile's dot products read the stage) stage m_l[t+1] (bt x H) -> syncthreads -> L2
    lanes per (b, q): h = W_hr[q, :] . m (scratch and syncthreads with L2 > 1); lane 0 writes
    h_l[t+1, b, q] and y_l[t, b, q]: on masked steps h_l[t] and 0.
Backward: the reverse wavefront, stage s = 0 .. T+L-1, layer l runs the per-layer backward's
  phase kk = s - (L-1-l) where 0 <= kk <= T (kk = T: the tail that only finishes dh0), step
  t = T-1-kk. Its block keeps the W_hh columns of its features (Q columns of G*H), for
  l < L-1 the W_ih columns of its features of the layer ABOVE (layer l's output is layer l+1's
  input), and the W_hr columns of its units (U columns of R). The last stage's phase B has no
  work anywhere (only layer 0's tail runs in stage T+L-1), so the launch covers
  2*(T+L) - 1 half-stages.
  phase A (dL/dh_out, per feature), per tile: stage dgh_l[t+1] (none in phase kk = 0) and
    (l < L-1, t >= 0) dgh_{l+1}[t] (the layer above's gate gradients of the same step, written
    one stage earlier) -> syncthreads -> dh_rec = W_hh[:, q]^T dgh_l[t+1] and
    dy_l = W_ih_{l+1}[:, q]^T dgh_{l+1}[t] (lanes LA, scratch and a syncthreads with LA > 1,
    lane 0 adds in lane order) -> lane 0 writes dy_l[t, b, q] (the per-layer stack's dy of a
    lower layer is the upper layer's dx; the top layer's rows hold the caller's dy) and, as
    gpurnn.kernels.projection: dh = dh_carry + dh_rec; active row dhp = dh + dy, carry 0;
    masked row dhp = 0, carry dh; tail carry = dh (dL/dh0). Between tiles a syncthreads where
    the next tile's writes would meet this tile's reads (staging with LA = 1, scratch with
    LA > 1 and no staging).
  phase B (the cell, per unit), per tile (not in the tail): (between tiles with LB = 1:
    syncthreads) stage dhp_l[t] (bt x R) -> syncthreads -> dm = W_hr[:, u]^T dhp (lanes LB)
    -> lane 0 writes dm_l[t, b, u] and runs bwd_unit with dh = 0 and dy = dm, writing
    dgh_l[t, b, :u] and dc_carry.
  dx of layer 0 and every weight gradient are the host's GEMMs afterwards
  (gpurnn.backends.cuda_wavefront_proj), as gpurnn.backends.cuda_proj does per layer.
Barriers. ONE grid barrier per half-stage, none after the launch's last: forward
  2*(T+L-1) - 1 = 2T+2L-3, backward 2*(T+L) - 2 = 2T+2L-2 per whole launch (one layer: the
  per-layer projection kernels' 2T-1 and 2T). Necessary: phase 2 reads every block's m of the
  layer (phase 1's), phase 1 reads every block's h of its layer and layer l-1's y (the
  previous phase 2's); phase B reads every feature's dhp (phase A's), phase A reads every
  unit's dgh of its layer and of the layer above (the previous phase B's). Sufficient: no
  half-stage reads what another block writes in the same half-stage (each writes other time
  indices or other arrays: forward phase 1 gx_l[t], c_l[t+1], gates_l[t], m_l[t+1]; phase 2
  h_l[t+1], y_l[t]; backward phase A dhp_l[t], dy_l[t] and its features' carries, phase B
  dm_l[t], dgh_l[t] and its units' carries), and every block reaches every grid barrier: a
  layer with no step at a half-stage skips only its tile loops (uniform per block).
  Block barriers per tile: forward phase 1 2 (staging, `pre`; 3 with the scratch when
  L1 > 1), phase 2 1 (2 with L2 > 1) + 1 between tiles with L2 = 1; backward phase A 1 after a
  staging (none without) + 1 with LA > 1 + the between-tile one, phase B 1 (2 with LB > 1) +
  1 between tiles with LB = 1. tests/test_sim_wavefront_proj.py deletes each in turn.
Lanes: as gpurnn.kernels.projection, per phase L = the largest power of two <= 32 with
  L x outputs <= threads for the nominal tile (layout.lanes_per_output): L1 of bt*G*U, L2 and
  LA of bt*Q, LB of bt*U; with L > 1 a tile's dot products take one round. No atomics; every
  sum in a fixed order. No dropout between layers (the host keeps per-layer launches then).
Shared memory (smem_regions below; one dtype, float32 or float64):
  forward   W_hh rows G*U x S1 | W_ih rows G*U x S1 (allocated in every block, loaded for
            l > 0) | stage bt*max(R, H) | input stage bt*R | pre bt*G*U | scratch 2 x threads
            | W_hr rows Q x S2 (last: phase 1 needs nothing of phase 2's lane split);
            S1 = padded_row(R, L1), S2 = padded_row(H, L2)
  backward  W_hh columns Q x SA | W_ih (layer above) columns Q x SA | stage bt*max(G*H, R) |
            upper stage bt*G*H | scratch 2 x threads | W_hr columns U x SB (last, likewise);
            SA = padded_row(G*H, LA), SB = padded_row(R, LB)
"""
from __future__ import annotations

import functools

from numba import cuda, int32, void

from . import cellmath
from .cellmath import NUMBA_COMPUTE
from .dtypes import NP_COMPUTE, SHORT
from .layout import KernelSpec, lanes_per_output, padded_row
from .persistent import _grid_group_sync, _lane_split, _padded_row, _this_grid
from .projection import CELLS, DTYPES, GATES, slices

KINDS = ("wavefront_proj_fwd", "wavefront_proj_bwd")
# Registers per thread the kernels are held to (tests/test_sim_wavefront_proj.py checks
# ptxas' counts against it): ptxas' measured maximum over the 16 kernels, 230 (cifg_peephole's
# float32 forward on sm_80; the backward ones take <= 184), no spills. Each phase computes its
# own lane split and W_hr's slice sits last in shared memory, so no phase keeps the other's
# offsets live (with them kept kernel-wide the float64 forwards spilled at 255). 230 allows
# 256 threads a block (65536 / 230 = 284); the plan refuses a block size that leaves fewer.
REGS_MAX = 230


def smem_regions(direction: str, gates: int, hidden: int, proj: int, batch_tile: int,
                 blocks: int, threads: int):
    """(weight elements, other elements) of one block's dynamic shared memory (the module
    docstring's layout, P = blocks per layer)."""
    U, Q = slices(hidden, proj, blocks)
    if direction == "fwd":
        s1 = padded_row(proj, lanes_per_output(batch_tile * gates * U, threads))
        s2 = padded_row(hidden, lanes_per_output(batch_tile * Q, threads))
        return (2 * gates * U * s1 + Q * s2,
                batch_tile * max(proj, hidden) + batch_tile * proj + batch_tile * gates * U
                + 2 * threads)
    if direction == "bwd":
        sa = padded_row(gates * hidden, lanes_per_output(batch_tile * Q, threads))
        sb = padded_row(proj, lanes_per_output(batch_tile * U, threads))
        return (2 * Q * sa + U * sb,
                batch_tile * max(gates * hidden, proj) + batch_tile * gates * hidden
                + 2 * threads)
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


def smem_bytes(direction: str, gates: int, hidden: int, proj: int, batch_tile: int,
               blocks: int, dtype: str, *, threads: int) -> int:
    """Bytes of dynamic shared memory per block (the plan's and the host's one model)."""
    w, rest = smem_regions(direction, gates, hidden, proj, batch_tile, blocks, threads)
    return (w + rest) * NP_COMPUTE[dtype](0).itemsize


def _check(cell, dtype):
    if cell not in GATES:
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")


@functools.lru_cache(maxsize=None)
def make_fwd(cell: str, dtype: str):
    """The wavefront projection forward for cell, dtype (arguments: the module docstring and
    signature(); layers, q_begin, q_end, units, feats, save_gates, batch_tile int32). No
    argument may alias another."""
    _check(cell, dtype)
    G = GATES[cell]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    ZERO = NP_COMPUTE[dtype](0)
    fwd_unit, _ = cellmath.make_stacked(cell, dtype)

    def kernel(gx, w_hh, w_ih, w_hr, bias, b_rec, h, c, gates, y, m, m_y, lengths, layers,
               q_begin, q_end, units, feats, save_gates, batch_tile):
        grid = _this_grid()
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = gx.shape[0]
        B = h.shape[1] // layers
        R = h.shape[2]
        H = c.shape[2]
        GH = G * H
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        P = cuda.gridDim.x // layers
        layer = cuda.blockIdx.x // P
        j = cuda.blockIdx.x - layer * P
        u0 = j * units
        nu = max(0, min(units, H - u0))
        q0 = j * feats
        nq = max(0, min(feats, R - q0))
        lb = layer * B                      # this layer's first row of the stacked batch
        rb = layer * (b_rec.shape[0] // layers)     # its layer's b_rec
        gu = G * units
        # W_hr's rows last: phase 1 needs nothing of phase 2's lane split (fewer registers)
        row1 = _padded_row(R, _lane_split(batch_tile * gu, stride)[0])
        wi_off = gu * row1
        st_off = 2 * gu * row1
        x_off = st_off + batch_tile * max(R, H)
        pre_off = x_off + batch_tile * R
        scr_off = pre_off + batch_tile * gu
        hr_off = scr_off + 2 * stride

        for idx in range(tid, G * nu * R, stride):          # coalesced over the columns
            col = idx % R
            row = idx // R
            k = row % nu
            g = row // nu
            smem[(g * units + k) * row1 + col] = w_hh[layer * GH + g * H + u0 + k, col]
            if layer > 0:
                smem[wi_off + (g * units + k) * row1 + col] = \
                    w_ih[(layer - 1) * GH + g * H + u0 + k, col]
        row2 = _padded_row(H, _lane_split(batch_tile * feats, stride)[0])
        for idx in range(tid, nq * H, stride):
            col = idx % H
            k = idx // H
            smem[hr_off + k * row2 + col] = w_hr[layer * R + q0 + k, col]
        # no barrier here: the slices are first read after a staging barrier

        for q in range(q_begin, q_end):
            t = q // 2 - layer
            if t >= 0 and t < T:            # uniform over the block
                if q % 2 == 0:
                    # phase 1: the cell, per owned unit
                    l1, g1 = _lane_split(batch_tile * gu, stride)
                    lane1 = tid % l1
                    for b0 in range(0, B, batch_tile):
                        nb = min(batch_tile, B - b0)
                        for idx in range(tid, nb * R, stride):
                            smem[st_off + idx] = h[t, lb + b0 + idx // R, idx % R]
                            if layer > 0:
                                smem[x_off + idx] = y[t, lb - B + b0 + idx // R, idx % R]
                        cuda.syncthreads()
                        n_out = nb * G * nu
                        for rnd in range((n_out + g1 - 1) // g1):
                            oi = rnd * g1 + tid // l1
                            k = 0
                            g = 0
                            b = 0
                            acc = ZERO
                            acx = ZERO
                            if oi < n_out:
                                k = oi % nu
                                bg = oi // nu
                                g = bg % G
                                b = bg // G
                                w_at = (g * units + k) * row1
                                h_at = st_off + b * R
                                if layer > 0:   # one pass, each sum in the column order
                                    x_at = x_off - st_off
                                    for col in range(lane1, R, l1):
                                        acc += smem[w_at + col] * smem[h_at + col]
                                        acx += smem[wi_off + w_at + col] * smem[x_at + h_at
                                                                                + col]
                                else:
                                    for col in range(lane1, R, l1):
                                        acc += smem[w_at + col] * smem[h_at + col]
                            if l1 > 1:
                                smem[scr_off + tid] = acc
                                smem[scr_off + stride + tid] = acx
                                cuda.syncthreads()
                                if lane1 == 0 and oi < n_out:
                                    acc = ZERO
                                    acx = ZERO
                                    for p in range(l1):         # fixed order: deterministic
                                        acc += smem[scr_off + tid + p]
                                    for p in range(l1):
                                        acx += smem[scr_off + stride + tid + p]
                            if lane1 == 0 and oi < n_out:
                                smem[pre_off + (b * G + g) * units + k] = acc
                                if layer > 0:
                                    row = g * H + u0 + k
                                    gx[t, lb + b0 + b, row] = acx + bias[layer * GH + row]
                        cuda.syncthreads()                  # `pre` and gx before the update
                        for idx in range(tid, nb * nu, stride):
                            k = idx % nu
                            b = idx // nu
                            pp = pre_off + b * gu + k
                            r0 = smem[pp]
                            r1 = smem[pp + units]
                            r2 = smem[pp + 2 * units]
                            r3 = ZERO
                            if G > 3:
                                r3 = smem[pp + 3 * units]
                            fwd_unit(gx, b_rec, rb, m, c, gates, m_y, lengths, t, t, t + 1,
                                     lb + b0 + b, u0 + k, r0, r1, r2, r3, ZERO, save_gates)
                else:
                    # phase 2: the projection, per owned feature
                    l2, g2 = _lane_split(batch_tile * feats, stride)
                    lane2 = tid % l2
                    row2 = _padded_row(H, l2)
                    for b0 in range(0, B, batch_tile):
                        nb = min(batch_tile, B - b0)
                        if b0 > 0 and l2 == 1:
                            cuda.syncthreads()  # the last tile's dot products read the stage
                        for idx in range(tid, nb * H, stride):
                            smem[st_off + idx] = m[t + 1, lb + b0 + idx // H, idx % H]
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
                                    for p in range(l2):
                                        acc += smem[scr_off + tid + p]
                            if lane2 == 0 and oi < n_out:
                                bb = lb + b0 + b
                                f = q0 + k
                                if t < lengths[bb]:
                                    h[t + 1, bb, f] = acc
                                    y[t, bb, f] = acc
                                else:
                                    h[t + 1, bb, f] = h[t, bb, f]
                                    y[t, bb, f] = ZERO
            if q + 1 < q_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{cell}_wavefront_proj_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(cell: str, dtype: str):
    """The wavefront projection backward for cell, dtype (the reverse wavefront; module
    docstring). Arguments (signature()): w_hh, w_ih, w_hr, b_rec as the forward's; h_shape
    (1, 1, H) placeholder (bwd_unit reads its shape); c, gates the forward's, read only;
    dy (T, L*B, R): on entry the top layer's rows hold the caller's dy, the kernel writes the
    lower layers' rows before it reads them; dgh (T, L*B, G*H), dhp (T, L*B, R), dm
    (T, L*B, H) written; dgx (1, 1, 1) placeholder; dh_carry (L*B, R) in dL/dh_n, out dL/dh0;
    dh_unit (L*B, H) scratch; dc_carry (L*B, H) in dL/dc_n, out dL/dc0. No argument may alias
    another."""
    _check(cell, dtype)
    G = GATES[cell]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    ZERO = NP_COMPUTE[dtype](0)
    _, bwd_unit = cellmath.make_stacked(cell, dtype)

    def kernel(w_hh, w_ih, w_hr, b_rec, h_shape, c, gates, dy, dgh, dgx, dhp, dm, dh_carry,
               dh_unit, dc_carry, lengths, layers, q_begin, q_end, units, feats, batch_tile):
        grid = _this_grid()
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = dy.shape[0]
        B = dy.shape[1] // layers
        R = dy.shape[2]
        H = c.shape[2]
        GH = G * H
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        P = cuda.gridDim.x // layers
        layer = cuda.blockIdx.x // P
        j = cuda.blockIdx.x - layer * P
        u0 = j * units
        nu = max(0, min(units, H - u0))
        q0 = j * feats
        nq = max(0, min(feats, R - q0))
        lb = layer * B
        rb = layer * (b_rec.shape[0] // layers)     # this layer's b_rec
        up = layer + 1 < layers             # a layer above reads this layer's output
        # W_hr's columns last: phase A needs nothing of phase B's lane split (fewer registers)
        row_a = _padded_row(GH, _lane_split(batch_tile * feats, stride)[0])
        wx_off = feats * row_a
        st_off = 2 * feats * row_a
        up_off = st_off + batch_tile * max(GH, R)
        scr_off = up_off + batch_tile * GH
        wb_off = scr_off + 2 * stride

        for idx in range(tid, GH * nq, stride):             # coalesced over k
            k = idx % nq
            row = idx // nq
            smem[k * row_a + row] = w_hh[layer * GH + row, q0 + k]
            if up:                          # W_ih of layer+1 sits at rows layer*GH of w_ih
                smem[wx_off + k * row_a + row] = w_ih[layer * GH + row, q0 + k]
        row_b = _padded_row(R, _lane_split(batch_tile * units, stride)[0])
        for idx in range(tid, R * nu, stride):
            k = idx % nu
            f = idx // nu
            smem[wb_off + k * row_b + f] = w_hr[layer * R + f, u0 + k]
        # no barrier here: the columns are first read after a staging barrier

        for q in range(q_begin, q_end):
            kk = q // 2 - (layers - 1 - layer)  # this layer's phase of the per-layer backward
            if kk >= 0 and kk <= T:         # uniform over the block
                t = T - 1 - kk              # the step; -1 in the tail that only finishes dh0
                if q % 2 == 0:
                    # phase A: dL/dh_out per owned feature, and the lower layer's dy
                    la, ga = _lane_split(batch_tile * feats, stride)
                    lane_a = tid % la
                    has_next = kk > 0
                    has_up = up and t >= 0
                    staged = has_next or has_up
                    for b0 in range(0, B, batch_tile):
                        nb = min(batch_tile, B - b0)
                        if b0 > 0 and (la == 1) == staged:
                            cuda.syncthreads()  # as gpurnn.kernels.projection's phase A
                        if staged:
                            for idx in range(tid, nb * GH, stride):
                                bi = b0 + idx // GH
                                r = idx % GH
                                if has_next:
                                    smem[st_off + idx] = dgh[t + 1, lb + bi, r]
                                if has_up:
                                    smem[up_off + idx] = dgh[t, lb + B + bi, r]
                            cuda.syncthreads()
                        n_out = nb * nq
                        for rnd in range((n_out + ga - 1) // ga):
                            oi = rnd * ga + tid // la
                            rec = ZERO
                            dxv = ZERO
                            if oi < n_out:
                                w_at = (oi % nq) * row_a
                                dg_at = (oi // nq) * GH
                                if has_next:
                                    for row in range(lane_a, GH, la):
                                        rec += smem[w_at + row] * smem[st_off + dg_at + row]
                                if has_up:
                                    for row in range(lane_a, GH, la):
                                        dxv += smem[wx_off + w_at + row] * smem[up_off + dg_at
                                                                                + row]
                            if la > 1:
                                smem[scr_off + tid] = rec
                                smem[scr_off + stride + tid] = dxv
                                cuda.syncthreads()
                                if lane_a == 0 and oi < n_out:
                                    rec = ZERO
                                    dxv = ZERO
                                    for p in range(la):         # fixed order: deterministic
                                        rec += smem[scr_off + tid + p]
                                    for p in range(la):
                                        dxv += smem[scr_off + stride + tid + p]
                            if lane_a == 0 and oi < n_out:
                                bb = lb + b0 + oi // nq
                                f = q0 + oi % nq
                                dh = dh_carry[bb, f] + rec
                                if t < 0:
                                    dh_carry[bb, f] = dh
                                else:
                                    dyv = dxv
                                    if has_up:
                                        dy[t, bb, f] = dxv
                                    else:
                                        dyv = dy[t, bb, f]
                                    if t < lengths[bb]:
                                        dhp[t, bb, f] = dh + dyv
                                        dh_carry[bb, f] = ZERO
                                    else:
                                        dhp[t, bb, f] = ZERO
                                        dh_carry[bb, f] = dh
                elif t >= 0:
                    # phase B: dL/dm and the cell's backward per owned unit
                    lbn, gb = _lane_split(batch_tile * units, stride)
                    lane_b = tid % lbn
                    row_b = _padded_row(R, lbn)
                    for b0 in range(0, B, batch_tile):
                        nb = min(batch_tile, B - b0)
                        if b0 > 0 and lbn == 1:
                            cuda.syncthreads()  # the last tile's dot products read the stage
                        for idx in range(tid, nb * R, stride):
                            smem[st_off + idx] = dhp[t, lb + b0 + idx // R, idx % R]
                        cuda.syncthreads()
                        n_out = nb * nu
                        for rnd in range((n_out + gb - 1) // gb):
                            oi = rnd * gb + tid // lbn
                            acc = ZERO
                            if oi < n_out:
                                w_at = wb_off + (oi % nu) * row_b
                                d_at = st_off + (oi // nu) * R
                                for f in range(lane_b, R, lbn):
                                    acc += smem[w_at + f] * smem[d_at + f]
                            if lbn > 1:
                                smem[scr_off + tid] = acc
                                cuda.syncthreads()
                                if lane_b == 0 and oi < n_out:
                                    acc = ZERO
                                    for p in range(lbn):
                                        acc += smem[scr_off + tid + p]
                            if lane_b == 0 and oi < n_out:
                                bb = lb + b0 + oi // nu
                                u = u0 + oi % nu
                                dm[t, bb, u] = acc
                                bwd_unit(b_rec, rb, h_shape, c, gates, dm, dgh, dgx, dh_unit,
                                         dc_carry, lengths, t, t, t + 1, bb, u, ZERO)
            if q + 1 < q_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{cell}_wavefront_proj_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


def signature(kind: str, dtype: str):
    """The Numba signature of a wavefront projection kernel (arrays C-contiguous, all in the one
    dtype but lengths; scalars int32)."""
    d = NUMBA_COMPUTE[dtype]
    d1, d2, d3 = d[::1], d[:, ::1], d[:, :, ::1]
    i1 = int32[::1]
    i = int32
    if kind == "wavefront_proj_fwd":
        # gx, w_hh, w_ih, w_hr, bias, b_rec, h, c, gates, y, m, m_y, lengths, layers, q_begin,
        # q_end, units, feats, save_gates, batch_tile
        return void(d3, d2, d2, d2, d1, d1, d3, d3, d3, d3, d3, d3, i1, i, i, i, i, i, i, i)
    if kind == "wavefront_proj_bwd":
        # w_hh, w_ih, w_hr, b_rec, h_shape, c, gates, dy, dgh, dgx, dhp, dm, dh_carry, dh_unit,
        # dc_carry, lengths, layers, q_begin, q_end, units, feats, batch_tile
        return void(d2, d2, d2, d1, d3, d3, d3, d3, d3, d3, d3, d3, d2, d2, d2, i1, i, i, i, i,
                    i, i)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


@functools.lru_cache(maxsize=None)
def spec(cell: str, kind: str, dtype: str) -> KernelSpec:
    """The specialization of one wavefront projection kernel for cell and dtype."""
    _check(cell, dtype)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    func = (make_fwd if kind == "wavefront_proj_fwd" else make_bwd)(cell, dtype)
    return KernelSpec(name=func.__name__, func=func, signature=signature(kind, dtype), cell=cell,
                      kind=kind, dtype=dtype, grid_sync=True)


def specializations(dtypes=DTYPES) -> list[KernelSpec]:
    """Every wavefront projection kernel: 4 cells x float32/float64 x (fwd, bwd) (16)."""
    return [spec(cell, kind, dtype) for cell in CELLS for dtype in dtypes for kind in KINDS]
