"""CUDA backend: CuPy arrays, cuBLAS GEMMs through CuPy, gpurnn's Numba CUDA kernels.

The host side of the algorithm (docs/design.md §2) lives here once, written against an array module
`xp` and a `Runtime` that knows how to compile and launch; the simulator backend (sim.py) runs
the same code with NumPy and Numba's CUDA simulator:
  forward   Gx = x W_ih^T + folded bias (one GEMM) -> persistent kernel over all steps, or per
            step one GEMM h_in W_hh^T + one pointwise kernel (stepwise path)
  backward  persistent kernel over T+1 phases (the last only finishes dh0), or per step one
            GEMM dgh_next W_hh + one pointwise kernel; then dW_hh, dW_ih, dx, db as GEMMs.
The LSTM family of gpurnn.variants (lstm_forward / lstm_backward) runs the same algorithm on its
form's kernel cell (LSTMForm.kernel_cell: lstm, lstm_peephole, cifg, cifg_peephole; the peephole
vector weight_ch is the kernels' b_rec, its gradient formed after the recurrence from dgh and the
saved c); forms with a projection go to backends/cuda_proj.py, the multiplicative one to
backends/cuda_mlstm.py, with the same Runtime.
Regularisers (noise=..., gpurnn/layernorm.py's contract, the NumPy reference's semantics): a
forward with zoneout or recurrent dropout runs the kernels' regularised specializations
(registry.spec(..., regularised=True): a separate compile, so the plain kernels and their speed
are untouched by it; inside them a flags word says which masks are on), the masks in the
compute dtype; the Reserve keeps the noise dict and backward reads it from there. The recurrent
mask multiplies h_{t-1} where it meets W_hh: the persistent kernels mask the staged h and, in
the backward, dh_rec; the stepwise path masks the GEMM's input on the host and dh_rec in its
kernel; dW_hh is formed from the masked states.
The launch configuration comes from gpurnn.plan unless `options` says otherwise:
  {"path": "persistent" | "stepwise", "blocks": P, "threads": n, "batch_tile": bt}. The forward
records the one it used on `Reserve.launch`; backward reuses it (its own `options` may override).
Nothing here imports CuPy or numba.cuda at module import: importing numba.cuda fixes hardware
or simulator mode for the whole process.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import Grads, Reserve
from .numpy import check_noise, input_bias, inputs_seen
from ..cells import GATES, RESERVE_GATES, has_cell_state
from ..kernels import layout
from ..kernels.layout import NOISE_REC, noise_flags
from ..kernels.dtypes import COMPUTE, host_view, numpy_dtype

NAME = "cuda"
PATHS = ("persistent", "stepwise")
OPTION_KEYS = ("path", "blocks", "threads", "batch_tile", "wavefront")


@dataclass(frozen=True)
class LaunchConfig:
    """What a forward ran with (kept on Reserve.launch)."""
    path: str               # "persistent" | "stepwise"
    blocks: int             # P (persistent grid); unused by the stepwise path
    threads: int            # threads per block
    units_per_block: int    # U = ceil(H / P)
    plan: Any               # the gpurnn.planning.Plan consulted (None if every choice was forced)
    batch_tile: int = 1     # batch rows a persistent block stages at once


def check_options(options, backend=NAME, extra=()):
    """backend_options of the kernel backends (this one and 'sim', which adds `extra` keys and
    checks their values itself), as a dict; a ValueError naming the key otherwise."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"backend_options must be a dict or None; got {type(options).__name__}")
    keys = OPTION_KEYS + tuple(extra)
    unknown = sorted(set(options) - set(keys), key=str)
    if unknown:
        raise ValueError(f"backend_options has unknown keys {unknown} for backend {backend!r}; "
                         f"expected a subset of {keys}")
    path = options.get("path")
    if path is not None and path not in PATHS:
        raise ValueError(f"backend_options['path'] must be one of {PATHS}; got {path!r}")
    for key in ("blocks", "threads", "batch_tile"):
        v = options.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"backend_options[{key!r}] must be a positive int; got {v!r}")
    threads = options.get("threads")
    if threads is not None and (threads % 32 or threads > 1024):
        raise ValueError(f"backend_options['threads'] must be a multiple of 32 in 32..1024; "
                         f"got {threads}")
    wave = options.get("wavefront")
    if wave is not None and not isinstance(wave, bool):
        raise ValueError(f"backend_options['wavefront'] must be True, False or None (the plan "
                         f"decides); got {wave!r}")
    return options


