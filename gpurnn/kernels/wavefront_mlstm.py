"""The layer wavefront of the multiplicative LSTM (mLSTM; math gpurnn/variants.py, per-layer
kernels gpurnn/kernels/mlstm.py): a stack of L mLSTM layers of one hidden size H in ONE
persistent cooperative launch each way (host side: gpurnn/backends/cuda_wavefront_mlstm.py,
plan: gpurnn/planning/wavefront_mlstm.py). Stage s runs layer l's step t = s - l, as
gpurnn.kernels.wavefront does for the plain cells, but every stage is the mLSTM step's two
phases. The per-unit math is cellmath.make("lstm", dtype)'s, and every dot product is split
and summed exactly as gpurnn.kernels.mlstm's (the same lanes, the same strided partials, lane 0
adding them in lane order), so each layer's recurrence is the per-layer kernel's, bit for bit,
given the same inputs (tests/test_sim_wavefront_mlstm.py).

Stacked layout (as gpurnn.kernels.wavefront): every per-layer array is stacked along the BATCH
axis, row l*B + b being layer l's batch row b; lengths are tiled L times.
  gx     (T, L*B, 4H)  x W_ih^T + b_ih + b_hh: layer 0's the host's GEMM before the launch;
                       layer l > 0's formed in the launch (phase 2) and written here
  mx     (T, L*B, H)   x W_mx^T: layer 0's the host's GEMM; layer l > 0's formed in the launch
                       (phase 1) and written here (the saved mx of gpurnn.variants)
  h, c   (T+1, L*B, H) boundary states, h0 / c0 at t = 0
  gates  (T, L*B, 4H)  activated gates; mh (T, L*B, H) h_{t-1} W_mh^T (both when saving)
  y      (T, L*B, H)   every layer's output; m (L*B, H) the stage's m, phase 1 -> phase 2
  w_mh (L*H, H), w_hh (L*4H, H)        every layer's, stacked along rows
  w_mx, w_ih ((max(L-1,1))*H | *4H, H) layers 1..L-1's (layer 0's are only host GEMMs)
  bias   (L*4H,)       b_ih + b_hh of layers 1.. at rows l*4H (zeros without bias)
Grid: L*P blocks, 1-D; block q belongs to layer l = q // P and owns the unit slice
U_j = [j*U, min((j+1)*U, H)) of it, j = q % P, U = `units`; the same slice of m as of h, c. A
block past H owns no unit and only joins the barriers.

Forward: half-stages q in [q_begin, q_end) of [0, 2(T+L-1)); stage s = q // 2, phase q % 2;
layer l computes step t = s - l where 0 <= t < T (uniform per block).
  phase 1 (m)      per tile: stage h_l[t] and (l > 0) y_{l-1}[t] -> syncthreads -> per (b, k)
                   mh = W_mh[u] . h_l[t][b] and (l > 0) mx = W_mx[u] . y_{l-1}[t][b] (lane
                   partials -> scratch -> syncthreads -> lane 0 adds in lane order); lane 0
                   writes mx (l > 0), mh (saving) and m[b, u] = mx * mh
  phase 2 (gates)  per tile: stage m_l and (l > 0) y_{l-1}[t] -> syncthreads -> per (b, g, k)
                   the recurrent W_hh[g, u] . m and (l > 0) W_ih[g, u] . y_{l-1}[t]; lane 0
                   writes `pre` and gx = that + bias -> syncthreads -> per (b, k) fwd_unit
                   (h_in from global), which writes h_l[t+1], c, gates, y_l[t]
  Its block keeps W_mh, W_hh rows of its units and (l > 0) W_mx, W_ih rows in shared memory
  for the whole launch.
Backward: the reverse wavefront. Stage s = 0 .. T+L-1, layer l runs the per-layer backward's
  step kk = s - (L-1-l) where 0 <= kk <= T (kk = T: the tail that only finishes dh0), t =
  T-1-kk; half-phases q in [q_begin, q_end) of [0, 2(T+L) - 1) (the last stage has only layer
  0's tail phase A).
  phase A (q even) per tile: stage dmh_l[t+1] (kk > 0) and (l < L-1, t >= 0) the layer above's
                   [dgh_{l+1}[t], dmx_{l+1}[t]] (5H a row, both written one stage earlier) ->
                   syncthreads -> per (b, k): dh_rec = W_mh[:, u] . dmh and dy = [W_ih_{l+1};
                   W_mx_{l+1}][:, u] . [dgh; dmx] (partials, scratch, lane 0 in lane order);
                   lane 0 writes dy_l[t] (the upper layer's dx is the lower layer's dy) and runs
                   bwd_unit(carry + dh_rec), which adds dy and writes dgh_l[t]; in the tail
                   dh0 = carry + dh_rec
  phase B (q odd)  (kk < T) per tile: stage dgh_l[t] -> syncthreads -> dm = W_hh[:, u] .
                   dgh[b]; dmh = dm * mx, dmx = dm * mh (exactly 0 on masked steps)
  Its block keeps the W_mh, W_hh columns of its units and (l < L-1) the [W_ih; W_mx] columns
  of its units of the layer above. dx of layer 0 and every weight gradient are the host's GEMMs
  afterwards.
Grid barriers: one after every half-stage but the last: forward 2(T+L-1) - 1 = 2T+2L-3,
  backward 2(T+L) - 2 = 2T+2L-2 per launch. Necessary: phase 2 needs the whole m_l (every block
  of the layer wrote a slice in phase 1; backward: phase B needs the whole dgh_l[t]); the next
  stage's phase 1 needs the whole h_l[t+1] and y_{l-1}[t+1] (backward phase A: the whole
  dmh_l[t+1] and the layer above's dgh / dmx of step t), written by other blocks in the half-
  stage before. Sufficient: nothing a half-stage writes is read by another block in the same
  half-stage (forward phase 1 writes m_l, mh_l[t], mx_l[t]; phase 2 reads m_l and writes
  h_l[t+1], c, gates, gx_l[t], y_l[t], while the layers beside it read y at other time indices;
  backward phase A writes dgh_l[t], dy_l[t] and the carries, read by layer l-1 (dgh) only one
  stage later; phase B writes dmh_l[t], dmx_l[t], read one half-stage later), and m_l is
  rewritten in phase 1 only after the barrier that ends the phase 2 which read it. Every block
  reaches every grid barrier: a layer with no step at a half-stage skips only its tile loop.
Block barriers per tile (tests/test_sim_wavefront_mlstm.py deletes each in turn): forward
  phase 1 between tiles (lanes 1), staging, scratch (lanes > 1); phase 2 staging, scratch
  (lanes > 1), `pre` before the update (no barrier between tiles: the update reads h_in from
  global and `pre` is rewritten only after the next staging barrier); backward phase A
  between tiles where (lanes 1) == staged, staging (if anything is staged), scratch (lanes >
  1); phase B between tiles (lanes 1), staging, scratch (lanes > 1), as gpurnn.kernels.mlstm.
No atomics; every sum in a fixed order; no dropout between layers (per-layer launches then).
Shared memory (smem_regions; weights in the storage dtype, then compute values from the first
compute-aligned element), S = layout.padded_row, L1 / L4 / Lb = lanes_per_output of bt*U /
bt*4U / bt*U:
  forward   W_mh rows U x S(H,L1) | W_mx rows U x S(H,L1) | W_hh rows 4U x S(H,L4) | W_ih rows
            4U x S(H,L4) | staged h or m bt x H | staged y bt x H | pre bt x 4U | scratch 2 x
            threads (every block allocates the input-side slices; layer 0 leaves them unused)
  backward  W_mh columns U x S(H,Lb) | W_hh columns U x S(4H,Lb) | [W_ih; W_mx] columns of
            the layer above U x S(5H,Lb) | staged dmh or dgh bt x 4H | staged [dgh; dmx] of the
            layer above bt x 5H | scratch 2 x threads
Registers: each phase recomputes its lane split and offsets (as gpurnn.kernels.mlstm).
"""
from __future__ import annotations

