"""CPU backend ('cpu'): the fast path for NumPy arrays and torch CPU tensors, beside (never
instead of) the NumPy reference. Same entry points, conventions and reserve layout as every
backend (gpurnn/backends/__init__.py, gpurnn/cells.py); the algorithm is gpurnn/cpu/kernels.py.

Per call: the weights are checked against the copy prepared for them (one pass, bit for bit) and
prepared again only when they changed: split by hidden units into one part per thread, gate-major
rows per part, packed by MKL for the batch size in use. Workspace (input projections, per-step
products, gate gradients) is kept per Python thread and reused; only what is returned (outputs,
reserve, gradients) is allocated. Then one call runs the whole pass on an OpenMP team.

Threads: the calling thread's OpenMP thread count (OMP_NUM_THREADS, torch.set_num_threads and
threadpoolctl all set it), at most one thread per 16 hidden units; options={'threads': n} fixes
it. Under torch (MKL) the team is torch's own OpenMP team and MKL runs single-threaded inside
it, so no second pool spins beside torch's. With NumPy's OpenBLAS its process-wide thread count
is set to 1 while the team runs (and restored), for the same reason.

options (backend_options): 'blas' ('auto' | 'mkl' | 'openblas' | 'numba', see
gpurnn.cpu.native.find_blas), 'threads' (int >= 1).
"""
from __future__ import annotations

import ctypes
import math
import sys
import threading
from collections import OrderedDict

import numpy as np

from . import Grads, Reserve
from ..cells import CELLS, GATES, RESERVE_GATES
from ..cpu import kernels as K
from ..cpu import native
from .numpy import inputs_seen, reserve_dtypes as _reference_reserve_dtypes
from . import numpy as _reference
from . import numpy_lstm as _reference_lstm

NAME = "cpu"
OPTION_KEYS = ("blas", "threads", "split")
SPLITS = ("auto", "units", "rows")
MIN_UNITS_PER_THREAD = 16
MIN_ROWS_PER_THREAD = 2         # 'auto' splits the batch rows from B >= 2 x threads
PREPARED_PER_THREAD = 8        # weight sets kept prepared per Python thread (least recently used go)