def reserve_dtypes(dtype):
    """(h, gates) in the storage dtype, c in the compute dtype (gpurnn.kernels.dtypes)."""
    sdt = np.dtype(numpy_dtype(dtype))
    return sdt, np.dtype(COMPUTE[str(dtype)]), sdt


def choose_launch(cell, input_size, hidden, batch, dtype, device, options,
                  noise=None) -> LaunchConfig:
    """The launch configuration: options where given, gpurnn.plan for the rest (told of the
    regularisers in `noise`, whose mask reads its step model counts)."""
    from ..planning import plan as make_plan
    options = check_options(options)
    blocks, threads, tile = options.get("blocks"), options.get("threads"), options.get("batch_tile")
    if tile is not None and tile > batch:
        raise ValueError(f"options['batch_tile'] must be <= the batch ({batch}); got {tile}")
    p = make_plan(cell, input_size, hidden, batch, dtype, device=device,
                  blocks=None if blocks is None else int(blocks),
                  threads=None if threads is None else int(threads),
                  batch_tile=None if tile is None else int(tile), noise=noise)
    forced = blocks is not None or tile is not None
    path = options.get("path", "persistent" if forced else p.path)
    if path == "persistent" and p.path != "persistent":
        # A forced grid is never launched when it cannot run: on a GPU it would fail or hang.
        forced = f"options['blocks']={int(blocks)}: " if blocks is not None else ""
        raise ValueError(f"{forced}the persistent path cannot run {cell} H={hidden} B={batch} "
                         f"{dtype} on {p.device.name}: " + "; ".join(p.reasons[:-1] or p.reasons))
    P = int(blocks) if blocks is not None else p.blocks
    return LaunchConfig(path=path, blocks=P, threads=p.threads,
                        units_per_block=layout.units_per_block(hidden, P), plan=p,
                        batch_tile=p.batch_tile)


class Runtime:
    """Array module, kernel compilation and launches for one backend. Subclassed by sim.py."""
    name = NAME
    device = None                   # gpurnn.plan device: None = the current CUDA device
    # True where grid.sync() cannot be trusted across blocks (the simulator): multi-block
    # persistent grids then run one step per launch, the launch boundary being the barrier.
    per_step_grid = False

    def __init__(self):
        self._kernels = {}
        self._streams = {}

    @property
    def xp(self):
        import cupy
        return cupy

    def compile(self, spec):
        from numba import cuda
        return cuda.jit(spec.signature)(spec.func)

    def kernel(self, cell, kind, dtype, regularised=False):
        from ..kernels.registry import spec as kernel_spec
        key = (cell, kind, dtype, bool(regularised))
        if key not in self._kernels:
            sp = kernel_spec(cell, kind, dtype, bool(regularised))
            self._kernels[key] = (sp, self.compile(sp))
        return self._kernels[key]

    def _kernel_for(self, cell, kind, dtype, regularised):
        # a plain launch asks with the three-argument form (subclasses may override that one)
        if regularised:
            return self.kernel(cell, kind, dtype, True)
        return self.kernel(cell, kind, dtype)

    def on_launch(self, info: dict):
        """Called before every kernel launch (a hook for tests and tracing)."""

    def stream(self):
        """The stream kernels launch on: CuPy's current one, so they order with the GEMMs
        around them and with the caller's work (torch's stream, through gpurnn.interop)."""
        import cupy
        ptr = cupy.cuda.get_current_stream().ptr
        if ptr == 0:
            return 0
        if ptr not in self._streams:          # wrap each stream once, not per step's launch
            from numba import cuda
            self._streams[ptr] = cuda.external_stream(ptr)
        return self._streams[ptr]

    def launch_persistent(self, cell, kind, dtype, blocks, threads, smem, args, step_range,
                          regularised=False):
        from ..kernels.launch import launch_persistent
        sp, kern = self._kernel_for(cell, kind, dtype, regularised)
        single = step_range[1] - step_range[0] == 1
        self.on_launch(dict(name=sp.name, kind=kind, blocks=blocks, threads=threads, smem=smem,
                            step_range=step_range))
        with _small_grids_allowed():
            launch_persistent(kern, (blocks, threads, smem), self.stream(), args,
                              direction="fwd" if kind.endswith("fwd") else "bwd",
                              signature=None if self.per_step_grid else sp.signature,
                              single_step=single)

    def launch_pointwise(self, cell, kind, dtype, n, threads, args, step, regularised=False):
        sp, kern = self._kernel_for(cell, kind, dtype, regularised)
        blocks = -(-n // threads)
        self.on_launch(dict(name=sp.name, kind=kind, blocks=blocks, threads=threads, smem=0,
                            step_range=(step, step + 1)))
        with _small_grids_allowed():
            kern[blocks, threads, self.stream(), 0](*args)


@contextmanager
def _small_grids_allowed():
    # Numba warns below 128 blocks; a persistent grid is sized to the SMs and the work on
    # purpose, and a small batch's pointwise step is small. Only that warning is silenced.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Grid size \d+ will likely result in GPU "
                                r"under-utilization")
        yield


