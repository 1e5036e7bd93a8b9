"""Numba kernels of the CPU fast path: one worker per direction of the pass (forward, backward)
that every thread of an OpenMP team runs over the whole sequence. Cell math and reserve layout
as gpurnn/cells.py; the readable version of the same algorithm is gpurnn/backends/numpy.py.

Who owns what. A team of `nt` threads shares a layer in one of two ways (SZ_MODE):

MODE_UNITS (the CPU form of docs/design.md §2's persistent kernel), for small batches: the hidden
units are cut into P parts of `nmax` units (the last may be shorter); part k owns units
[k*nmax, k*nmax + n_k) and keeps its own rows of W_ih and W_hh for all G gates (`wx[k]`,
`wh[k]`: (G*n_k, I), (G*n_k, H), gate-major), packed once per weight version where the BLAS
can (MKL), so each core streams only its slice of W_hh every step. Thread `tid` runs parts
tid, tid + nt, ... so any team size is correct.
  Forward: per chunk of ~512 rows, each thread projects its parts' inputs in one GEMM; per
  step: h_{t-1} W_k^T added into those rows (one GEMM per part), the fused pointwise update of
  the part's units, and **one barrier** (h_t complete before any thread reads it).
  Backward: per step: the pointwise gate gradients of the thread's units, **one barrier** (all
  of dgates_t written), then dh_{t-1}[:, own units] = dgates_t W_hh[:, own units].
MODE_ROWS, from a few batch rows per thread: thread tid owns the batch rows [tid*SZ_ROWS,
(tid+1)*SZ_ROWS) (independent sequences) with all units (one part, P = 1, all of W_ih and W_hh
packed per thread for its number of rows) and never waits for another thread in the loop:
per step one GEMM for its rows' input projection, one for the recurrent product, the update.
Both: after the loop one barrier, then dx, dW_ih, dW_hh and the bias sums as large GEMMs split
by rows over the team. dc never crosses threads.

Arguments: `sz` and `rt` are int64 vectors (indices SZ_*, RT_*). Arrays that a call does not use
are 1-element placeholders. Kernels never allocate, never validate and never raise.
"""
from __future__ import annotations

import math

import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import overload

from ..cells import CELLS
from .native import GEMM_CBLAS64, GEMM_FORTRAN, call_byref, call_i32, call_void, voidptr

LSTM, GRU, RNN_TANH, RNN_RELU = (CELLS.index(c) for c in ("lstm", "gru", "rnn_tanh", "rnn_relu"))

# sz: sizes and switches of one call
(SZ_T, SZ_B, SZ_I, SZ_H, SZ_CELL, SZ_REV, SZ_HASLEN, SZ_SAVE, SZ_P, SZ_NMAX, SZ_G, SZ_S, SZ_MODE,
 SZ_ROWS, SZ_WORDS) = range(15)
# SZ_MODE: how the team shares the work (see the module's docstring)
MODE_UNITS, MODE_ROWS = 0, 1
# rt: the GEMM kind, then addresses (0: absent): gemm, MKL packed compute, OpenMP barrier,
# MKL's thread-local thread count, omp_get_thread_num, omp_get_num_threads, gemv, MKL pack
(RT_KIND, RT_GEMM, RT_COMPUTE, RT_BARRIER, RT_LOCAL, RT_THREAD_NUM, RT_NUM_THREADS, RT_GEMV,
 RT_PACK) = range(9)
# flags: per call, shared by the team: [0] out: the weights differed from the prepared parts
# (copied now); [1] in: the pack buffer must be (re)packed even if they did not; [2] in: bias
FLAG_CHANGED, FLAG_REPACK, FLAG_BIAS = 0, 1, 2
VEC = 16   # sizes of sz and rt in an argument block

# Fortran/CBLAS constants
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED = 101, 111, 112, 151
_N, _T = ord("N"), ord("T")

_FAST = {"contract", "arcp"}     # FMA and reciprocal multiply; never nnan/ninf (NaN must propagate)
_JIT = dict(nogil=True, error_model="numpy", fastmath=_FAST, cache=True)

# ---- activations ---------------------------------------------------------------------------------
# float32: an odd rational minimax fit of tanh on [-9, 9] (relative error 2e-8 in exact
# arithmetic, <= 4e-7 absolute in float32; tanh(9) rounds to 1 in float32), so LLVM vectorises
# it. float64: math.tanh, so float64 matches the NumPy reference to rounding.
_P = tuple(np.float32(v) for v in (1.0, 1.33810448e-01, 3.49561094e-03, 2.06094598e-05, 1.33551857e-08))
_Q = tuple(np.float32(v) for v in (1.0, 4.67143604e-01, 2.58770688e-02, 3.28567223e-04, 7.77677279e-07))
_P0, _P1, _P2, _P3, _P4 = _P
_Q0, _Q1, _Q2, _Q3, _Q4 = _Q
_NINE, _ONE, _HALF = np.float32(9.0), np.float32(1.0), np.float32(0.5)


def tanh(x):
    """tanh for the kernels (see the overload)."""
    return math.tanh(x)