import functools

from numba import cuda, int32, void

from . import cellmath
from .cellmath import NUMBA_COMPUTE, NUMBA_STORAGE, codec
from .dtypes import ITEMSIZE, NP_COMPUTE, SHORT
from .layout import KernelSpec, lanes_per_output, padded_row
from .persistent import _grid_group_sync, _lane_split, _padded_row, _this_grid

CELL = "mlstm"
GATES = 4
KINDS = ("wavefront_fwd", "wavefront_bwd")
DTYPES = ("float32", "float64")       # the LSTM variants run in these (gpurnn.variants)
# Registers per thread the kernels are held to (tests/test_sim_wavefront_mlstm.py checks
# ptxas' counts against it; the plan refuses a block size that leaves fewer). ptxas 13 gives
# forward 178 (sm_80) / 156-164 (sm_90), backward 201-202 (sm_80) / 162-172 (sm_90): the
# backward's phase A forms two dot products (the recurrent one and the layer above's dx) before
# the cell math, over layout.KERNEL_REGS_MAX (192), as gpurnn.kernels.wavefront's REGS_MAX.
REGS_MAX = 208


def smem_regions(direction: str, hidden: int, batch_tile: int, units: int, threads: int):
    """(weight elements, compute elements) of one mLSTM wavefront block's dynamic shared
    memory."""
    if direction == "fwd":
        row_m = padded_row(hidden, lanes_per_output(batch_tile * units, threads))
        row_g = padded_row(hidden, lanes_per_output(batch_tile * GATES * units, threads))
        weights = 2 * units * row_m + 2 * GATES * units * row_g
        return weights, 2 * batch_tile * hidden + batch_tile * GATES * units + 2 * threads
    if direction == "bwd":
        lanes = lanes_per_output(batch_tile * units, threads)
        weights = units * (padded_row(hidden, lanes) + padded_row(GATES * hidden, lanes)
                           + padded_row((GATES + 1) * hidden, lanes))
        return weights, batch_tile * (2 * GATES + 1) * hidden + 2 * threads
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