def _dtype_name(a):
    return np.dtype(a.dtype).name


def _kernel_lengths(xp, lengths, T, B):
    """lengths as the kernels read them: int32 on the device, T for every row when None."""
    host = np.full(B, T, np.int32) if lengths is None else np.asarray(lengths).astype(np.int32)
    return xp.asarray(host)


@dataclass(frozen=True)
class Noise:
    """The regularisers of one call as the kernels take them: the NOISE_* flags and the masks in
    the compute dtype, C-contiguous, a (1,1,1) placeholder for each that is off; rec is the
    (B, H) recurrent dropout mask viewed as (1, B, H)."""
    flags: int
    rec: Any
    zh: Any
    zc: Any

    @property
    def recurrent(self):
        return bool(self.flags & NOISE_REC)


def _noise(xp, cell, noise, T, B, H, cdt):
    """noise (gpurnn/layernorm.py's dict) for the kernels: a Noise, or None when no regulariser
    is on (None or {}: the plain kernels run). Unknown keys, zoneout_c without a cell state and
    masks of the wrong shape are a ValueError."""
    noise = check_noise(cell, noise)
    if noise is None:
        return None
    want = {"recurrent": (B, H), "zoneout_h": (T, B, H), "zoneout_c": (T, B, H)}
    place = xp.zeros((1, 1, 1), cdt)
    arrays = {}
    for key, shape in want.items():
        a = noise.get(key)
        if a is None:
            arrays[key] = place
            continue
        if tuple(a.shape) != shape:
            raise ValueError(f"noise[{key!r}] has shape {tuple(a.shape)}; expected {shape}")
        arrays[key] = xp.ascontiguousarray(xp.asarray(a).astype(cdt, copy=False))
    rec = arrays["recurrent"]
    return Noise(noise_flags(noise), rec.reshape(1, B, H) if rec.ndim == 2 else rec,
                 arrays["zoneout_h"], arrays["zoneout_c"])


def _launch_ranges(rt, blocks, n):
    """Step (or phase) ranges of the persistent launches: all n in one, or one per launch where
    the grid barrier cannot be trusted across blocks (the simulator with blocks > 1)."""
    if rt.per_step_grid and blocks > 1:
        return [(k, k + 1) for k in range(n)]
    return [(0, n)]


def _steps(T, rev):
    """Processing step s -> time index t."""
    return (lambda s: T - 1 - s) if rev else (lambda s: s)


def _input_projection(xp, x, w_ih, bias, cdt):
    """Gx = x W_ih^T + the folded bias, one GEMM over all T*B rows, C-contiguous (T, B, G*H) in
    the compute dtype."""
    T, B, I = x.shape
    gx = xp.matmul(x.reshape(T * B, I).astype(cdt, copy=False), w_ih.astype(cdt, copy=False).T)
    gx = gx.reshape(T, B, w_ih.shape[0])
    if bias is not None:
        gx += bias.astype(cdt, copy=False)
    return xp.ascontiguousarray(gx)