@overload(tanh, inline="always")
def _tanh_impl(x):
    if x == types.float32:
        def fast(x):
            # max/min with x first return x when it is NaN: NaN passes through
            v = min(max(x, -_NINE), _NINE)
            s = v * v
            p = (((_P4 * s + _P3) * s + _P2) * s + _P1) * s + _P0
            q = (((_Q4 * s + _Q3) * s + _Q2) * s + _Q1) * s + _Q0
            return min(max(v * p / q, -_ONE), _ONE)
        return fast
    return lambda x: math.tanh(x)


def sigmoid(x):
    """sigmoid for the kernels: the reference's 0.5*tanh(x/2) + 0.5 (no exp to overflow)."""
    return 0.5 * math.tanh(0.5 * x) + 0.5


@overload(sigmoid, inline="always")
def _sigmoid_impl(x):
    half = np.float32(0.5) if x == types.float32 else 0.5
    return lambda x: half * tanh(half * x) + half


# ---- GEMM ----------------------------------------------------------------------------------------

@njit(inline="always")
def _row(a, i):
    """Row i of a 2-D view with unit inner stride, as a C-contiguous 1-D array (so the loops
    over it vectorise; a slice of a slice is typed 'any layout' by Numba)."""
    return carray(voidptr(a.ctypes.data + i * a.strides[0]), (a.shape[1],), a.dtype)


@njit(nogil=True, error_model="numpy", fastmath={"contract", "reassoc"}, cache=True)
def gemm_loops(a, ta, b, tb, c, beta):
    """c = op(a) op(b) + beta*c with Numba loops (the BLAS of last resort); ta and tb not both."""
    m, n = c.shape
    k = a.shape[0] if ta else a.shape[1]
    zero = c.dtype.type(0)
    for i in range(m):
        ci = _row(c, i)
        for j in range(n):
            ci[j] = zero if beta == 0 else ci[j] * beta
    if not ta and not tb:                      # c += a @ b
        for i in range(m):
            ci, ai = _row(c, i), _row(a, i)
            for p in range(k):
                bp, aip = _row(b, p), ai[p]
                for j in range(n):
                    ci[j] += aip * bp[j]
    elif not ta:                               # c += a @ b^T: dot products
        for i in range(m):
            ci, ai = _row(c, i), _row(a, i)
            for j in range(n):
                bj = _row(b, j)
                s = zero
                for p in range(k):
                    s += ai[p] * bj[p]
                ci[j] += s
    else:                                      # c += a^T @ b
        for p in range(k):
            ap, bp = _row(a, p), _row(b, p)
            for i in range(m):
                ci, api = _row(c, i), ap[i]
                for j in range(n):
                    ci[j] += api * bp[j]


