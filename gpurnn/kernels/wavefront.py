"""The layer wavefront: a whole stacked unidirectional LSTM / GRU / RNN (tanh, relu), or a stack
of the LSTM variants that are kernel cells (lstm_peephole, cifg, cifg_peephole: gpurnn.cells),
in ONE persistent cooperative launch each way (host side: gpurnn/backends/cuda_wavefront.py,
plan: gpurnn/planning/wavefront.py). The per-unit math is cellmath.make(cell, dtype)'s fwd_unit
/ bwd_unit, unchanged (make_stacked: the same functions, told where their layer's b_rec
starts), and the dot products are split and summed exactly as
gpurnn.kernels.persistent's, so every layer's recurrence is the per-layer kernel's, bit for bit,
given the same inputs (tests/test_sim_wavefront.py).

Stacked layout. L layers of one hidden size H, batch B. Every per-layer array is stacked along
the BATCH axis: row l*B + b is layer l's batch row b. So cellmath's unit functions, which index
[t, b, u] and test t < lengths[b], run unchanged on the stacked arrays (lengths tiled L times),
and layer l's reserve is the row block [l*B, (l+1)*B) in gpurnn.cells' layout:
  gx     (T, L*B, G*H)  input pre-activations with the folded bias (gpurnn.cells): layer 0's
                        from the host's GEMM x W_ih^T + b before the launch; layer l > 0's are
                        formed in the launch (its input is produced there) and written here,
                        then read back by fwd_unit like any Gx
  h, c   (T+1, L*B, H)  boundary states (h0 / c0 at t = 0); c: LSTM only, else (1,1,1)
  gates  (T, L*B, S*H)  activated gates (training forward); y (T, L*B, H) every layer's output
  w_hh   (L*G*H, H)     the layers' W_hh stacked; w_ih (max(L-1, 1)*G*H, H) W_ih of layers
                        1..L-1 (layer 0's W_ih is only the host's GEMM)
  b_rec  (L*n,)         each layer's b_rec of its per-layer launch, stacked: GRU's b_hh (n = 3H,
                        zeros without bias), the peephole vector (lstm_peephole 3H,
                        cifg_peephole 2H), else a placeholder (n = 1); layer l's starts at
                        l*n
Grid: L*P blocks, 1-D; block q belongs to layer l = q // P and owns the unit slice
U_j = [j*U, min((j+1)*U, H)) of it, j = q % P, U = `units` (gpurnn.kernels.layout). A block
past H owns no unit and only takes part in the barriers.

Forward: stage s = 0 .. T+L-2, layer l computes step t = s - l where 0 <= t < T.
  Its block keeps, for its units, the W_hh rows AND (l > 0) the W_ih rows of its layer in
  shared memory for the whole launch. Per stage, per batch tile of bt rows: stage h_l[t] and
  (l > 0) y_{l-1}[t] (written by layer l-1 one stage earlier) -> syncthreads -> a group of
  `lanes` lanes per (b, g, k) forms the recurrent product into `pre` and (l > 0) the input
  product; lane 0 adds the partial sums in lane order (after a syncthreads when lanes > 1),
  writes the input pre-activation + bias to gx -> syncthreads -> thread per (b, k): fwd_unit.
  fwd_unit reads its layer's b_rec (GRU's b_hn inside the reset product, the peepholes) at
  offset l*n, exactly as the per-layer kernel reads its own.
Backward: the reverse wavefront, stage s = 0 .. T+L-1, layer l runs the per-layer backward's
  phase kk = s - (L-1-l) where 0 <= kk <= T (kk = T only finishes dh0), i.e. step
  t = T-1-kk. Its block keeps the W_hh columns of its units and (l < L-1) the W_ih columns of
  its units of the layer ABOVE (layer l's output is layer l+1's input). Per stage, per tile:
  stage dgh_l[t+1] (its own layer's, written one stage earlier) and dgx_{l+1}[t] (the layer
  above's input-side gate gradients of the same step, written one stage earlier) ->
  syncthreads -> per (b, k): dh_rec = W_hh[:, u]^T dgh_l[t+1] and dx = W_ih_{l+1}[:, u]^T
  dgx_{l+1}[t] (lane partials, a syncthreads, lane 0 adds in lane order); lane 0 writes dx as
  layer l's dy[t] (the per-layer stack's dy of a lower layer is the upper layer's dx) and runs
  bwd_unit(dh_carry + dh_rec), which adds dy itself, as in the per-layer kernel.
  dx of layer 0 (w.r.t. the stack's input) and every weight gradient are the host's GEMMs
  afterwards (gpurnn.backends.cuda_wavefront), as gpurnn.backends.cuda does per layer.
Barriers. ONE grid barrier per stage (forward T+L-2 in all, backward T+L-1): a stage's inputs
  are the previous stage's outputs of other blocks (the layer's own h_{t-1} / dgh_{t+1} from
  every block of the layer, and layer l-1's y_t / layer l+1's dgx_t), and nothing a stage
  writes is read in the same stage by another block (layer l writes h_l[t+1], y_l[t], gx_l[t]
  forward, dgh_l[t], dgx_l[t], dy_l[t] backward; its neighbours at the same stage touch other
  time indices). So one barrier per stage is both necessary and sufficient; the whole stack
  costs T+L-1 stages instead of L*T per-layer steps. Every block reaches every grid barrier:
  a layer with no step at a stage skips only its tile loop (uniform per block) and still
  joins the barrier. Block barriers per tile: forward 3 (staging, the scratch when lanes > 1,
  `pre` before the pointwise update) + 1 between tiles; backward 1 after a staging (none when
  there is nothing to stage) + 1 for the scratch when lanes > 1 + 1 between tiles where the
  next tile's writes would meet this tile's reads (lanes = 1 with a staging, lanes > 1
  without), as gpurnn.kernels.persistent. tests/test_sim_wavefront.py deletes each in turn.
No atomics; every sum in a fixed order; no dropout between layers (the host keeps per-layer
  launches when dropout > 0).
Shared memory (smem_regions below; weights in the storage dtype, then compute values from
  the first compute-aligned element):
  forward   W_hh rows G*U x S | W_ih rows G*U x S (allocated in every block, loaded for l > 0)
            | h tile bt x H | input tile bt x H | pre bt x G*U | scratch 2 x threads
            S = layout.padded_row(H, lanes_per_output(bt*G*U, threads))
  backward  W_hh columns U x S | W_ih (layer above) columns U x S | dgh tile bt x G*H |
            dgx tile bt x G*H | scratch 2 x threads, S = padded_row(G*H, lanes_per_output(bt*U))
"""
from __future__ import annotations