def _recur_forward(rt, cell, cfg, gx, w_hh, b_rec, h0, c0, lengths, rev, save_gates, sdt,
                   noise=None):
    """The recurrence of the forward on the kernels (one host algorithm for every kernel cell,
    the persistent or the stepwise path of `cfg`): returns (h, c, gates, y), the reserve states
    (T+1, B, H), the cell states (compute dtype; a (1,1,1) placeholder without a cell state),
    the activated gates (T, B, S*H; a placeholder unless save_gates) and y (T, B, H).
    b_rec is what the kernels read as b_rec (cellmath.make): GRU's b_hh, a peephole vector, or
    a (1,) placeholder. noise: a Noise (the regularised kernels) or None."""
    xp = rt.xp
    T, B = gx.shape[:2]
    H = w_hh.shape[1]
    G, S = GATES[cell], RESERVE_GATES[cell]
    dtype = np.dtype(sdt).name
    cdt = np.dtype(COMPUTE[dtype])
    stored3 = xp.zeros((1, 1, 1), sdt)          # placeholders for absent arrays
    h = xp.empty((T + 1, B, H), sdt)
    h[T if rev else 0] = h0
    c = xp.zeros((1, 1, 1), cdt)
    if has_cell_state(cell):
        c = xp.empty((T + 1, B, H), cdt)
        c[T if rev else 0] = c0.astype(cdt, copy=False)
    # inference keeps no reserve: the kernels skip the gate writes (B*S*H per step)
    save_gates = 1 if (S and save_gates) else 0
    gates = xp.empty((T, B, S * H), sdt) if save_gates else stored3
    y = xp.empty((T, B, H), sdt)
    lengths_k = _kernel_lengths(xp, lengths, T, B)
    w_hh_c = xp.ascontiguousarray(w_hh)

    def k(a):
        return host_view(xp, a, dtype)

    if cfg.path == "persistent":
        P, U, bt = cfg.blocks, cfg.units_per_block, cfg.batch_tile
        smem = layout.smem_bytes_for("fwd", G, H, bt, U, dtype, threads=cfg.threads)
        for t_begin, t_end in _launch_ranges(rt, P, T):
            args = (gx, k(w_hh_c), b_rec, k(h), c, k(gates), k(y), lengths_k, rev, t_begin,
                    t_end, U, save_gates, bt)
            if noise is not None:
                args += (noise.rec, noise.zh, noise.zc, noise.flags)
            rt.launch_persistent(cell, "persistent_fwd", dtype, P, cfg.threads, smem, args,
                                 (t_begin, t_end), regularised=noise is not None)
    else:
        w_hh_t = xp.ascontiguousarray(w_hh.T.astype(cdt, copy=False))
        gh = xp.empty((B, G * H), cdt)
        h_rec = xp.empty((B, H), cdt) if noise is not None and noise.recurrent else None
        time_of = _steps(T, rev)
        for s in range(T):
            h_in = h[time_of(s) + rev].astype(cdt, copy=False)
            if h_rec is not None:       # variational dropout: only the product sees the mask
                xp.multiply(h_in, noise.rec[0], out=h_rec)
                h_in = h_rec
            xp.matmul(h_in, w_hh_t, out=gh)
            args = (gx, gh, b_rec, k(h), c, k(gates), k(y), lengths_k, rev, s, save_gates)
            if noise is not None:
                args += (noise.zh, noise.zc, noise.flags)
            rt.launch_pointwise(cell, "pointwise_fwd", dtype, B * H, cfg.threads, args, s,
                                regularised=noise is not None)
    return h, c, gates, y


def _recur_backward(rt, cell, cfg, w_hh, b_rec, h, c, gates, dy, dh_n, dc_n, lengths, rev,
                    noise=None):
    """The recurrence of the backward on the kernels (the persistent or the stepwise path of
    `cfg`), every kernel cell: returns (dgh, dgx, dh0, dc0) in the compute dtype — the
    recurrent-side pre-activation gradients (T, B, G*H; 0 on masked steps), the input-side
    ones (GRU's own array, else dgh itself), dL/dh0 and (with a cell state, else None) dL/dc0.
    h, c and gates are the forward's (c and gates may be None where the cell has none); noise
    the forward's Noise or None."""
    xp = rt.xp
    T, B, H = dy.shape
    G = GATES[cell]
    GH = G * H
    sdt = h.dtype
    dtype = np.dtype(sdt).name
    cdt = np.dtype(COMPUTE[dtype])
    lstm_like = has_cell_state(cell)
    stored3 = xp.zeros((1, 1, 1), sdt)
    computed3 = xp.zeros((1, 1, 1), cdt)
    c = c if c is not None else computed3
    gates = gates if gates is not None else stored3
    dgh = xp.empty((T, B, GH), cdt)
    dgx = xp.empty((T, B, GH), cdt) if cell == "gru" else computed3
    dh_carry = xp.array(dh_n, dtype=cdt, copy=True, order="C")
    dc_carry = (xp.array(dc_n, dtype=cdt, copy=True, order="C") if lstm_like
                else xp.zeros((1, 1), cdt))
    dy = xp.ascontiguousarray(dy)
    lengths_k = _kernel_lengths(xp, lengths, T, B)
    w_hh_c = xp.ascontiguousarray(w_hh)

    def k(a):
        return host_view(xp, a, dtype)

    if cfg.path == "persistent":
        P, U, bt = cfg.blocks, cfg.units_per_block, cfg.batch_tile
        smem = layout.smem_bytes_for("bwd", G, H, bt, U, dtype, threads=cfg.threads)
        for k_begin, k_end in _launch_ranges(rt, P, T + 1):
            args = (k(w_hh_c), b_rec, k(h), c, k(gates), k(dy), dgh, dgx, dh_carry, dc_carry,
                    lengths_k, rev, k_begin, k_end, U, bt)
            if noise is not None:
                args += (noise.rec, noise.zh, noise.zc, noise.flags)
            rt.launch_persistent(cell, "persistent_bwd", dtype, P, cfg.threads, smem, args,
                                 (k_begin, k_end), regularised=noise is not None)
        dh0 = dh_carry
    else:
        w_hh_f = w_hh_c.astype(cdt, copy=False)
        time_of = _steps(T, rev)
        dh_rec = xp.zeros((B, H), cdt)
        for s in range(T - 1, -1, -1):
            if s + 1 < T:
                xp.matmul(dgh[time_of(s + 1)], w_hh_f, out=dh_rec)
            args = (b_rec, k(h), c, k(gates), k(dy), dh_rec, dgh, dgx, dh_carry, dc_carry,
                    lengths_k, rev, s)
            if noise is not None:
                args += (noise.rec, noise.zh, noise.zc, noise.flags)
            rt.launch_pointwise(cell, "pointwise_bwd", dtype, B * H, cfg.threads, args, s,
                                regularised=noise is not None)
        first = xp.matmul(dgh[time_of(0)], w_hh_f)
        if noise is not None and noise.recurrent:
            first *= noise.rec[0]
        dh0 = dh_carry + first
    if cell != "gru":
        dgx = dgh
    return dgh, dgx, dh0, (dc_carry if lstm_like else None)