_local = threading.local()
_I64, _F32 = np.dtype(np.int64), np.dtype(np.float32)
_CALL = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def check_options(options):
    """The backend options as a dict, validated (ValueError/TypeError naming the key)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"backend_options must be a dict or None; got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"backend_options has unknown keys {unknown} for backend 'cpu'; "
                         f"expected a subset of {OPTION_KEYS}")
    blas = options.get("blas", "auto")
    if blas not in ("auto",) + native.BLAS_NAMES:
        raise ValueError(f"backend_options['blas'] must be one of {('auto',) + native.BLAS_NAMES}; "
                         f"got {blas!r}")
    split = options.get("split", "auto")
    if split not in SPLITS:
        raise ValueError(f"backend_options['split'] must be one of {SPLITS}; got {split!r}")
    threads = options.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                or threads < 1):
        raise ValueError(f"backend_options['threads'] must be an int >= 1; got {threads!r}")
    return options


def reserve_dtypes(dtype):
    """(h, c, gates): as the NumPy reference (16-bit storage keeps a float32 reserve)."""
    return _reference_reserve_dtypes(dtype)


_rt_vectors = {}


def _addr(a):
    return a.__array_interface__["data"][0]


class _Runtime:
    """The BLAS and OpenMP runtime of one call, as the kernels' rt vector."""

    def __init__(self, options, dtype, hidden, batch):
        self.blas = native.find_blas(options.get("blas", "auto"))
        self.openmp = native.find_openmp()
        threads = options.get("threads")
        if threads is None:
            threads = 1
            if self.openmp is not None and not self.openmp.in_parallel():
                threads = self.openmp.max_threads()
        team = max(1, int(threads))
        f32 = dtype == np.float32
        self.packed = self.blas.packed and f32
        # How the team shares a layer (gpurnn/cpu/kernels.py): batch rows, each thread its own
        # sequences and all of W_hh packed (no barrier per step), where there are rows enough
        # and the weights can stay packed (MKL, float32); else hidden units, each thread its
        # slice of W_hh (one barrier per step), at most one thread per MIN_UNITS_PER_THREAD
        # units. (Unpacked, every per-step GEMM would repack all of W_hh: OpenBLAS took 34 ms
        # by rows against 17 by units, LSTM (100,32,256,256) forward.)
        split = options.get("split", "auto")
        if split == "auto":
            split = ("rows" if self.packed and team > 1 and batch >= MIN_ROWS_PER_THREAD * team
                     else "units")
        if split == "rows":
            self.mode, self.threads = K.MODE_ROWS, min(team, batch)
        else:
            self.mode = K.MODE_UNITS
            self.threads = max(1, min(team, hidden // MIN_UNITS_PER_THREAD or 1))
        self.parts = 1 if self.mode == K.MODE_ROWS else self.threads
        key = (self.blas.name, f32)
        if key not in _rt_vectors:
            _rt_vectors[key] = self._vector(f32)
        self.rt = _rt_vectors[key]

    def _vector(self, f32):
        rt = np.zeros(K.VEC, np.int64)
        rt[K.RT_KIND] = self.blas.kind
        rt[K.RT_GEMM] = self.blas.sgemm if f32 else self.blas.dgemm
        rt[K.RT_COMPUTE] = self.blas.compute if self.packed else 0
        rt[K.RT_LOCAL] = self.blas.set_threads_local
        # at B = 1: MKL's packed GEMM beat its GEMV here (5.6 vs 6.4 ms, LSTM 512,1,256,256);
        # OpenBLAS has no packed GEMM, and its GEMM at M = 1 is a GEMV anyway
        rt[K.RT_PACK] = self.blas.pack if self.packed else 0
        rt[K.RT_GEMV] = 0 if self.packed else (self.blas.sgemv if f32 else self.blas.dgemv)
        omp = self.openmp
        if omp is not None:
            rt[K.RT_BARRIER], rt[K.RT_THREAD_NUM], rt[K.RT_NUM_THREADS] = (
                omp.barrier, omp.thread_num, omp.num_threads)
        else:
            rt[K.RT_THREAD_NUM], rt[K.RT_NUM_THREADS] = _solo_addresses()
        return rt

    def uses_gemv(self, batch):
        """At B = 1 the per-step product is a matrix-vector product (no pack needed)."""
        return batch == 1 and self.rt[K.RT_GEMV] != 0

    def run(self, which, dtype, sz, arrays):
        """Run the pass on the team (or on this thread alone when there is one thread)."""
        descr = list(sz) + [0] * (K.VEC - len(sz)) + self.rt.tolist()
        for a in arrays:
            shape = a.shape
            descr += (_addr(a), shape[0], shape[1] if a.ndim > 1 else 1, shape[2] if a.ndim > 2 else 1)
        block = np.zeros(K.BLOCK, np.int64)
        block[:len(descr)] = descr
        entry = K.trampoline(which, dtype)
        team = self.threads > 1 and self.openmp is not None
        restore = None
        if team and self.blas.threads:
            get, put = self.blas.threads
            restore = get()
            put(1)
        try:
            if team:
                self.openmp.lib.GOMP_parallel(entry, _addr(block), self.threads, 0)
            else:
                _CALL(entry)(_addr(block))
        finally:
            if restore is not None:
                self.blas.threads[1](restore)


_solo = []


def _solo_addresses():
    """omp_get_thread_num / omp_get_num_threads stand-ins (0 and 1) where no OpenMP exists."""
    if not _solo:
        from numba import cfunc, types
        zero = cfunc(types.int32())(lambda: 0)
        one = cfunc(types.int32())(lambda: 1)
        _solo.append((zero, one))
    zero, one = _solo[0]
    return zero.address, one.address


def _state():
    if not hasattr(_local, "prepared"):
        _local.prepared = OrderedDict()
        _local.workspace = {}
        _local.pool = []
    return _local


def _workspace(name, shape, dtype):
    """A reused buffer of this Python thread, viewed as `shape` (contents undefined)."""
    ws = _state().workspace
    size = math.prod(shape)
    buf = ws.get(name)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = np.empty(max(size, int(1.25 * buf.size) if buf is not None and buf.dtype == dtype else 0),
                       dtype)
        ws[name] = buf
    return buf[:size].reshape(shape)


POOLED_BYTES = 1 << 20          # results at least this big come from the recycling pool
POOL_SIZE = 8


def _result(shape, dtype):
    """A fresh-to-the-caller array for a result (output, reserve, gradient). Big ones reuse a
    buffer of an earlier result that nothing references any more (the pool holds the only
    reference: no view, no reserve, no tensor): results over glibc's mmap threshold would
    otherwise be new pages, zeroed by the kernel at first touch, on every call."""
    size = math.prod(shape)
    if size * dtype.itemsize < POOLED_BYTES:
        return np.empty(shape, dtype)
    pool = _state().pool
    for i, buf in enumerate(pool):
        # references: the pool's list, this loop's name, getrefcount's argument
        if buf.dtype == dtype and buf.size >= size and sys.getrefcount(buf) == 3:
            pool.append(pool.pop(i))
            return buf[:size].reshape(shape)
    buf = np.empty(size, dtype)
    pool.append(buf)
    while len(pool) > POOL_SIZE:
        pool.pop(0)
    return buf.reshape(shape)


def load(dtype="float32"):
    """Load (or compile, the first time on a machine) the kernels for a dtype now rather than
    in the first forward: ~0.2 s with Numba's on-disk cache (most of it Numba's own start-up),
    which would otherwise land in whichever call comes first. 16-bit storage runs float32."""
    compute = np.dtype(np.float64) if str(dtype).endswith("float64") else np.dtype(np.float32)
    for which in ("forward", "backward"):
        K.trampoline(which, compute)


def release_workspace():
    """Free this Python thread's prepared weights, workspace and recycled result buffers."""
    state = _state()
    state.prepared.clear()
    state.workspace.clear()
    state.pool.clear()


class _Prepared:
    """One weight set split into parts (see gpurnn/cpu/kernels.py), and its MKL packs per
    (pass, B). The kernels keep the parts up to date (kernels.prepare_part): they compare the
    weights with them at every call, bit for bit, and copy and pack only what changed."""

    def __init__(self, cell, dtype, I, H, P):
        G = GATES[cell]
        self.cell, self.dtype, self.G, self.H, self.I = cell, np.dtype(dtype), G, H, I
        nmax = -(-H // P)
        if H >= MIN_UNITS_PER_THREAD * P:
            nmax = -(-nmax // MIN_UNITS_PER_THREAD) * MIN_UNITS_PER_THREAD   # cache-line parts
        self.nmax, self.P = nmax, -(-H // nmax)
        P = self.P
        self.wx = np.zeros((P, G * nmax, I), dtype)
        self.wh = np.zeros((P, G * nmax, H), dtype)
        self.bias = np.zeros((P, G * nmax), dtype)
        self.bhn = np.zeros((P, nmax), dtype)
        self.packs, self.stale = {}, {}     # MKL packs of W_hh per (pass, B)

    def parts(self):
        for k in range(self.P):
            u0 = k * self.nmax
            yield k, u0, min(self.nmax, self.H - u0)

    @staticmethod
    def pack_words(blas, shapes):
        """float32 words MKL asks for to pack any of these (M, N, K) B operands, rounded up to
        64 bytes."""
        words = max(-(-blas.lib.cblas_sgemm_pack_get_size(162, *mnk) // 4) for mnk in shapes)
        return -(-words // 16) * 16

    def pack_buffer(self, key, rows, words):
        """The pack buffer (rows, words) for key = (pass, B, ...), and whether the kernel must
        pack it even if the weights did not change. Kept: MKL asks for ~9 MB per matrix
        whatever its size, too much to allocate (and page in) at every optimizer step. Rows
        64-byte aligned."""
        if key not in self.packs:
            raw = np.empty(rows * words + 16, np.float32)
            skip = (-_addr(raw) % 64) // 4
            self.packs[key] = raw[skip:skip + rows * words].reshape(rows, words)
            self.stale[key] = True
        return self.packs[key], self.stale[key]

    def after(self, flags, key):
        """After a call that packed `key` (or None): the weights changed if flags says so, and
        then every other pack is out of date."""
        if flags[K.FLAG_CHANGED]:
            for other in self.stale:
                self.stale[other] = True
        if key is not None:
            self.stale[key] = False


def _prepared(cell, w_ih, w_hh, b_ih, b_hh, runtime):
    """The prepared parts for these weights on this Python thread (the kernels bring them up
    to date)."""
    H, I = w_hh.shape[1], w_ih.shape[1]
    ident = tuple((a.__array_interface__["data"][0], a.shape) if a is not None else None
                  for a in (w_ih, w_hh, b_ih, b_hh))
    key = (cell, w_ih.dtype.char, runtime.parts, ident)
    cache = _state().prepared
    prep = cache.get(key)
    if prep is None:
        prep = _Prepared(cell, w_ih.dtype, I, H, runtime.parts)
        cache[key] = prep
        while len(cache) > PREPARED_PER_THREAD:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return prep


def _sizes(cell, T, B, I, H, reverse, lengths, save, prep, rt, words=0):
    """The kernels' sz vector (indices gpurnn.cpu.kernels.SZ_*), as a list."""
    sz = [0] * (K.SZ_WORDS + 1)
    sz[K.SZ_MODE], sz[K.SZ_ROWS], sz[K.SZ_WORDS] = rt.mode, -(-B // rt.threads), words
    sz[K.SZ_T], sz[K.SZ_B], sz[K.SZ_I], sz[K.SZ_H] = T, B, I, H
    sz[K.SZ_CELL] = CELLS.index(cell)
    sz[K.SZ_REV] = int(reverse)
    sz[K.SZ_HASLEN] = int(lengths is not None)
    sz[K.SZ_SAVE] = int(save)
    sz[K.SZ_P], sz[K.SZ_NMAX], sz[K.SZ_G] = prep.P, prep.nmax, prep.G
    sz[K.SZ_S] = RESERVE_GATES[cell]
    return sz


_PLACEHOLDERS = {}


def _placeholder(dtype, ndim):
    """A 1-element array standing for an argument a call does not use."""
    key = (dtype.char, ndim)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = np.zeros((1,) * ndim, dtype)
    return _PLACEHOLDERS[key]


CHUNK_ROWS = 512      # rows (steps x batch) of input projection computed at a time per part
ROWS_CHUNK_ROWS = 128     # ... per thread in rows mode (it holds all G*H columns)


def _chunk(T, B, rows=CHUNK_ROWS):
    """Steps whose input projection a thread computes at a time: about `rows` rows, so they
    are still in its cache when the steps read them (and the GEMMs are still efficient)."""
    return max(1, min(T, rows // B))


def _widen(a):
    return None if a is None else a.astype(np.float32)


def forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, *,
            options=None, noise=None):
    options = check_options(options)
    if noise:
        # zoneout / recurrent dropout: the fast path has no regulariser kernels, so after this
        # backend's own option check the NumPy reference runs (its reserve keeps the noise)
        return _reference.forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse,
                                  need_reserve, noise=noise)
    if x.dtype.itemsize == 2:
        # 16-bit storage (float16, bfloat16) computes in float32, as the NumPy reference does:
        # results in the caller's dtype, the reserve in float32
        y, h_n, c_n, reserve = _forward(cell, *map(_widen, (x, w_ih, w_hh, b_ih, b_hh, h0, c0)),
                                        lengths, reverse, need_reserve, options)
        if reserve is not None:
            reserve.storage = x.dtype
        return tuple(None if a is None else a.astype(x.dtype) for a in (y, h_n, c_n)) + (reserve,)
    return _forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, options)


def backward(reserve, dy, dh_n, dc_n, *, options=None):
    if options is None and reserve.launch is not None:
        options = reserve.launch["options"]
    options = check_options(options)
    if getattr(reserve, "noise", None):
        # the reference's backward too (see forward): no regulariser kernels here
        return _reference.backward(reserve, dy, dh_n, dc_n)
    if getattr(reserve, "storage", None) is None:
        return _backward(reserve, dy, dh_n, dc_n, options)
    grads = _backward(reserve, _widen(dy), _widen(dh_n), _widen(dc_n), options)
    return Grads(*(None if g is None else g.astype(reserve.storage) for g in grads))


def lstm_forward(form, x, params, h0, c0, lengths, reverse, need_saved, *, options=None):
    """The LSTM family (gpurnn.variants): no fast-path kernels for the variants yet, so after
    this backend's own option check the NumPy reference runs."""
    check_options(options)
    return _reference_lstm.lstm_forward(form, x, params, h0, c0, lengths, reverse, need_saved)


def lstm_backward(form, x, params, saved, lengths, reverse, dy, dh_n, dc_n, *, options=None):
    """The backward of lstm_forward: the NumPy reference too (no variant kernels yet)."""
    check_options(options)
    return _reference_lstm.lstm_backward(form, x, params, saved, lengths, reverse, dy, dh_n, dc_n)


def layernorm_forward(x, params, h0, c0, lengths, reverse, need_saved, *, noise=None,
                      options=None):
    """The LayerNormLSTM (gpurnn.layernorm): no fast-path kernels for it, so after this
    backend's own option check the NumPy reference runs."""
    check_options(options)
    return _reference.layernorm_forward(x, params, h0, c0, lengths, reverse, need_saved,
                                        noise=noise)


def layernorm_backward(x, params, saved, lengths, reverse, dy, dh_n, dc_n, *, noise=None,
                       options=None):
    """The backward of layernorm_forward: the NumPy reference too."""
    check_options(options)
    return _reference.layernorm_backward(x, params, saved, lengths, reverse, dy, dh_n, dc_n,
                                         noise=noise)


def _forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, options):
    T, B, I = x.shape
    H = w_hh.shape[1]
    dtype = x.dtype
    rt = _Runtime(options, dtype, H, B)
    prep = _prepared(cell, w_ih, w_hh, b_ih, b_hh, rt)
    rows_mode = rt.mode == K.MODE_ROWS
    if not rows_mode:
        rt.threads = min(rt.threads, prep.P)
    G, S, P, nmax = prep.G, RESERVE_GATES[cell], prep.P, prep.nmax
    nt, rows = rt.threads, -(-B // rt.threads)
    lstm = cell == "lstm"
    save = bool(need_reserve and S)
    slots = T + 1 if need_reserve else 2
    hs = _result((slots, B, H), dtype) if need_reserve else _workspace("hs", (2, B, H), dtype)
    cs = None
    if lstm:
        cs = _result((slots, B, H), dtype) if need_reserve else _workspace("cs", (2, B, H), dtype)
    first = (T if reverse else 0) % slots
    hs[first] = h0
    if lstm:
        cs[first] = c0
    gates = _result((T, B, S * H), dtype) if save else None
    y = _result((T, B, H), dtype)
    h_n = np.empty((B, H), dtype)
    c_n = np.empty((B, H), dtype) if lstm else None
    key, packs, stale, words = None, None, False, 0
    if rt.packed and not rt.uses_gemv(B) and rows_mode:
        # per thread: W_hh^T and W_ih^T, each packed for that thread's rows
        key = ("forward-rows", B, nt)
        ms = {rows, B - (nt - 1) * rows}
        words = prep.pack_words(rt.blas, [(m, G * H, k) for m in ms for k in (H, I)])
        packs, stale = prep.pack_buffer(key, nt, 2 * words)
    elif rt.packed and not rt.uses_gemv(B):
        key = ("forward", B)
        packs, stale = prep.pack_buffer(key, P, prep.pack_words(
            rt.blas, [(B, G * n, H) for _, _, n in prep.parts()]))
    flags = np.array([0, stale, b_ih is not None], np.int64)
    if rows_mode:
        ws_parts, gx_rows, rec_rows = nt, _chunk(T, rows, ROWS_CHUNK_ROWS) * rows, rows
    else:
        ws_parts, gx_rows, rec_rows = P, _chunk(T, B) * B, B
    one = _placeholder(dtype, 3)
    arrays = (x, lengths if lengths is not None else _placeholder(_I64, 1), hs,
              cs if lstm else one, gates if save else one, y, h_n,
              c_n if lstm else _placeholder(dtype, 2), prep.wx, prep.wh,
              packs if packs is not None else _placeholder(_F32, 2),
              prep.bias, prep.bhn, _workspace("gx", (ws_parts, gx_rows, G * nmax), dtype),
              _workspace("rec", (ws_parts, rec_rows, G * nmax), dtype),
              _workspace("scratch", (ws_parts, 4 * nmax), dtype),
              w_ih, w_hh, b_ih if b_ih is not None else _placeholder(dtype, 1),
              b_hh if b_hh is not None else _placeholder(dtype, 1), flags)
    rt.run("forward", dtype, _sizes(cell, T, B, I, H, reverse, lengths, save, prep, rt, words),
           arrays)
    prep.after(flags, key)
    reserve = None
    if need_reserve:
        reserve = Reserve(cell=cell, backend=NAME, reverse=bool(reverse), x=x, w_ih=w_ih, w_hh=w_hh,
                          has_bias=b_ih is not None, lengths=lengths, h=hs, c=cs, gates=gates,
                          launch={"options": options, "prepared": prep})
    return y, h_n, c_n, reserve


def _backward(reserve, dy, dh_n, dc_n, options):
    cell, x, w_ih, w_hh = reserve.cell, reserve.x, reserve.w_ih, reserve.w_hh
    T, B, I, H = reserve.shape
    dtype = x.dtype
    G = GATES[cell]
    GH = G * H
    rt = _Runtime(options, dtype, H, B)
    # the forward's prepared weights (its W_hh rows are checked again by the kernel), or the
    # ones cached for these weights when the reserve was rebuilt from its arrays
    prep = (reserve.launch["prepared"] if reserve.launch is not None
            else _prepared(cell, w_ih, w_hh, None, None, rt))
    rows_mode = rt.mode == K.MODE_ROWS
    if not rows_mode:
        rt.threads = min(rt.threads, prep.P)
    nt, rows = rt.threads, -(-B // rt.threads)
    lstm, gru = cell == "lstm", cell == "gru"
    dgx = _workspace("dgx", (T, B, GH), dtype)
    dgh = _workspace("dgh", (T, B, GH), dtype) if gru else dgx
    dh = np.array(dh_n, dtype=dtype, order="C", copy=True)
    dc = np.array(dc_n, dtype=dtype, order="C", copy=True) if lstm else None
    dx = _result((T, B, I), dtype)
    dw_ih = np.empty((GH, I), dtype)
    dw_hh = np.empty((GH, H), dtype)
    db_ih = np.empty(GH, dtype) if reserve.has_bias else None
    db_hh = np.empty(GH, dtype) if reserve.has_bias else None
    key, packs, stale = None, None, False
    if rt.packed and not rt.uses_gemv(B) and rows_mode:
        key = ("backward-rows", B, nt)
        packs, stale = prep.pack_buffer(key, nt, prep.pack_words(
            rt.blas, [(m, H, GH) for m in {rows, B - (nt - 1) * rows}]))
    elif rt.packed and not rt.uses_gemv(B):
        key = ("backward", B)
        packs, stale = prep.pack_buffer(key, prep.P, prep.pack_words(
            rt.blas, [(B, n, GH) for _, _, n in prep.parts()]))
    flags = np.array([0, stale, 0], np.int64)
    one = _placeholder(dtype, 3)
    x_seen = np.ascontiguousarray(inputs_seen(x, reserve.lengths, np))
    lengths = reserve.lengths
    arrays = (x_seen, lengths if lengths is not None else _placeholder(_I64, 1), reserve.h,
              reserve.c if lstm else one, reserve.gates if reserve.gates is not None else one, dy,
              w_ih, w_hh, packs if packs is not None else _placeholder(_F32, 2), dgx, dgh, dh,
              _workspace("dhadd", (B, H), dtype), dc if lstm else _placeholder(dtype, 2), dx, dw_ih,
              dw_hh, db_ih if db_ih is not None else _placeholder(dtype, 1),
              db_hh if db_hh is not None else _placeholder(dtype, 1), prep.wh, flags)
    sz = _sizes(cell, T, B, I, H, reserve.reverse, lengths, False, prep, rt)
    rt.run("backward", dtype, sz, arrays)
    prep.after(flags, key)
    return Grads(dx=dx, dh0=dh, dc0=dc, dw_ih=dw_ih, dw_hh=dw_hh, db_ih=db_ih, db_hh=db_hh)