@njit(inline="always")
def _ld(a):
    return max(1, a.strides[0] // a.itemsize) if a.shape[0] > 1 else max(1, a.shape[1])


@njit(inline="always")
def gemm(rt, a, ta, b, tb, c, beta):
    """Row-major c (m, n) = op(a) @ op(b) + beta * c on 2-D views with unit inner stride;
    op(a) is a.T when ta. beta == 0 never reads c."""
    m, n = c.shape
    k = a.shape[0] if ta else a.shape[1]
    kind = rt[RT_KIND]
    one = c.dtype.type(1)
    bt = c.dtype.type(beta)
    if kind == GEMM_FORTRAN:
        # column-major view of the same memory: c^T = op(b)^T op(a)^T
        call_byref(rt[RT_GEMM], (np.uint8(_T if tb else _N), np.uint8(_T if ta else _N),
                                 np.int32(n), np.int32(m), np.int32(k), one,
                                 voidptr(b.ctypes.data), np.int32(_ld(b)),
                                 voidptr(a.ctypes.data), np.int32(_ld(a)), bt,
                                 voidptr(c.ctypes.data), np.int32(_ld(c))))
    elif kind == GEMM_CBLAS64:
        call_void(rt[RT_GEMM], (np.int32(_ROW_MAJOR), np.int32(_TRANS if ta else _NO_TRANS),
                                np.int32(_TRANS if tb else _NO_TRANS), np.int64(m), np.int64(n),
                                np.int64(k), one, a.ctypes.data, np.int64(_ld(a)), b.ctypes.data,
                                np.int64(_ld(b)), bt, c.ctypes.data, np.int64(_ld(c))))
    else:
        gemm_loops(a, ta, b, tb, c, beta)


@njit(inline="always")
def gemv(rt, w, trans, x, y, beta):
    """Row-major y = op(w) @ x + beta*y (op(w) = w.T when trans) on a 2-D view w with unit
    inner stride and contiguous x, y: the per-step product at B = 1, a matrix-vector product."""
    r, c = w.shape
    kind = rt[RT_KIND]
    one, zero = y.dtype.type(1), y.dtype.type(beta)
    if kind == GEMM_FORTRAN:
        # column-major view: w is (c, r) with leading dimension ld(w)
        call_byref(rt[RT_GEMV], (np.uint8(_N if trans else _T), np.int32(c), np.int32(r), one,
                                 voidptr(w.ctypes.data), np.int32(_ld(w)), voidptr(x.ctypes.data),
                                 np.int32(1), zero, voidptr(y.ctypes.data), np.int32(1)))
    elif kind == GEMM_CBLAS64:
        call_void(rt[RT_GEMV], (np.int32(_ROW_MAJOR), np.int32(_TRANS if trans else _NO_TRANS),
                                np.int64(r), np.int64(c), one, w.ctypes.data, np.int64(_ld(w)),
                                x.ctypes.data, np.int64(1), zero, y.ctypes.data, np.int64(1)))
    else:
        gemm_loops(x.reshape(1, x.shape[0]), False, w, not trans, y.reshape(1, y.shape[0]), beta)


@njit(inline="always")
def gemm_packed(rt, a, packed_b, c, k, beta):
    """Row-major c (m, n) = a (m, k) @ B + beta*c with B packed by MKL's cblas_sgemm_pack
    (float32)."""
    m, n = c.shape
    call_void(rt[RT_COMPUTE], (np.int32(_ROW_MAJOR), np.int32(_NO_TRANS), np.int32(_PACKED),
                               np.int32(m), np.int32(n), np.int32(k), a.ctypes.data, np.int32(_ld(a)),
                               packed_b.ctypes.data, np.int32(k), np.float32(beta), c.ctypes.data,
                               np.int32(_ld(c))))


@njit(inline="always")
def barrier(rt, nt):
    if nt > 1:
        call_void(rt[RT_BARRIER], ())


@njit(inline="always")
def _blas_threads(rt, n):
    """This thread's BLAS thread count (MKL); returns the previous setting."""
    if rt[RT_LOCAL] != 0:
        return call_i32(rt[RT_LOCAL], (np.int32(n),))
    return np.int32(0)


@njit(inline="always")
def _part(k, nmax, H):
    u0 = k * nmax
    return u0, min(nmax, H - u0)


# ---- weights: prepared once per weight version ---------------------------------------------------

def as_bits(a):
    """The array's bits as unsigned integers of its width (a view)."""
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@overload(as_bits, inline="always")
def _as_bits_impl(a):
    if a.dtype == types.float32:
        return lambda a: a.view(np.uint32)
    return lambda a: a.view(np.uint64)


@njit(inline="always")
def copy_if_changed(src, dst):
    """dst[:] = src if their bits differ (NaN equals itself); True if it copied. Both C-contiguous
    and of one shape; compared by a vectorised XOR-OR reduction."""
    a, b = as_bits(src.reshape(src.size)), as_bits(dst.reshape(dst.size))
    diff = a[0] ^ a[0]
    for i in range(a.shape[0]):
        diff |= a[i] ^ b[i]
    if diff != 0:
        dst[...] = src
        return True
    return False


@njit(inline="always")
def prepare_block(k, q, u0, n, H, gru, w_ih, w_hh, b_ih, b_hh, wx, wh, bias, bhn, flags):
    """Gate q of part k: its rows of W_ih and W_hh (wx[k], wh[k], gate-major) up to date with
    the weights (flags[FLAG_CHANGED] set if they were not), and its folded input bias: b_ih +
    b_hh (GRU's n gate: b_ih, with b_hn kept apart in bhn)."""
    rows = slice(q * H + u0, q * H + u0 + n)
    changed = copy_if_changed(w_ih[rows], wx[k, q * n:(q + 1) * n])
    if copy_if_changed(w_hh[rows], wh[k, q * n:(q + 1) * n]):
        changed = True
    for j in range(n):
        if flags[FLAG_BIAS] == 0:
            bias[k, q * n + j] = 0
        elif gru and q == 2:
            bias[k, q * n + j] = b_ih[q * H + u0 + j]
            bhn[k, j] = b_hh[q * H + u0 + j]
        else:
            bias[k, q * n + j] = b_ih[q * H + u0 + j] + b_hh[q * H + u0 + j]
    if gru and q == 2 and flags[FLAG_BIAS] == 0:
        for j in range(n):
            bhn[k, j] = 0
    if changed:
        flags[FLAG_CHANGED] = 1


@njit(inline="always")
def pack_transposed(rt, w, m, dest):
    """MKL: pack w.T (w (N, K) row-major) as the B operand of an (m, K) @ (K, N) product."""
    call_void(rt[RT_PACK], (np.int32(_ROW_MAJOR), np.int32(162), np.int32(_TRANS), np.int32(m),
                            np.int32(w.shape[0]), np.int32(w.shape[1]), np.float32(1.0),
                            w.ctypes.data, np.int32(_ld(w)), dest.ctypes.data))


@njit(inline="always")
def pack_plain(rt, w, m, dest):
    """MKL: pack w (K, N) row-major, a view, as the B operand of an (m, K) @ (K, N) product."""
    call_void(rt[RT_PACK], (np.int32(_ROW_MAJOR), np.int32(162), np.int32(_NO_TRANS), np.int32(m),
                            np.int32(w.shape[1]), np.int32(w.shape[0]), np.float32(1.0),
                            w.ctypes.data, np.int32(_ld(w)), dest.ctypes.data))


@njit(inline="always")
def _share(tid, nt, sz):
    """(first part, part step, first row, end row) of this thread: all rows of every nt-th part
    (MODE_UNITS) or its own block of SZ_ROWS batch rows of the one part (MODE_ROWS)."""
    B = sz[SZ_B]
    if sz[SZ_MODE] == MODE_ROWS:
        r0 = min(B, tid * sz[SZ_ROWS])
        return 0, 1, r0, min(B, r0 + sz[SZ_ROWS])
    return tid, nt, 0, B


# ---- forward -------------------------------------------------------------------------------------

@njit(**_JIT)
def forward_worker(tid, nt, sz, rt, x, lengths, hs, cs, gates, y, hn, cn, wx, wh, whpk, bias, bhn,
                   gxw, rec, scratch, w_ih, w_hh, b_ih, b_hh, flags):
    """One thread's share of a forward pass.
      x (T, B, I) ; lengths (B,) int64 ; hs, cs (Th, B, H) states, slot j % Th holds boundary
      state j (Th = T+1 with a reserve, else 2) ; gates (T, B, S*H) reserve ; y (T, B, H) ;
      hn, cn (B, H) ; wx (P, G*nmax, I), wh (P, G*nmax, H) part rows ; whpk (P, bytes/4) wh
      packed by MKL for M = B ; bias (P, G*nmax) folded input bias ; bhn (P, nmax) GRU b_hn ;
      gxw (P, chunk*B, G*nmax) input projections of `chunk` steps (rows mode: (nt,
      chunk*SZ_ROWS, G*H)), rec (P, B, G*nmax) and scratch (P, 4*nmax) per-part workspace ;
      w_ih, w_hh, b_ih, b_hh the layer's weights as given (biases (1,) without bias) ; flags.
    First the team brings the parts up to date with the weights (prepare_block), so the
    weights are compared, and copied and packed only when they changed, by the whole team.
    Cell steps work on contiguous slices indexed from 0, which is what lets LLVM vectorise."""
    T, B, I, H = sz[SZ_T], sz[SZ_B], sz[SZ_I], sz[SZ_H]
    cell, rev, has_len, save = sz[SZ_CELL], sz[SZ_REV], sz[SZ_HASLEN], sz[SZ_SAVE]
    P, nmax, G = sz[SZ_P], sz[SZ_NMAX], sz[SZ_G]
    packed = rt[RT_COMPUTE] != 0 and not (B == 1 and rt[RT_GEMV] != 0)
    Th = hs.shape[0]
    old = _blas_threads(rt, 1)
    x2 = x.reshape(T * B, I)
    rows_mode = sz[SZ_MODE] == MODE_ROWS
    k0, kstep, r0, r1 = _share(tid, nt, sz)
    m = r1 - r0
    words = sz[SZ_WORDS]
    # steps whose input projection is computed at once: unit mode all B rows of each step,
    # rows mode this thread's rows of each step (one GEMM per step, back to back, so W_ih stays
    # in cache for them and W_hh has the cache to itself during the steps)
    chunk = gxw.shape[1] // (sz[SZ_ROWS] if rows_mode else B)
    if rows_mode:
        # one part (every unit); its gate blocks are compared by the whole team, then each
        # thread packs W_hh^T and W_ih^T for its own number of rows
        for q in range(tid, G, nt):
            prepare_block(0, q, 0, H, H, cell == GRU, w_ih, w_hh, b_ih, b_hh, wx, wh, bias, bhn, flags)
        barrier(rt, nt)
        if packed and m > 0 and (flags[FLAG_CHANGED] != 0 or flags[FLAG_REPACK] != 0):
            pack_transposed(rt, wh[0, :G * H], m, whpk[tid, :words])
            pack_transposed(rt, wx[0, :G * H], m, whpk[tid, words:])
    else:
        for k in range(tid, P, nt):
            u0, n = _part(k, nmax, H)
            for q in range(G if n > 0 else 0):
                prepare_block(k, q, u0, n, H, cell == GRU, w_ih, w_hh, b_ih, b_hh, wx, wh, bias,
                              bhn, flags)
            if n > 0 and packed and (flags[FLAG_CHANGED] != 0 or flags[FLAG_REPACK] != 0):
                pack_transposed(rt, wh[k, :G * n], B, whpk[k])
    t_lo = 0
    for s in range(T):
        t = T - 1 - s if rev else s
        if s % chunk == 0:
            # the next `chunk` steps' input projection: it is read while still in this core's
            # cache (all T*B rows at once went out to memory)
            t_lo = max(0, T - s - chunk) if rev else s
            t_hi = T - s if rev else min(T, s + chunk)
            if rows_mode:
                for tt in range(t_lo, t_hi):
                    if m == 0:
                        break
                    out = gxw[tid, (tt - t_lo) * m:(tt - t_lo + 1) * m, :G * H]
                    if packed:
                        gemm_packed(rt, x[tt, r0:r1], whpk[tid, words:], out, I, 0.0)
                    else:
                        gemm(rt, x[tt, r0:r1], False, wx[0, :G * H, :], True, out, 0.0)
            else:
                for k in range(tid, P, nt):
                    u0, n = _part(k, nmax, H)
                    if n > 0:
                        gemm(rt, x2[t_lo * B:t_hi * B], False, wx[k, :G * n, :], True,
                             gxw[k, :(t_hi - t_lo) * B, :G * n], 0.0)
        h_in, h_out = hs[(t + rev) % Th], hs[(t + 1 - rev) % Th]
        c_in, c_out = cs[(t + rev) % cs.shape[0]], cs[(t + 1 - rev) % cs.shape[0]]
        for k in range(k0, P, kstep):
            u0, n = _part(k, nmax, H)
            if n <= 0 or m <= 0:
                continue
            pk = tid if rows_mode else k       # whose workspace and packs
            # this step's gx rows in the chunk: (t - t_lo)*B + b (unit mode), (t - t_lo)*m +
            # b - r0 (rows mode)
            base = (t - t_lo) * m if rows_mode else (t - t_lo) * B + r0
            # LSTM and RNN add the recurrent product into the input projection's rows (one
            # array for the step to read); GRU keeps it apart (b_hn and r multiply its n part)
            acc = cell != GRU
            r = gxw[pk, base:base + m, :G * n] if acc else rec[pk, :m, :G * n]
            beta = 1.0 if acc else 0.0
            if m == 1 and rt[RT_GEMV] != 0:
                gemv(rt, wh[k, :G * n, :], False, h_in[r0],
                     gxw[pk, base, :G * n] if acc else rec[pk, 0, :G * n], beta)
            elif packed:
                gemm_packed(rt, h_in[r0:r1], whpk[pk, :words] if rows_mode else whpk[pk], r, H, beta)
            else:
                gemm(rt, h_in[r0:r1], False, wh[k, :G * n, :], True, r, beta)
            bk, gxk, junk = bias[k], gxw[pk], scratch[pk]
            S = sz[SZ_S]
            for b in range(r0, r1):
                if has_len != 0 and t >= lengths[b]:
                    h_out[b, u0:u0 + n] = h_in[b, u0:u0 + n]
                    y[t, b, u0:u0 + n] = 0
                    if cell == LSTM:
                        c_out[b, u0:u0 + n] = c_in[b, u0:u0 + n]
                    if save:
                        for q in range(S):
                            gates[t, b, q * H + u0:q * H + u0 + n] = 0
                    continue
                a, rb = gxk[base + b - r0], rec[pk, b - r0]     # C rows (r[b] would not be)
                if save:
                    gr = gates[t, b]
                    g0, g1 = gr[u0:u0 + n], gr[H + u0:H + u0 + n]
                    g2, g3 = gr[2 * H + u0:2 * H + u0 + n], gr[3 * H + u0:3 * H + u0 + n]
                else:       # nothing kept: the gates go to this part's scratch
                    g0, g1, g2, g3 = junk[:n], junk[n:2 * n], junk[2 * n:3 * n], junk[3 * n:4 * n]
                if cell == LSTM:
                    _lstm_step(a, bk, n, c_in[b, u0:u0 + n], c_out[b, u0:u0 + n],
                               h_out[b, u0:u0 + n], y[t, b, u0:u0 + n], g0, g1, g2, g3)
                elif cell == GRU:
                    _gru_step(a, rb, bk, bhn[k], n, h_in[b, u0:u0 + n], h_out[b, u0:u0 + n],
                              y[t, b, u0:u0 + n], g0, g1, g2, g3)
                else:
                    _rnn_step(a, bk, n, h_out[b, u0:u0 + n], y[t, b, u0:u0 + n], cell == RNN_RELU)
        if not rows_mode:
            barrier(rt, nt)                    # rows mode: a thread's rows never leave it
    last = (0 if rev else T) % Th
    for k in range(k0, P, kstep):
        u0, n = _part(k, nmax, H)
        for b in range(r0, r1):
            for j in range(max(n, 0)):
                hn[b, u0 + j] = hs[last, b, u0 + j]
                if cell == LSTM:
                    cn[b, u0 + j] = cs[last, b, u0 + j]
    _blas_threads(rt, old)


# The cell steps below are several short loops rather than one: every loop touches few arrays,
# so the runtime alias checks LLVM needs before vectorising stay few (one loop over a dozen
# arrays ran scalar in the workers, ~4x slower). The rows are in L1 between the loops.

@njit(inline="always")
def _lstm_step(a, bias, n, c_in, c_out, h_out, y, g0, g1, g2, g3):
    """a, bias: the part's pre-activation (input projection + recurrent product) and bias rows
    (4 blocks of n); the rest are the part's slices of the state, output and gate rows."""
    for j in range(n):
        g0[j] = sigmoid(a[j] + bias[j])
        g1[j] = sigmoid(a[n + j] + bias[n + j])
        g2[j] = tanh(a[2 * n + j] + bias[2 * n + j])
        g3[j] = sigmoid(a[3 * n + j] + bias[3 * n + j])
    for j in range(n):
        c = g1[j] * c_in[j] + g0[j] * g2[j]
        c_out[j] = c
        h_out[j] = g3[j] * tanh(c)
    for j in range(n):
        y[j] = h_out[j]


@njit(inline="always")
def _gru_step(a, r, bias, bhn, n, h_in, h_out, y, g0, g1, g2, g3):
    for j in range(n):
        rg = sigmoid(a[j] + r[j] + bias[j])
        g0[j] = rg
        g1[j] = sigmoid(a[n + j] + r[n + j] + bias[n + j])
        hn = r[2 * n + j] + bhn[j]
        g3[j] = hn
        g2[j] = tanh(a[2 * n + j] + bias[2 * n + j] + rg * hn)
    for j in range(n):
        h_out[j] = g2[j] + g1[j] * (h_in[j] - g2[j])
    for j in range(n):
        y[j] = h_out[j]


@njit(inline="always")
def _rnn_step(a, bias, n, h_out, y, relu):
    for j in range(n):
        v = a[j] + bias[j]
        if relu:
            h_out[j] = v * 0 if v < 0 else v     # NaN is not < 0: it propagates, as np.maximum does
        else:
            h_out[j] = tanh(v)
    for j in range(n):
        y[j] = h_out[j]


# ---- backward ------------------------------------------------------------------------------------

@njit(**_JIT)
def backward_worker(tid, nt, sz, rt, x, lengths, hs, cs, gates, dy, w_ih, w_hh, whtpk, dgx, dgh,
                    dh, dhadd, dc, dx, dw_ih, dw_hh, db_ih, db_hh, wh, flags):
    """One thread's share of a backward pass.
      x (T, B, I) inputs with padded steps zeroed ; hs, cs (T+1, B, H), gates (T, B, S*H) the
      reserve ; dy (T, B, H) ; w_ih (G*H, I), w_hh (G*H, H) ; whtpk (P, bytes/4) W_hh[:, part]
      packed by MKL for M = B ; dgx, dgh (T, B, G*H) gate gradients (input / recurrent side; the
      same array except GRU) ; dh (B, H) in: dh_n, out: dh0 ; dhadd (B, H) workspace ; dc (B, H)
      in: dc_n, out: dc0 ; outputs dx (T, B, I), dw_ih, dw_hh, db_ih, db_hh (G*H,) when sz has
      bias (db_* length 1 otherwise) ; wh, flags: as forward_worker's (MKL packs only: W_hh is
      compared with the prepared rows, and the column packs are redone if it changed)."""
    T, B, I, H = sz[SZ_T], sz[SZ_B], sz[SZ_I], sz[SZ_H]
    cell, rev, has_len = sz[SZ_CELL], sz[SZ_REV], sz[SZ_HASLEN]
    P, nmax, G = sz[SZ_P], sz[SZ_NMAX], sz[SZ_G]
    GH = G * H
    packed = rt[RT_COMPUTE] != 0 and not (B == 1 and rt[RT_GEMV] != 0)
    old = _blas_threads(rt, 1)
    rows_mode = sz[SZ_MODE] == MODE_ROWS
    k0, kstep, r0, r1 = _share(tid, nt, sz)
    m = r1 - r0
    if packed:
        for k in range(tid, P, nt):
            u0, n = _part(k, nmax, H)
            for q in range(G):
                if n > 0 and copy_if_changed(w_hh[q * H + u0:q * H + u0 + n], wh[k, q * n:(q + 1) * n]):
                    flags[FLAG_CHANGED] = 1
        barrier(rt, nt)                          # every row compared: flags is final
        if flags[FLAG_CHANGED] != 0 or flags[FLAG_REPACK] != 0:
            if rows_mode:                        # all of W_hh, for this thread's rows
                if m > 0:
                    pack_plain(rt, w_hh, m, whtpk[tid])
            else:                                # this part's columns, for all rows
                for k in range(tid, P, nt):
                    u0, n = _part(k, nmax, H)
                    if n > 0:
                        pack_plain(rt, w_hh[:, u0:u0 + n], B, whtpk[k])
    for s in range(T):
        t = s if rev else T - 1 - s              # the forward's steps, last first
        for k in range(k0, P, kstep):
            u0, n = _part(k, nmax, H)
            if n <= 0:
                continue
            for b in range(r0, r1):
                if has_len != 0 and t >= lengths[b]:
                    dhadd[b, u0:u0 + n] = dh[b, u0:u0 + n]      # the state was copied through
                    for q in range(G):
                        dgx[t, b, q * H + u0:q * H + u0 + n] = 0
                        dgh[t, b, q * H + u0:q * H + u0 + n] = 0
                    continue
                d, dyb = dh[b, u0:u0 + n], dy[t, b, u0:u0 + n]    # d becomes dh_t, in place:
                g, dg = gates[t, b], dgx[t, b]                      # dh is rewritten below
                if cell == LSTM:
                    _lstm_grad(n, d, dyb, dc[b, u0:u0 + n], g[u0:u0 + n], g[H + u0:H + u0 + n],
                               g[2 * H + u0:2 * H + u0 + n], g[3 * H + u0:3 * H + u0 + n],
                               cs[t + 1 - rev, b, u0:u0 + n], cs[t + rev, b, u0:u0 + n],
                               dg[u0:u0 + n], dg[H + u0:H + u0 + n], dg[2 * H + u0:2 * H + u0 + n],
                               dg[3 * H + u0:3 * H + u0 + n])
                elif cell == GRU:
                    dr = dgh[t, b]
                    _gru_grad(n, d, dyb, g[u0:u0 + n], g[H + u0:H + u0 + n], g[2 * H + u0:2 * H + u0 + n],
                              g[3 * H + u0:3 * H + u0 + n], hs[t + rev, b, u0:u0 + n],
                              dg[u0:u0 + n], dg[H + u0:H + u0 + n], dg[2 * H + u0:2 * H + u0 + n],
                              dr[u0:u0 + n], dr[H + u0:H + u0 + n], dr[2 * H + u0:2 * H + u0 + n],
                              dhadd[b, u0:u0 + n])
                else:
                    _rnn_grad(n, d, dyb, hs[t + 1 - rev, b, u0:u0 + n], dg[u0:u0 + n], cell == RNN_RELU)
        if not rows_mode:
            barrier(rt, nt)                      # dgates_t of every unit written
        for k in range(k0, P, kstep):
            u0, n = _part(k, nmax, H)
            if n <= 0 or m <= 0:
                continue
            pk = tid if rows_mode else k
            if m == 1 and rt[RT_GEMV] != 0:
                gemv(rt, w_hh[:, u0:u0 + n], True, dgh[t, r0], dh[r0, u0:u0 + n], 0.0)
            elif packed:
                gemm_packed(rt, dgh[t, r0:r1], whtpk[pk], dh[r0:r1, u0:u0 + n], GH, 0.0)
            else:
                gemm(rt, dgh[t, r0:r1], False, w_hh[:, u0:u0 + n], False, dh[r0:r1, u0:u0 + n], 0.0)
            for b in range(r0, r1):
                if has_len != 0 and t >= lengths[b]:
                    for j in range(n):
                        dh[b, u0 + j] = dhadd[b, u0 + j]
                elif cell == GRU:
                    for j in range(n):
                        dh[b, u0 + j] += dhadd[b, u0 + j]
    barrier(rt, nt)
    # everything else is large GEMMs, split by rows over the team
    TB = T * B
    dgx2, dgh2 = dgx.reshape(TB, GH), dgh.reshape(TB, GH)
    r0, r1 = _rows(tid, nt, TB)
    if r1 > r0:
        gemm(rt, dgx2[r0:r1], False, w_ih, False, dx.reshape(TB, I)[r0:r1], 0.0)
    q0, q1 = _rows(tid, nt, GH)
    if q1 > q0:
        gemm(rt, dgx2[:, q0:q1], True, x.reshape(TB, I), False, dw_ih[q0:q1], 0.0)
        h_in = hs[rev:rev + T].reshape(TB, H)
        gemm(rt, dgh2[:, q0:q1], True, h_in, False, dw_hh[q0:q1], 0.0)
        if db_ih.shape[0] == GH:
            _column_sums(dgx2, q0, q1, db_ih)
            if cell == GRU:
                _column_sums(dgh2, q0, q1, db_hh)
            else:                                # one gate gradient feeds both biases
                db_hh[q0:q1] = db_ih[q0:q1]
    _blas_threads(rt, old)


@njit(inline="always")
def _column_sums(a, q0, q1, out):
    """out[q0:q1] = a[:, q0:q1].sum(axis=0), a row at a time (contiguous, vectorised)."""
    acc = out[q0:q1]
    acc[:] = 0
    for row in range(a.shape[0]):
        r = a[row, q0:q1]
        for j in range(q1 - q0):
            acc[j] += r[j]


@njit(inline="always")
def _rows(tid, nt, total):
    per = (total + nt - 1) // nt
    r0 = min(total, tid * per)
    return r0, min(total, r0 + per)


@njit(inline="always")
def _lstm_grad(n, d, dy, dc, i, f, g, o, c_out, c_in, di, df, dg, do):
    """d: in the gradient carried into step t (dh), out dh_t = dh + dy; dc: in dc_t, out
    dc_{t-1}; gate slices of the reserve; di..do: the gate gradients (this part's units)."""
    one = dc.dtype.type(1)
    for j in range(n):
        d[j] += dy[j]
    for j in range(n):
        tc = tanh(c_out[j])
        oj = o[j]
        do[j] = d[j] * tc * oj * (one - oj)
        dc[j] += d[j] * oj * (one - tc * tc)
    for j in range(n):
        ij, gj = i[j], g[j]
        di[j] = dc[j] * gj * ij * (one - ij)
        dg[j] = dc[j] * ij * (one - gj * gj)
    for j in range(n):
        fj = f[j]
        df[j] = dc[j] * c_in[j] * fj * (one - fj)
        dc[j] *= fj


@njit(inline="always")
def _gru_grad(n, d, dy, r, z, ng, hn, h_in, dxr, dxz, dxn, dhr, dhz, dhn, dhadd):
    one = d.dtype.type(1)
    for j in range(n):
        d[j] += dy[j]
    for j in range(n):
        zj, nj = z[j], ng[j]
        dxn[j] = d[j] * (one - zj) * (one - nj * nj)
        dxz[j] = d[j] * (h_in[j] - nj) * zj * (one - zj)
    for j in range(n):
        rj = r[j]
        dr = dxn[j] * hn[j] * rj * (one - rj)
        dxr[j] = dr
        dhr[j] = dr
    for j in range(n):
        dhz[j] = dxz[j]
        dhn[j] = dxn[j] * r[j]
    for j in range(n):
        dhadd[j] = d[j] * z[j]


@njit(inline="always")
def _rnn_grad(n, d, dy, h_out, da, relu):
    one = d.dtype.type(1)
    for j in range(n):
        d[j] += dy[j]
    for j in range(n):
        h = h_out[j]
        if relu:
            da[j] = d[j] if h > 0 else d[j] * 0     # as the reference: (h > 0) * d
        else:
            da[j] = d[j] * (one - h * h)


# ---- one call on a whole team ----------------------------------------------------------------------
# A trampoline per (pass, dtype) unpacks an argument block: int64 [sz (VEC), rt (VEC), then per
# array: address, d0, d1, d2]. The caller keeps every array alive until the team has returned.

@njit(inline="always")
def _v1(blk, i, like):
    base = 2 * VEC + 4 * i
    return carray(voidptr(blk[base]), (blk[base + 1],), like.dtype)


@njit(inline="always")
def _v2(blk, i, like):
    base = 2 * VEC + 4 * i
    return carray(voidptr(blk[base]), (blk[base + 1], blk[base + 2]), like.dtype)


@njit(inline="always")
def _v3(blk, i, like):
    base = 2 * VEC + 4 * i
    return carray(voidptr(blk[base]), (blk[base + 1], blk[base + 2], blk[base + 3]), like.dtype)


_F32, _F64, _I64 = np.zeros(1, np.float32), np.zeros(1, np.float64), np.zeros(1, np.int64)
BLOCK = 2 * VEC + 4 * 28     # int64 entries of an argument block


@njit(inline="always")
def _forward_team(block, like):
    blk = carray(block, (BLOCK,), np.int64)
    sz, rt = blk[:VEC], blk[VEC:2 * VEC]
    tid, nt = call_i32(rt[RT_THREAD_NUM], ()), call_i32(rt[RT_NUM_THREADS], ())
    forward_worker(tid, nt, sz, rt, _v3(blk, 0, like), _v1(blk, 1, _I64), _v3(blk, 2, like),
                   _v3(blk, 3, like), _v3(blk, 4, like), _v3(blk, 5, like), _v2(blk, 6, like),
                   _v2(blk, 7, like), _v3(blk, 8, like), _v3(blk, 9, like), _v2(blk, 10, _F32),
                   _v2(blk, 11, like), _v2(blk, 12, like), _v3(blk, 13, like), _v3(blk, 14, like),
                   _v2(blk, 15, like), _v2(blk, 16, like), _v2(blk, 17, like), _v1(blk, 18, like),
                   _v1(blk, 19, like), _v1(blk, 20, _I64))


@njit(inline="always")
def _backward_team(block, like):
    blk = carray(block, (BLOCK,), np.int64)
    sz, rt = blk[:VEC], blk[VEC:2 * VEC]
    tid, nt = call_i32(rt[RT_THREAD_NUM], ()), call_i32(rt[RT_NUM_THREADS], ())
    backward_worker(tid, nt, sz, rt, _v3(blk, 0, like), _v1(blk, 1, _I64), _v3(blk, 2, like),
                    _v3(blk, 3, like), _v3(blk, 4, like), _v3(blk, 5, like), _v2(blk, 6, like),
                    _v2(blk, 7, like), _v2(blk, 8, _F32), _v3(blk, 9, like), _v3(blk, 10, like),
                    _v2(blk, 11, like), _v2(blk, 12, like), _v2(blk, 13, like), _v3(blk, 14, like),
                    _v2(blk, 15, like), _v2(blk, 16, like), _v1(blk, 17, like), _v1(blk, 18, like),
                    _v3(blk, 19, like), _v1(blk, 20, _I64))


# The C entry points, one per (pass, dtype): module-level so Numba can cache them on disk like
# the workers (a fresh process then loads them instead of compiling for seconds).
def _forward_f32(block):
    _forward_team(block, _F32)


def _forward_f64(block):
    _forward_team(block, _F64)


def _backward_f32(block):
    _backward_team(block, _F32)


def _backward_f64(block):
    _backward_team(block, _F64)


_ENTRIES = {("forward", "f"): _forward_f32, ("forward", "d"): _forward_f64,
            ("backward", "f"): _backward_f32, ("backward", "d"): _backward_f64}
_trampolines = {}


def trampoline(which, dtype):
    """The C address of the team entry point for ('forward' | 'backward', dtype), compiled on
    first use (or loaded from Numba's cache)."""
    key = (which, dtype.char)
    if key not in _trampolines:
        _trampolines[key] = cfunc(types.void(types.voidptr), cache=True)(_ENTRIES[key])
    return _trampolines[key].address