def _weight_grads(xp, x, lengths, w_ih, dgx, dgh, h, rev, cdt, noise=None):
    """(dx, dW_ih, dW_hh) as GEMMs over all T*B rows, in the compute dtype; dW_hh from the
    states W_hh saw (masked by the recurrent dropout mask of `noise`, a Noise, when on)."""
    T, B, I = x.shape
    H = h.shape[2]
    TB = T * B
    dgx2, dgh2 = dgx.reshape(TB, -1), dgh.reshape(TB, -1)
    seen = inputs_seen(x, lengths, xp).reshape(TB, I).astype(cdt, copy=False)
    dx = xp.matmul(dgx2, w_ih.astype(cdt, copy=False)).reshape(T, B, I)
    dw_ih = xp.matmul(dgx2.T, seen)
    h_seen = h[rev: rev + T].astype(cdt, copy=False)
    if noise is not None and noise.recurrent:
        h_seen = h_seen * noise.rec
    dw_hh = xp.matmul(dgh2.T, h_seen.reshape(TB, H))
    return dx, dw_ih, dw_hh


def _launch_for_backward(cell, I, H, B, dtype, device, launch, options, noise=None):
    """The backward's launch: the forward's (`launch`, a LaunchConfig or None) unless options
    override some of it, else the plan's."""
    cfg = launch if isinstance(launch, LaunchConfig) else None
    if options or cfg is None:
        merged = {} if cfg is None else {"path": cfg.path, "blocks": cfg.blocks,
                                         "threads": cfg.threads, "batch_tile": cfg.batch_tile}
        merged.update(check_options(options))
        cfg = choose_launch(cell, I, H, B, dtype, device, merged, noise)
    return cfg


def run_forward(rt: Runtime, cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse,
                need_reserve, options, noise=None):
    """Storage dtype = x's (float32/64 or 16-bit, gpurnn.kernels.dtypes); Gx, the cell state
    and every GEMM in the compute dtype; h, y and the reserve gates in the storage dtype.
    noise: the regularisers' dict (module docstring) or None; the Reserve keeps it."""
    xp = rt.xp
    T, B, I = x.shape
    H = w_hh.shape[1]
    G, S = GATES[cell], RESERVE_GATES[cell]
    dtype = _dtype_name(x)
    sdt, cdt = x.dtype, np.dtype(COMPUTE[dtype])
    rev = 1 if reverse else 0
    check_options(options)
    kn = _noise(xp, cell, noise, T, B, H, cdt)
    cfg = choose_launch(cell, I, H, B, dtype, rt.device, options, noise if kn else None)
    gx = _input_projection(xp, x, w_ih, input_bias(cell, b_ih, b_hh), cdt)
    if cell == "gru":
        b_rec = (xp.ascontiguousarray(b_hh.astype(cdt, copy=False)) if b_hh is not None
                 else xp.zeros(G * H, cdt))
    else:
        b_rec = xp.zeros(1, cdt)
    h, c, gates, y = _recur_forward(rt, cell, cfg, gx, w_hh, b_rec, h0, c0, lengths, rev,
                                    need_reserve, sdt, kn)
    h_n = h[0 if rev else T].copy()
    c_n = c[0 if rev else T].astype(sdt) if cell == "lstm" else None
    reserve = None
    if need_reserve:
        reserve = Reserve(cell=cell, backend=rt.name, reverse=bool(reverse), x=x, w_ih=w_ih,
                          w_hh=w_hh, has_bias=b_ih is not None, lengths=lengths, h=h,
                          c=c if cell == "lstm" else None, gates=gates if S else None, launch=cfg,
                          noise=noise if kn is not None else None)
    return y, h_n, c_n, reserve