import functools

from numba import cuda, int32, void

from . import cellmath
from ..cells import CELLS, GATES, KERNEL_CELLS
from .cellmath import NUMBA_COMPUTE, NUMBA_STORAGE, codec
from .dtypes import ITEMSIZE, NP_COMPUTE, SHORT
from .layout import KernelSpec, lanes_per_output, padded_row
from .persistent import _grid_group_sync, _lane_split, _padded_row, _this_grid

KINDS = ("wavefront_fwd", "wavefront_bwd")
# float32 / float64 only. The kernels are written for 16-bit storage too (LOAD / STORE of
# cellmath.codec), but untested in the simulator, and GRU's 16-bit forward needs 191 (sm_80) /
# 199 (sm_90) registers, over layout.KERNEL_REGS_MAX: not offered until both are addressed.
DTYPES = ("float32", "float64")
# lstm, gru, rnn_tanh, rnn_relu and the kernel-cell LSTM variants (the projection and the
# mLSTM take a second phase per step: gpurnn.kernels.projection / mlstm, per layer)
WAVEFRONT_CELLS = CELLS + KERNEL_CELLS
# Registers per thread the wavefront kernels are held to (tests/test_sim_wavefront.py checks
# ptxas' counts against it): each stage forms two dot products (the input's and the recurrent
# one) before the cell math; ptxas gives up to 202 on sm_90 (cifg_peephole's forward), over the
# registry kernels' layout.KERNEL_REGS_MAX (192). 208 allows 304 threads; the plan refuses a
# block size that leaves fewer registers (gpurnn.planning.wavefront.fit).
REGS_MAX = 208


def smem_regions(direction: str, gates: int, hidden: int, batch_tile: int, units: int,
                 threads: int):
    """(weight elements, compute elements) of one wavefront block's dynamic shared memory."""
    if direction == "fwd":
        row = padded_row(hidden, lanes_per_output(batch_tile * gates * units, threads))
        return (2 * gates * units * row,
                2 * batch_tile * hidden + batch_tile * gates * units + 2 * threads)
    if direction == "bwd":
        row = padded_row(gates * hidden, lanes_per_output(batch_tile * units, threads))
        return 2 * units * row, 2 * batch_tile * gates * hidden + 2 * threads
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