def smem_bytes(direction: str, hidden: int, batch_tile: int, units: int, dtype: str, *,
               threads: int) -> int:
    """Bytes of dynamic shared memory per block (the plan's and the host's one model)."""
    weights, rest = smem_regions(direction, hidden, batch_tile, units, threads)
    w_bytes, c_bytes = ITEMSIZE[dtype], NP_COMPUTE[dtype](0).itemsize
    return -(-weights * w_bytes // c_bytes) * c_bytes + rest * c_bytes


def stages(direction: str, steps: int, layers: int) -> int:
    """Half-stages of one launch (the kernels' q range): forward 2(T+L-1), backward 2(T+L)-1."""
    if direction == "fwd":
        return 2 * (steps + layers - 1)
    if direction == "bwd":
        return 2 * (steps + layers) - 1
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


@functools.lru_cache(maxsize=None)
def make_fwd(dtype: str):
    """The mLSTM wavefront forward for dtype (arguments: the module docstring and signature();
    layers, q_begin, q_end, units, save, batch_tile are int32)."""
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    W_SMEM_TYPE = NUMBA_STORAGE[dtype]
    W_BYTES, C_BYTES = ITEMSIZE[dtype], DT(0).itemsize
    LOAD, _ = codec(dtype)
    ZERO = DT(0)
    fwd_unit, _ = cellmath.make("lstm", dtype)

    def kernel(gx, mx, w_mh, w_hh, w_mx, w_ih, bias, b_rec, h, c, gates, y, mh, m, lengths,
               layers, q_begin, q_end, units, save, batch_tile):
        grid = _this_grid()
        wsm = cuda.shared.array(0, dtype=W_SMEM_TYPE)     # one buffer: weights, then compute
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = gx.shape[0]
        B = h.shape[1] // layers
        H = h.shape[2]
        GH = 4 * H
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        P = cuda.gridDim.x // layers
        layer = cuda.blockIdx.x // P
        u0 = (cuda.blockIdx.x - layer * P) * units
        nu = max(0, min(units, H - u0))
        lb = layer * B                      # this layer's first row of the stacked batch
        gu = 4 * units
        row_m = _padded_row(H, _lane_split(batch_tile * units, stride)[0])
        row_g = _padded_row(H, _lane_split(batch_tile * gu, stride)[0])
        wx_off = units * row_m              # W_mx rows
        wg_off = 2 * units * row_m          # W_hh rows; W_ih rows at wg_off + gu * row_g
        st_off = ((wg_off + 2 * gu * row_g) * W_BYTES + C_BYTES - 1) // C_BYTES

        for idx in range(tid, nu * H, stride):
            k = idx // H
            col = idx % H
            wsm[k * row_m + col] = w_mh[layer * H + u0 + k, col]
            if layer > 0:
                wsm[wx_off + k * row_m + col] = w_mx[(layer - 1) * H + u0 + k, col]
        for idx in range(tid, 4 * nu * H, stride):
            col = idx % H
            row = idx // H
            k = row % nu
            g = row // nu
            at = wg_off + (g * units + k) * row_g + col
            wsm[at] = w_hh[layer * GH + g * H + u0 + k, col]
            if layer > 0:
                wsm[at + gu * row_g] = w_ih[(layer - 1) * GH + g * H + u0 + k, col]
        # no barrier here: the weights are first read after a staging barrier

        for q in range(q_begin, q_end):
            t = q // 2 - layer
            if t >= 0 and t < T:            # uniform over the block
                if q % 2 == 0:
                    # phase 1: mh, (l > 0) mx and m of the block's units
                    lanes_m, groups_m = _lane_split(batch_tile * units, stride)
                    lane_m = tid % lanes_m
                    row_m = _padded_row(H, lanes_m)
                    x_off = st_off + batch_tile * H
                    scr_off = x_off + batch_tile * H + batch_tile * gu
                    for b0 in range(0, B, batch_tile):
                        nb = min(batch_tile, B - b0)
                        if b0 > 0 and lanes_m == 1:
                            cuda.syncthreads()  # the last tile's dot products read h, y
                        for idx in range(tid, nb * H, stride):
                            smem[st_off + idx] = LOAD(h[t, lb + b0 + idx // H, idx % H])
                            if layer > 0:
                                smem[x_off + idx] = LOAD(y[t, lb - B + b0 + idx // H, idx % H])
                        cuda.syncthreads()
                        n_out = nb * nu
                        for rnd in range((n_out + groups_m - 1) // groups_m):
                            oi = rnd * groups_m + tid // lanes_m
                            acc = ZERO
                            acx = ZERO
                            if oi < n_out:
                                w_at = (oi % nu) * row_m
                                b_at = (oi // nu) * H
                                for col in range(lane_m, H, lanes_m):
                                    acc += LOAD(wsm[w_at + col]) * smem[st_off + b_at + col]
                                if layer > 0:
                                    for col in range(lane_m, H, lanes_m):
                                        acx += (LOAD(wsm[wx_off + w_at + col])
                                                * smem[x_off + b_at + col])
                            if lanes_m > 1:
                                smem[scr_off + tid] = acc
                                smem[scr_off + stride + tid] = acx
                                cuda.syncthreads()
                                if lane_m == 0 and oi < n_out:
                                    acc = ZERO
                                    acx = ZERO
                                    for j in range(lanes_m):    # fixed order: deterministic
                                        acc += smem[scr_off + tid + j]
                                    for j in range(lanes_m):
                                        acx += smem[scr_off + stride + tid + j]
                            if lane_m == 0 and oi < n_out:
                                b = lb + b0 + oi // nu
                                u = u0 + oi % nu
                                if layer > 0:
                                    mx[t, b, u] = acx
                                else:
                                    acx = mx[t, b, u]
                                if save:
                                    mh[t, b, u] = acc
                                m[b, u] = acx * acc
                else:
                    # phase 2: the gates of the block's units from the whole m (and y_{l-1})
                    lanes_g, groups_g = _lane_split(batch_tile * gu, stride)
                    lane_g = tid % lanes_g
                    row_g = _padded_row(H, lanes_g)
                    wg_off = 2 * units * _padded_row(H, _lane_split(batch_tile * units,
                                                                    stride)[0])
                    wi_off = wg_off + gu * row_g
                    x_off = st_off + batch_tile * H
                    pre_off = x_off + batch_tile * H
                    scr_off = pre_off + batch_tile * gu
                    for b0 in range(0, B, batch_tile):
                        nb = min(batch_tile, B - b0)
                        # no barrier between tiles: the update reads h_in from global, and
                        # `pre` and the scratch are rewritten only after the staging barrier
                        for idx in range(tid, nb * H, stride):
                            smem[st_off + idx] = m[lb + b0 + idx // H, idx % H]
                            if layer > 0:
                                smem[x_off + idx] = LOAD(y[t, lb - B + b0 + idx // H, idx % H])
                        cuda.syncthreads()
                        n_out = nb * 4 * nu
                        for rnd in range((n_out + groups_g - 1) // groups_g):
                            oi = rnd * groups_g + tid // lanes_g
                            k = 0
                            g = 0
                            b = 0
                            acc = ZERO
                            acx = ZERO
                            if oi < n_out:
                                k = oi % nu
                                bg = oi // nu
                                g = bg % 4
                                b = bg // 4
                                w_at = (g * units + k) * row_g
                                for col in range(lane_g, H, lanes_g):
                                    acc += LOAD(wsm[wg_off + w_at + col]) * smem[st_off + b * H
                                                                                 + col]
                                if layer > 0:
                                    for col in range(lane_g, H, lanes_g):
                                        acx += (LOAD(wsm[wi_off + w_at + col])
                                                * smem[x_off + b * H + col])
                            if lanes_g > 1:
                                smem[scr_off + tid] = acc
                                smem[scr_off + stride + tid] = acx
                                cuda.syncthreads()
                                if lane_g == 0 and oi < n_out:
                                    acc = ZERO
                                    acx = ZERO
                                    for j in range(lanes_g):    # fixed order: deterministic
                                        acc += smem[scr_off + tid + j]
                                    for j in range(lanes_g):
                                        acx += smem[scr_off + stride + tid + j]
                            if lane_g == 0 and oi < n_out:
                                smem[pre_off + (b * 4 + g) * units + k] = acc
                                if layer > 0:
                                    row = g * H + u0 + k
                                    gx[t, lb + b0 + b, row] = acx + bias[layer * GH + row]
                        cuda.syncthreads()      # `pre` and gx complete before the update
                        for idx in range(tid, nb * nu, stride):
                            k = idx % nu
                            b = idx // nu
                            p = pre_off + b * gu + k
                            u = u0 + k
                            h_in = LOAD(h[t, lb + b0 + b, u])
                            fwd_unit(gx, b_rec, h, c, gates, y, lengths, t, t, t + 1,
                                     lb + b0 + b, u, smem[p], smem[p + units],
                                     smem[p + 2 * units], smem[p + 3 * units], h_in, save)
            if q + 1 < q_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{CELL}_wavefront_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(dtype: str):
    """The mLSTM wavefront backward for dtype (the reverse wavefront; module docstring).
    dy (T, L*B, H): on entry the top layer's rows hold the caller's dy; the kernel writes the
    lower layers' rows (the upper layer's dx) before it reads them. dgh, dmh, dmx (T, L*B, 4H |
    H | H) written; dh_carry, dc_carry (L*B, H) in dL/dh_n, dL/dc_n, out dh0, dc0."""
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    W_SMEM_TYPE = NUMBA_STORAGE[dtype]
    W_BYTES, C_BYTES = ITEMSIZE[dtype], DT(0).itemsize
    LOAD, STORE = codec(dtype)
    ZERO = DT(0)
    _, bwd_unit = cellmath.make("lstm", dtype)

    def kernel(w_mh, w_hh, w_mx, w_ih, b_rec, h, c, gates, dy, mx, mh, dgh, dgx, dmh, dmx,
               dh_carry, dc_carry, lengths, layers, q_begin, q_end, units, batch_tile):
        grid = _this_grid()
        wsm = cuda.shared.array(0, dtype=W_SMEM_TYPE)
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = dy.shape[0]
        B = h.shape[1] // layers
        H = h.shape[2]
        GH = 4 * H
        XH = GH + H                         # a row of [dgh; dmx] of the layer above
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        P = cuda.gridDim.x // layers
        layer = cuda.blockIdx.x // P
        u0 = (cuda.blockIdx.x - layer * P) * units
        nu = max(0, min(units, H - u0))
        lb = layer * B
        up = layer + 1 < layers             # a layer above reads this layer's output
        lanes, groups = _lane_split(batch_tile * units, stride)
        lane = tid % lanes
        row_m = _padded_row(H, lanes)
        row_g = _padded_row(GH, lanes)
        row_x = _padded_row(XH, lanes)
        wg_off = units * row_m
        wx_off = wg_off + units * row_g
        st_off = ((wx_off + units * row_x) * W_BYTES + C_BYTES - 1) // C_BYTES
        dx_off = st_off + batch_tile * GH
        scr_off = dx_off + batch_tile * XH

        for idx in range(tid, H * nu, stride):
            k = idx % nu
            r = idx // nu
            wsm[k * row_m + r] = w_mh[layer * H + r, u0 + k]
            if up:                          # W_mx of layer+1 sits at rows layer*H of w_mx
                wsm[wx_off + k * row_x + GH + r] = w_mx[layer * H + r, u0 + k]
        for idx in range(tid, GH * nu, stride):
            k = idx % nu
            r = idx // nu
            wsm[wg_off + k * row_g + r] = w_hh[layer * GH + r, u0 + k]
            if up:                          # W_ih of layer+1 sits at rows layer*4H of w_ih
                wsm[wx_off + k * row_x + r] = w_ih[layer * GH + r, u0 + k]
        # no barrier here: the columns are first read after a staging barrier

        for q in range(q_begin, q_end):
            kk = q // 2 - (layers - 1 - layer)  # this layer's step of the per-layer backward
            if kk >= 0 and kk <= T:             # uniform over the block
                t = T - 1 - kk                  # -1 in the tail that only finishes dh0
                if q % 2 == 0:
                    # phase A: dy of the block's units, dh, the LSTM backward -> dgh[t]
                    has_next = kk > 0
                    has_up = up and t >= 0
                    staged = has_next or has_up
                    for b0 in range(0, B, batch_tile):
                        nb = min(batch_tile, B - b0)
                        if b0 > 0 and (lanes == 1) == staged:
                            cuda.syncthreads()  # the last tile read the staging or scratch
                        if staged:
                            if has_next:
                                for idx in range(tid, nb * H, stride):
                                    smem[st_off + idx] = dmh[t + 1, lb + b0 + idx // H, idx % H]
                            if has_up:
                                for idx in range(tid, nb * XH, stride):
                                    bi = lb + B + b0 + idx // XH
                                    f = idx % XH
                                    if f < GH:
                                        smem[dx_off + idx] = dgh[t, bi, f]
                                    else:
                                        smem[dx_off + idx] = dmx[t, bi, f - GH]
                            cuda.syncthreads()
                        n_out = nb * nu
                        for rnd in range((n_out + groups - 1) // groups):
                            oi = rnd * groups + tid // lanes
                            dh_rec = ZERO
                            dxv = ZERO
                            if oi < n_out:
                                w_at = (oi % nu) * row_m
                                if has_next:
                                    d_at = st_off + (oi // nu) * H
                                    for r in range(lane, H, lanes):
                                        dh_rec += LOAD(wsm[w_at + r]) * smem[d_at + r]
                                if has_up:
                                    w_at = wx_off + (oi % nu) * row_x
                                    d_at = dx_off + (oi // nu) * XH
                                    for r in range(lane, XH, lanes):
                                        dxv += LOAD(wsm[w_at + r]) * smem[d_at + r]
                            if lanes > 1:
                                smem[scr_off + tid] = dh_rec
                                smem[scr_off + stride + tid] = dxv
                                cuda.syncthreads()
                                if lane == 0 and oi < n_out:
                                    dh_rec = ZERO
                                    dxv = ZERO
                                    for j in range(lanes):      # fixed order: deterministic
                                        dh_rec += smem[scr_off + tid + j]
                                    for j in range(lanes):
                                        dxv += smem[scr_off + stride + tid + j]
                            if lane == 0 and oi < n_out:
                                b = lb + b0 + oi // nu
                                u = u0 + oi % nu
                                if has_up:
                                    dy[t, b, u] = STORE(dxv)
                                dh = dh_carry[b, u] + dh_rec
                                if t < 0:
                                    dh_carry[b, u] = dh
                                else:
                                    bwd_unit(b_rec, h, c, gates, dy, dgh, dgx, dh_carry,
                                             dc_carry, lengths, t, t, t + 1, b, u, dh)
                elif kk < T:
                    # phase B: dm of the block's units from every unit's dgh[t]; dmh, dmx
                    for b0 in range(0, B, batch_tile):
                        nb = min(batch_tile, B - b0)
                        if b0 > 0 and lanes == 1:
                            cuda.syncthreads()  # the last tile's dot products read dgh
                        for idx in range(tid, nb * GH, stride):
                            smem[st_off + idx] = dgh[t, lb + b0 + idx // GH, idx % GH]
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
                                    for j in range(lanes):      # fixed order: deterministic
                                        dm += smem[scr_off + tid + j]
                            if lane == 0 and oi < n_out:
                                b = lb + b0 + oi // nu
                                u = u0 + oi % nu
                                if t < lengths[b]:
                                    dmh[t, b, u] = dm * mx[t, b, u]
                                    dmx[t, b, u] = dm * mh[t, b, u]
                                else:
                                    # masked: m reached nothing (mx may hold padding's NaN)
                                    dmh[t, b, u] = ZERO
                                    dmx[t, b, u] = ZERO
            # lanes > 1 means one round, and the grid barrier orders this half-stage's scratch
            # reads before the next one's writes
            if q + 1 < q_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{CELL}_wavefront_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


def signature(kind: str, dtype: str):
    """The Numba signature of an mLSTM wavefront kernel (arrays C-contiguous, scalars int32)."""
    s, c = NUMBA_STORAGE[dtype], NUMBA_COMPUTE[dtype]
    s2, s3 = s[:, ::1], s[:, :, ::1]
    c1, c2, c3 = c[::1], c[:, ::1], c[:, :, ::1]
    i1 = int32[::1]
    if kind == "wavefront_fwd":
        # gx, mx, w_mh, w_hh, w_mx, w_ih, bias, b_rec, h, c, gates, y, mh, m, lengths, layers,
        # q_begin, q_end, units, save, batch_tile
        return void(c3, c3, s2, s2, s2, s2, c1, c1, s3, c3, s3, s3, c3, c2, i1, int32, int32,
                    int32, int32, int32, int32)
    if kind == "wavefront_bwd":
        # w_mh, w_hh, w_mx, w_ih, b_rec, h, c, gates, dy, mx, mh, dgh, dgx, dmh, dmx, dh_carry,
        # dc_carry, lengths, layers, q_begin, q_end, units, batch_tile
        return void(s2, s2, s2, s2, c1, s3, c3, s3, s3, c3, c3, c3, c3, c3, c3, c2, c2, i1,
                    int32, int32, int32, int32, int32)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


@functools.lru_cache(maxsize=None)
def spec(kind: str, dtype: str) -> KernelSpec:
    """The specialization of one mLSTM wavefront kernel for dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    func = (make_fwd if kind == "wavefront_fwd" else make_bwd)(dtype)
    return KernelSpec(name=func.__name__, func=func, signature=signature(kind, dtype), cell=CELL,
                      kind=kind, dtype=dtype, grid_sync=True)


def specializations(dtypes=DTYPES) -> list[KernelSpec]:
    """Every mLSTM wavefront kernel: the dtypes x (fwd, bwd)."""
    return [spec(kind, dtype) for dtype in dtypes for kind in KINDS]