def run_backward(rt: Runtime, reserve: Reserve, dy, dh_n, dc_n, options):
    """Gate gradients, carries and every GEMM in the compute dtype; dx, dh0, dc0 and the weight
    gradients come back in the storage (parameter) dtype."""
    xp = rt.xp
    cell = reserve.cell
    x, w_ih, w_hh, h = reserve.x, reserve.w_ih, reserve.w_hh, reserve.h
    T, B, I, H = reserve.shape
    dtype = _dtype_name(x)
    sdt, cdt = x.dtype, np.dtype(COMPUTE[dtype])
    rev = 1 if reserve.reverse else 0
    check_options(options)
    kn = _noise(xp, cell, reserve.noise, T, B, H, cdt)
    cfg = _launch_for_backward(cell, I, H, B, dtype, rt.device, reserve.launch, options,
                               reserve.noise if kn else None)
    b_rec = xp.zeros(1, cdt)            # no plain cell's backward reads b_rec
    dgh, dgx, dh0, dc0 = _recur_backward(rt, cell, cfg, w_hh, b_rec, h, reserve.c,
                                         reserve.gates, dy, dh_n, dc_n, reserve.lengths, rev, kn)
    dx, dw_ih, dw_hh = _weight_grads(xp, x, reserve.lengths, w_ih, dgx, dgh, h, rev, cdt, kn)
    db_ih = db_hh = None
    if reserve.has_bias:
        db_ih = dgx.reshape(T * B, -1).sum(axis=0)
        db_hh = dgh.reshape(T * B, -1).sum(axis=0) if cell == "gru" else db_ih.copy()

    def out(a):
        return None if a is None else a.astype(sdt, copy=False)
    return Grads(dx=out(dx), dh0=out(dh0), dc0=out(dc0) if cell == "lstm" else None,
                 dw_ih=out(dw_ih), dw_hh=out(dw_hh), db_ih=out(db_ih), db_hh=out(db_hh))


# The LSTM family (gpurnn.variants): forms without a projection and not multiplicative run their
# kernel cell (LSTMForm.kernel_cell) on the host algorithm above; the others are dispatched to
# gpurnn.backends.cuda_proj / cuda_mlstm (imported lazily), with the same runtime `rt`.

def _variant_module(form):
    if form.proj_size:
        from . import cuda_proj as mod
        return mod
    if form.multiplicative:
        from . import cuda_mlstm as mod
        return mod
    return None


def _peephole_vector(xp, form, params, cdt):
    """What the kernels read as b_rec: weight_ch (C-contiguous, compute dtype) of a peephole
    form, else a (1,) placeholder."""
    if not form.peephole:
        return xp.zeros(1, cdt)
    return xp.ascontiguousarray(params["weight_ch"].astype(cdt, copy=False))


def peephole_grads(xp, form, dgh, c, rev):
    """dL/dweight_ch from the recurrent pre-activation gradients (T, B, G*H; 0 on masked steps)
    and the saved cell states c (T+1, B, H): dw_ci = sum_{t,b} dpre_i * c_in, dw_cf = sum
    dpre_f * c_in, dw_co = sum dpre_o * c_out (the output gate sees the new cell), with c_in =
    c[t + rev] and c_out = c[t + 1 - rev] (gpurnn.cells' convention)."""
    T, B, GH = dgh.shape
    H = GH // form.gates
    c_in, c_out = c[rev: rev + T], c[1 - rev: 1 - rev + T]

    def dot(gate, states):
        return (dgh[:, :, gate * H:(gate + 1) * H] * states).sum(axis=(0, 1))
    if form.coupled:                    # gates i, g, o; weight_ch = [w_ci; w_co]
        parts = [dot(0, c_in), dot(2, c_out)]
    else:                               # gates i, f, g, o; weight_ch = [w_ci; w_cf; w_co]
        parts = [dot(0, c_in), dot(1, c_in), dot(3, c_out)]
    return xp.concatenate(parts)