def smem_bytes(direction: str, gates: int, hidden: int, batch_tile: int, units: int, dtype: str,
               *, threads: int) -> int:
    """Bytes of dynamic shared memory per block (the plan's and the host's one model)."""
    from .dtypes import COMPUTE
    w, rest = smem_regions(direction, gates, hidden, batch_tile, units, threads)
    wi, ci = ITEMSIZE[dtype], ITEMSIZE[COMPUTE[dtype]]
    return -(-w * wi // ci) * ci + rest * ci


@functools.lru_cache(maxsize=None)
def make_fwd(cell: str, dtype: str):
    """The wavefront forward kernel for cell, dtype (arguments: the module docstring and
    signature() below; layers, s_begin, s_end, units, save_gates, batch_tile are int32)."""
    G = GATES[cell]
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    W_SMEM_TYPE = NUMBA_STORAGE[dtype]
    W_BYTES, C_BYTES = ITEMSIZE[dtype], DT(0).itemsize
    LOAD, _ = codec(dtype)
    ZERO = DT(0)
    fwd_unit, _ = cellmath.make_stacked(cell, dtype)

    def kernel(gx, w_hh, w_ih, bias, b_rec, h, c, gates, y, lengths, layers, s_begin, s_end,
               units, save_gates, batch_tile):
        grid = _this_grid()
        wsm = cuda.shared.array(0, dtype=W_SMEM_TYPE)
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = gx.shape[0]
        B = h.shape[1] // layers
        H = h.shape[2]
        GH = G * H
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        P = cuda.gridDim.x // layers
        layer = cuda.blockIdx.x // P
        u0 = (cuda.blockIdx.x - layer * P) * units
        nu = max(0, min(units, H - u0))
        lb = layer * B                      # this layer's first row of the stacked batch
        gu = G * units
        lanes, groups = _lane_split(batch_tile * gu, stride)
        lane = tid % lanes
        row_len = _padded_row(H, lanes)
        wi_off = gu * row_len
        h_off = (2 * gu * row_len * W_BYTES + C_BYTES - 1) // C_BYTES
        x_off = h_off + batch_tile * H
        pre_off = x_off + batch_tile * H
        scr_off = pre_off + batch_tile * gu

        for idx in range(tid, G * nu * H, stride):
            m = idx % H
            row = idx // H
            k = row % nu
            g = row // nu
            wsm[(g * units + k) * row_len + m] = w_hh[layer * GH + g * H + u0 + k, m]
            if layer > 0:
                wsm[wi_off + (g * units + k) * row_len + m] = \
                    w_ih[(layer - 1) * GH + g * H + u0 + k, m]
        # no barrier here: the weights are first read after the staging barrier

        for s in range(s_begin, s_end):
            t = s - layer
            if t >= 0 and t < T:            # uniform over the block
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if b0 > 0:
                        cuda.syncthreads()  # the last tile's update has read h, pre
                    for idx in range(tid, nb * H, stride):
                        smem[h_off + idx] = LOAD(h[t, lb + b0 + idx // H, idx % H])
                        if layer > 0:
                            smem[x_off + idx] = LOAD(y[t, lb - B + b0 + idx // H, idx % H])
                    cuda.syncthreads()
                    n_out = nb * G * nu
                    for rnd in range((n_out + groups - 1) // groups):
                        oi = rnd * groups + tid // lanes
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
                            w_at = (g * units + k) * row_len
                            h_at = h_off + b * H
                            for m in range(lane, H, lanes):
                                acc += LOAD(wsm[w_at + m]) * smem[h_at + m]
                            if layer > 0:
                                x_at = x_off + b * H
                                for m in range(lane, H, lanes):
                                    acx += LOAD(wsm[wi_off + w_at + m]) * smem[x_at + m]
                        if lanes > 1:
                            smem[scr_off + tid] = acc
                            smem[scr_off + stride + tid] = acx
                            cuda.syncthreads()
                            if lane == 0 and oi < n_out:
                                acc = ZERO
                                acx = ZERO
                                for q in range(lanes):          # fixed order: deterministic
                                    acc += smem[scr_off + tid + q]
                                for q in range(lanes):
                                    acx += smem[scr_off + stride + tid + q]
                        if lane == 0 and oi < n_out:
                            row = g * H + u0 + k
                            smem[pre_off + (b * G + g) * units + k] = acc
                            if layer > 0:
                                gx[t, lb + b0 + b, row] = acx + bias[layer * GH + row]
                    # lanes > 1 means one round: this barrier orders `pre` and gx before the
                    # pointwise update
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
                        h_in = smem[h_off + b * H + u]
                        rb = layer * (b_rec.shape[0] // layers)     # its layer's b_rec
                        fwd_unit(gx, b_rec, rb, h, c, gates, y, lengths, t, t, t + 1,
                                 lb + b0 + b, u, r0, r1, r2, r3, h_in, save_gates)
            if s + 1 < s_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{cell}_wavefront_fwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


@functools.lru_cache(maxsize=None)
def make_bwd(cell: str, dtype: str):
    """The wavefront backward kernel for cell, dtype (the reverse wavefront; module docstring).
    dy (T, L*B, H): on entry the top layer's rows hold the caller's dy; the kernel writes the
    lower layers' rows (the upper layer's dx) before it reads them."""
    G = GATES[cell]
    IS_GRU = cell == "gru"
    DT = NP_COMPUTE[dtype]
    SMEM_TYPE = NUMBA_COMPUTE[dtype]
    W_SMEM_TYPE = NUMBA_STORAGE[dtype]
    W_BYTES, C_BYTES = ITEMSIZE[dtype], DT(0).itemsize
    LOAD, STORE = codec(dtype)
    ZERO = DT(0)
    _, bwd_unit = cellmath.make_stacked(cell, dtype)

    def kernel(w_hh, w_ih, b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths,
               layers, s_begin, s_end, units, batch_tile):
        grid = _this_grid()
        wsm = cuda.shared.array(0, dtype=W_SMEM_TYPE)
        smem = cuda.shared.array(0, dtype=SMEM_TYPE)
        T = dy.shape[0]
        B = h.shape[1] // layers
        H = h.shape[2]
        GH = G * H
        tid = cuda.threadIdx.x
        stride = cuda.blockDim.x
        P = cuda.gridDim.x // layers
        layer = cuda.blockIdx.x // P
        u0 = (cuda.blockIdx.x - layer * P) * units
        nu = max(0, min(units, H - u0))
        lb = layer * B
        rb = layer * (b_rec.shape[0] // layers)     # this layer's b_rec
        up = layer + 1 < layers             # a layer above reads this layer's output
        lanes, groups = _lane_split(batch_tile * units, stride)
        lane = tid % lanes
        row_len = _padded_row(GH, lanes)
        wi_off = units * row_len
        dg_off = (2 * units * row_len * W_BYTES + C_BYTES - 1) // C_BYTES
        dx_off = dg_off + batch_tile * GH
        scr_off = dx_off + batch_tile * GH

        for idx in range(tid, GH * nu, stride):
            k = idx % nu
            row = idx // nu
            wsm[k * row_len + row] = w_hh[layer * GH + row, u0 + k]
            if up:                          # W_ih of layer+1 sits at rows layer*GH of w_ih
                wsm[wi_off + k * row_len + row] = w_ih[layer * GH + row, u0 + k]
        # no barrier here: the columns are first read after a stage's staging barrier

        for s in range(s_begin, s_end):
            kk = s - (layers - 1 - layer)   # this layer's phase of the per-layer backward
            if kk >= 0 and kk <= T:         # uniform over the block
                t = T - 1 - kk              # the step; -1 in the tail that only finishes dh0
                has_next = kk > 0
                has_up = up and t >= 0
                staged = has_next or has_up
                for b0 in range(0, B, batch_tile):
                    nb = min(batch_tile, B - b0)
                    if b0 > 0 and (lanes == 1) == staged:
                        cuda.syncthreads()  # as gpurnn.kernels.persistent's backward
                    if staged:
                        for idx in range(tid, nb * GH, stride):
                            bi = b0 + idx // GH
                            f = idx % GH
                            if has_next:
                                smem[dg_off + idx] = dgh[t + 1, lb + bi, f]
                            if has_up:
                                if IS_GRU:
                                    smem[dx_off + idx] = dgx[t, lb + B + bi, f]
                                else:
                                    smem[dx_off + idx] = dgh[t, lb + B + bi, f]
                        cuda.syncthreads()
                    n_out = nb * nu
                    for rnd in range((n_out + groups - 1) // groups):
                        oi = rnd * groups + tid // lanes
                        dh_rec = ZERO
                        dxv = ZERO
                        if oi < n_out:
                            dg_at = (oi // nu) * GH
                            w_at = (oi % nu) * row_len
                            if has_next:
                                for row in range(lane, GH, lanes):
                                    dh_rec += LOAD(wsm[w_at + row]) * smem[dg_off + dg_at + row]
                            if has_up:
                                for row in range(lane, GH, lanes):
                                    dxv += LOAD(wsm[wi_off + w_at + row]) * smem[dx_off + dg_at
                                                                                  + row]
                        if lanes > 1:
                            smem[scr_off + tid] = dh_rec
                            smem[scr_off + stride + tid] = dxv
                            cuda.syncthreads()
                            if lane == 0 and oi < n_out:
                                dh_rec = ZERO
                                dxv = ZERO
                                for q in range(lanes):          # fixed order: deterministic
                                    dh_rec += smem[scr_off + tid + q]
                                for q in range(lanes):
                                    dxv += smem[scr_off + stride + tid + q]
                        if lane == 0 and oi < n_out:
                            u = u0 + oi % nu
                            b = lb + b0 + oi // nu
                            if has_up:
                                dy[t, b, u] = STORE(dxv)
                            dh = dh_carry[b, u] + dh_rec
                            if t < 0:
                                dh_carry[b, u] = dh
                            else:
                                bwd_unit(b_rec, rb, h, c, gates, dy, dgh, dgx, dh_carry,
                                         dc_carry, lengths, t, t, t + 1, b, u, dh)
            # lanes > 1 means one round, and the grid barrier orders this stage's scratch reads
            # before the next stage's writes
            if s + 1 < s_end:
                _grid_group_sync(grid)

    kernel.__name__ = f"{cell}_wavefront_bwd_{SHORT[dtype]}"
    kernel.__qualname__ = kernel.__name__
    return kernel


def signature(kind: str, dtype: str):
    """The Numba signature of a wavefront kernel (arrays C-contiguous, scalars int32)."""
    s, c = NUMBA_STORAGE[dtype], NUMBA_COMPUTE[dtype]
    s2, s3 = s[:, ::1], s[:, :, ::1]
    c1, c2, c3 = c[::1], c[:, ::1], c[:, :, ::1]
    i1 = int32[::1]
    if kind == "wavefront_fwd":
        # gx, w_hh, w_ih, bias, b_rec, h, c, gates, y, lengths, layers, s_begin, s_end, units,
        # save_gates, batch_tile
        return void(c3, s2, s2, c1, c1, s3, c3, s3, s3, i1, int32, int32, int32, int32, int32,
                    int32)
    if kind == "wavefront_bwd":
        # w_hh, w_ih, b_rec, h, c, gates, dy, dgh, dgx, dh_carry, dc_carry, lengths, layers,
        # s_begin, s_end, units, batch_tile
        return void(s2, s2, c1, s3, c3, s3, s3, c3, c3, c2, c2, i1, int32, int32, int32, int32,
                    int32)
    raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")


@functools.lru_cache(maxsize=None)
def spec(cell: str, kind: str, dtype: str) -> KernelSpec:
    """The specialization of one wavefront kernel for cell and dtype."""
    if cell not in WAVEFRONT_CELLS:
        raise ValueError(f"cell must be one of {WAVEFRONT_CELLS}; got {cell!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}; got {dtype!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    func = (make_fwd if kind == "wavefront_fwd" else make_bwd)(cell, dtype)
    return KernelSpec(name=func.__name__, func=func, signature=signature(kind, dtype), cell=cell,
                      kind=kind, dtype=dtype, grid_sync=True)


def specializations(dtypes=DTYPES) -> list[KernelSpec]:
    """Every wavefront kernel: 7 cells (WAVEFRONT_CELLS) x the storage dtypes x (fwd, bwd)."""
    return [spec(cell, kind, dtype) for cell in WAVEFRONT_CELLS for dtype in dtypes
            for kind in KINDS]