def run_lstm_forward(rt: Runtime, form, x, params, h0, c0, lengths, reverse, need_saved,
                     options):
    """gpurnn.variants' lstm_forward on runtime `rt` (module docstring of gpurnn.variants)."""
    mod = _variant_module(form)
    if mod is not None:
        return mod.run_forward(rt, form, x, params, h0, c0, lengths, reverse, need_saved,
                               options)
    xp = rt.xp
    cell = form.kernel_cell
    T, B, I = x.shape
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    H = w_hh.shape[1]
    dtype = _dtype_name(x)
    sdt, cdt = x.dtype, np.dtype(COMPUTE[dtype])
    rev = 1 if reverse else 0
    cfg = choose_launch(cell, I, H, B, dtype, rt.device, options)
    b_ih, b_hh = params.get("bias_ih"), params.get("bias_hh")
    gx = _input_projection(xp, x, w_ih, input_bias(cell, b_ih, b_hh), cdt)
    b_rec = _peephole_vector(xp, form, params, cdt)
    h, c, gates, y = _recur_forward(rt, cell, cfg, gx, w_hh, b_rec, h0, c0, lengths, rev,
                                    need_saved, sdt)
    h_n = h[0 if rev else T].copy()
    c_n = c[0 if rev else T].astype(sdt)
    saved = (h, c.astype(sdt, copy=False), gates) if need_saved else None
    return y, h_n, c_n, saved


def run_lstm_backward(rt: Runtime, form, x, params, saved, lengths, reverse, dy, dh_n, dc_n,
                      options):
    """gpurnn.variants' lstm_backward on runtime `rt`: (dx, dh0, dc0, {param name: grad})."""
    mod = _variant_module(form)
    if mod is not None:
        return mod.run_backward(rt, form, x, params, saved, lengths, reverse, dy, dh_n, dc_n,
                                options)
    xp = rt.xp
    cell = form.kernel_cell
    T, B, I = x.shape
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    H = w_hh.shape[1]
    dtype = _dtype_name(x)
    sdt, cdt = x.dtype, np.dtype(COMPUTE[dtype])
    rev = 1 if reverse else 0
    h, c, gates = (xp.ascontiguousarray(a) for a in saved[:3])
    c = c.astype(cdt, copy=False)
    cfg = _launch_for_backward(cell, I, H, B, dtype, rt.device, None, options)
    b_rec = _peephole_vector(xp, form, params, cdt)
    dh_n = xp.zeros((B, H), cdt) if dh_n is None else dh_n
    dc_n = xp.zeros((B, H), cdt) if dc_n is None else dc_n
    dy = xp.zeros((T, B, H), sdt) if dy is None else dy
    dgh, dgx, dh0, dc0 = _recur_backward(rt, cell, cfg, w_hh, b_rec, h, c, gates, dy, dh_n,
                                         dc_n, lengths, rev)
    dx, dw_ih, dw_hh = _weight_grads(xp, x, lengths, w_ih, dgx, dgh, h, rev, cdt)
    grads = {"weight_ih": dw_ih, "weight_hh": dw_hh}
    if params.get("bias_ih") is not None:
        db = dgh.reshape(T * B, -1).sum(axis=0)
        grads["bias_ih"], grads["bias_hh"] = db, db.copy()
    if form.peephole:
        grads["weight_ch"] = peephole_grads(xp, form, dgh, c, rev)

    def out(a):
        return a.astype(sdt, copy=False)
    return out(dx), out(dh0), out(dc0), {name: out(g) for name, g in grads.items()}


_RUNTIME: Optional[Runtime] = None


def _runtime() -> Runtime:
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = Runtime()
    return _RUNTIME


def forward(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse, need_reserve, *,
            options=None, noise=None):
    return run_forward(_runtime(), cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, lengths, reverse,
                       need_reserve, options, noise)


def backward(reserve, dy, dh_n, dc_n, *, options=None):
    return run_backward(_runtime(), reserve, dy, dh_n, dc_n, options)


def lstm_forward(form, x, params, h0, c0, lengths, reverse, need_saved, *, options=None):
    """The LSTM family's forward (gpurnn.variants): (y, h_n, c_n, saved (h, c, gates) | None)."""
    return run_lstm_forward(_runtime(), form, x, params, h0, c0, lengths, reverse, need_saved,
                            options)


def lstm_backward(form, x, params, saved, lengths, reverse, dy, dh_n, dc_n, *, options=None):
    """The LSTM family's backward (gpurnn.variants): (dx, dh0, dc0, {param name: gradient})."""
    return run_lstm_backward(_runtime(), form, x, params, saved, lengths, reverse, dy, dh_n,
                             dc_n, options)


def layernorm_forward(x, params, h0, c0, lengths, reverse, need_saved, *, noise=None,
                      options=None):
    """The LayerNormLSTM's forward (gpurnn.layernorm): (y, h_n, c_n, saved tuple | None); its
    host code is gpurnn.backends.cuda_layernorm (imported here, lazily)."""
    from . import cuda_layernorm
    return cuda_layernorm.run_forward(_runtime(), x, params, h0, c0, lengths, reverse,
                                      need_saved, noise, options)


def layernorm_backward(x, params, saved, lengths, reverse, dy, dh_n, dc_n, *, noise=None,
                       options=None):
    """The LayerNormLSTM's backward (gpurnn.layernorm): (dx, dh0, dc0, {param name: gradient})."""
    from . import cuda_layernorm
    return cuda_layernorm.run_backward(_runtime(), x, params, saved, lengths, reverse, dy, dh_n,
                                       dc_n, noise, options)


# ---- whole stacks: the layer wavefront and the gated-feedback cells -------------------------
def _stack_options(options):
    """The launch options without the stack-level 'wavefront' choice."""
    return {k: v for k, v in (options or {}).items() if k != "wavefront"}


def wavefront_modules(cell):
    """(host module, plan module) of the layer wavefront that runs stacks of `cell`: the plain
    cells and the kernel-cell LSTM variants (gpurnn.backends.cuda_wavefront), the projection
    (cuda_wavefront_proj), the mLSTM (cuda_wavefront_mlstm)."""
    import importlib
    from ..variants import form_of
    form = form_of(cell)
    suffix = ("_proj" if form is not None and form.proj_size else
              "_mlstm" if form is not None and form.multiplicative else "")
    return (importlib.import_module(f"{__package__}.cuda_wavefront{suffix}"),
            importlib.import_module(f"{__package__.rsplit('.', 1)[0]}.planning.wavefront{suffix}"))


def use_wavefront(cell, input_size, hidden, batch, layers, steps, dtype, options, device=None):
    """Whether a unidirectional stack runs as one layer-wavefront launch
    (gpurnn/kernels/wavefront.py): backend_options['wavefront'] where given; else the plan
    (gpurnn.planning.wavefront.choose: the stack fits and is predicted faster) on a GPU; never
    by default in the simulator, which has no timing to predict a gain from."""
    want = (options or {}).get("wavefront")
    if want is not None:
        return want
    name = np.dtype(dtype).name
    if device == "sim" or name not in ("float32", "float64"):
        return False
    plan = wavefront_modules(cell)[1]
    return plan.choose(cell, input_size, hidden, batch, layers, steps, name,
                       device).choice == "wavefront"


def stack_forward(cell, x, layers, h0, c0, lengths, need_saved, *, options=None):
    """A whole unidirectional stack in one wavefront launch (wavefront_modules(cell)'s host)."""
    return wavefront_modules(cell)[0].run_stack_forward(
        _runtime(), cell, x, layers, h0, c0, lengths, need_saved, _stack_options(options))


def stack_backward(cell, x, layers, saved, lengths, dy, dh_n, dc_n, *, options=None):
    """The reverse wavefront of stack_forward."""
    return wavefront_modules(cell)[0].run_stack_backward(
        _runtime(), cell, x, layers, saved, lengths, dy, dh_n, dc_n, _stack_options(options))


def feedback_forward(cell, x, params, h0, c0, lengths, masks, need_saved, *, options=None):
    """The gated-feedback stack (gpurnn.feedback) on its whole-stack kernels
    (gpurnn.backends.cuda_feedback); returns what numpy_feedback.feedback_forward returns."""
    from . import cuda_feedback
    return cuda_feedback.run_forward(_runtime(), cell, x, params, h0, c0, lengths, masks,
                                     need_saved, _stack_options(options))


def feedback_backward(cell, x, params, saved, lengths, masks, dy, dh_n, dc_n, *, options=None):
    from . import cuda_feedback
    return cuda_feedback.run_backward(_runtime(), cell, x, params, saved, lengths, masks, dy,
                                      dh_n, dc_n, _stack_options(options))
