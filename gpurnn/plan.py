"""Which path runs a layer, and why: the persistent kernel's capacity model, device profiles, and
a per-step memory-traffic model.

A persistent launch is possible when every block's shared memory (gpurnn.kernels.layout, the one
model the kernels allocate by) fits the device's opt-in limit per block and the whole grid can be
resident at once (a cooperative launch never waits for a block to finish). Otherwise the layer
runs stepwise: per step one GEMM + one pointwise kernel.

    >>> p = plan("lstm", 256, 512, 8, device="H100")
    >>> p.path, p.blocks, p.units_per_block
    ('persistent', 128, 4)
    >>> p.reasons[2]
    'shared memory above 48 KB per block: the launch opts in with cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)'

`print(p)` explains the choice in a few lines.

Named profiles never touch numba.cuda (importing it fixes simulator mode for the process);
`device=None` reads the current device through numba.cuda, and means the "sim" profile when
numba.cuda runs in simulator mode.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Optional

from . import cost
from .cells import CELLS, GATES, RESERVE_GATES
from .kernels.dtypes import ITEMSIZE, STORAGE
from .kernels.layout import KERNEL_REGS_MAX, batch_tiles, smem_bytes_for, units_per_block

KB = 1024
# Dtypes the kernels exist for; the capacity model also takes 16-bit storage (see capacity()).
KERNEL_DTYPES = STORAGE        # storage dtypes (gpurnn.kernels.dtypes); 16-bit computes in fp32
# Registers are allocated per warp in units of 256 (sm_50 .. sm_90).
_REG_ALLOC_UNIT = 256
_MAX_REGS_PER_THREAD = 255


@dataclass(frozen=True)
class DeviceProfile:
    """What the plan needs to know about a GPU. Sizes in bytes, bandwidth in bytes/s."""
    name: str
    sm_count: int
    smem_per_block_optin: int        # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    smem_per_sm: int                 # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    smem_reserved_per_block: int     # the system's share of each resident block (1 KB on sm_80+)
    regs_per_sm: int
    regs_per_block: int
    max_threads_per_block: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    compute_capability: tuple
    mem_bandwidth: Optional[float]   # DRAM bytes/s; None if unknown
    l2_bytes: Optional[int]
    default_threads: int = 256
    simulator: bool = False

    def __str__(self):
        bw = f"{self.mem_bandwidth / 1e12:.2f} TB/s" if self.mem_bandwidth else "bandwidth unknown"
        cc = ".".join(map(str, self.compute_capability))
        return (f"{self.name} (cc {cc}, {self.sm_count} SMs, "
                f"{self.smem_per_block_optin / KB:g} KB opt-in shared memory per block, "
                f"{self.smem_per_sm / KB:g} KB per SM, {bw})")


def _hopper(name, bandwidth):
    return DeviceProfile(name=name, sm_count=132, smem_per_block_optin=227 * KB, smem_per_sm=228 * KB,
                         smem_reserved_per_block=KB, regs_per_sm=65536, regs_per_block=65536,
                         max_threads_per_block=1024, max_threads_per_sm=2048, max_blocks_per_sm=32,
                         compute_capability=(9, 0), mem_bandwidth=bandwidth, l2_bytes=50 * KB * KB)


def _a100(name, bandwidth):
    return DeviceProfile(name=name, sm_count=108, smem_per_block_optin=163 * KB, smem_per_sm=164 * KB,
                         smem_reserved_per_block=KB, regs_per_sm=65536, regs_per_block=65536,
                         max_threads_per_block=1024, max_threads_per_sm=2048, max_blocks_per_sm=32,
                         compute_capability=(8, 0), mem_bandwidth=bandwidth, l2_bytes=40 * KB * KB)


PROFILES = {
    "H100": _hopper("H100", 3.35e12),                  # SXM5 80 GB
    "H200": _hopper("H200", 4.8e12),                   # SXM 141 GB: an H100 with HBM3e
    "A100": _a100("A100", 1.555e12),                   # SXM4 40 GB
    "A100-80GB": _a100("A100-80GB", 2.039e12),
    "RTX4090": DeviceProfile(name="RTX4090", sm_count=128, smem_per_block_optin=99 * KB,
                             smem_per_sm=100 * KB, smem_reserved_per_block=KB, regs_per_sm=65536,
                             regs_per_block=65536, max_threads_per_block=1024,
                             max_threads_per_sm=1536, max_blocks_per_sm=24,
                             compute_capability=(8, 9), mem_bandwidth=1.008e12,
                             l2_bytes=72 * KB * KB),
    # Numba's simulator spends a Python thread per CUDA thread and runs blocks one after another:
    # a small pretend device keeps simulated launches quick. Its bandwidth is nominal.
    "sim": DeviceProfile(name="sim", sm_count=4, smem_per_block_optin=48 * KB, smem_per_sm=48 * KB,
                         smem_reserved_per_block=0, regs_per_sm=65536, regs_per_block=65536,
                         max_threads_per_block=1024, max_threads_per_sm=2048, max_blocks_per_sm=32,
                         compute_capability=(5, 2), mem_bandwidth=1e10, l2_bytes=4 * KB * KB,
                         default_threads=32, simulator=True),
}


def device_profile(device=None) -> DeviceProfile:
    """A DeviceProfile from a profile name (case-insensitive), a DeviceProfile, or None (the
    current CUDA device; the "sim" profile when numba.cuda runs in simulator mode)."""
    if isinstance(device, DeviceProfile):
        return device
    if isinstance(device, str):
        for name, prof in PROFILES.items():
            if name.lower() == device.lower():
                return prof
        raise ValueError(f"device must be one of {tuple(PROFILES)}, a DeviceProfile or None "
                         f"(the current CUDA device); got {device!r}")
    if device is None:
        return _current_device_profile()
    raise TypeError(f"device must be a profile name, a DeviceProfile or None; "
                    f"got {type(device).__name__}")


def _current_device_profile() -> DeviceProfile:
    from numba import cuda
    from numba.cuda.core import config
    if config.ENABLE_CUDASIM:
        return PROFILES["sim"]
    if not cuda.is_available():
        raise RuntimeError(f"device=None asks for the current CUDA device, but none is available; "
                           f"pass a profile name instead, one of {tuple(PROFILES)}, "
                           f"or a DeviceProfile")
    return profile_from_numba_device(cuda.get_current_device())


def profile_from_numba_device(dev) -> DeviceProfile:
    """Read a DeviceProfile off a numba.cuda Device (attributes are CU_DEVICE_ATTRIBUTE_* names)."""
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    cc = tuple(dev.compute_capability)
    try:
        # Memory clock (kHz) x bus width (bits) x 2 (double data rate) = peak DRAM bytes/s.
        bandwidth = 2.0 * dev.MEMORY_CLOCK_RATE * 1e3 * dev.GLOBAL_MEMORY_BUS_WIDTH / 8
    except AttributeError:
        bandwidth = None
    bandwidth = bandwidth or None
    return DeviceProfile(
        name=name, sm_count=int(dev.MULTIPROCESSOR_COUNT),
        smem_per_block_optin=int(dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
        smem_per_sm=int(dev.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
        smem_reserved_per_block=int(dev.RESERVED_SHARED_MEMORY_PER_BLOCK),
        regs_per_sm=int(dev.MAX_REGISTERS_PER_MULTIPROCESSOR),
        regs_per_block=int(dev.MAX_REGISTERS_PER_BLOCK),
        max_threads_per_block=int(dev.MAX_THREADS_PER_BLOCK),
        max_threads_per_sm=int(dev.MAX_THREADS_PER_MULTI_PROCESSOR),
        max_blocks_per_sm=int(dev.MAX_BLOCKS_PER_MULTIPROCESSOR),
        compute_capability=cc, mem_bandwidth=bandwidth, l2_bytes=int(dev.L2_CACHE_SIZE))


@dataclass(frozen=True)
class Plan:
    """The path for one layer and direction, and why.

    blocks, units_per_block, smem_bytes_fwd/bwd describe the persistent configuration that was
    considered: the one launched when path == "persistent", the one that failed otherwise.
    threads is the block size of whichever kernels run. regs_per_thread is the register budget
    the residency count assumed (the static checks hold the kernels to it).
    """
    cell: str
    input_size: int
    hidden_size: int
    batch: int
    dtype: str
    device: DeviceProfile
    path: str                       # "persistent" | "stepwise"
    blocks: int                     # P
    threads: int                    # per block
    units_per_block: int            # U = ceil(H / P)
    smem_bytes_fwd: int             # dynamic shared memory per block, persistent forward
    smem_bytes_bwd: int             # ... persistent backward
    blocks_per_sm: int              # resident blocks per SM the device allows at these resources
    max_cooperative_blocks: int     # SMs x resident blocks per SM at this block's resources
    regs_per_thread: int
    reasons: tuple = field(default=())
    batch_tile: int = 1             # rows of the batch a persistent block stages at once
    persistent_fits: bool = False   # the persistent configuration fits (path may still be
                                    # stepwise where the model predicts that faster)
    # predicted seconds per step (gpurnn.cost): {"persistent": (fwd, bwd), "stepwise": (fwd,
    # bwd)} of StepTime; None on the simulator profile (no timing) or where a path cannot run
    predicted: Optional[dict] = None

    def predicted_step(self, path: Optional[str] = None, direction: str = "fwd"):
        """The model's StepTime for one step of `path` (default: plan.path), 'fwd' or 'bwd';
        None where the model has no timing."""
        path = self.path if path is None else path
        if not self.predicted or path not in self.predicted:
            return None
        return self.predicted[path][0 if direction == "fwd" else 1]

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def stepwise_grid(self) -> int:
        """Blocks of the stepwise pointwise kernel: one thread per (batch row, unit)."""
        return -(-self.batch * self.hidden_size // self.threads)

    def __str__(self):
        head = (f"{self.cell} H={self.hidden_size} I={self.input_size} B={self.batch} "
                f"{self.dtype} on {self.device.name}: {self.path}")
        if self.path == "persistent":
            head += (f", {self.blocks} blocks x {self.threads} threads, "
                     f"{self.units_per_block} units per block")
            if self.batch_tile < self.batch:
                head += (f", batch in {batch_tiles(self.batch, self.batch_tile)} tiles of "
                         f"{self.batch_tile}")
        else:
            head += f", GEMM + pointwise kernel per step ({self.threads} threads per block)"
        return "\n".join([head] + [f"  - {r}" for r in self.reasons])


def _validate_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def _validate_cell(cell):
    if cell not in GATES:
        hint = ""
        if cell in ("rnn", "RNN"):
            hint = " (an Elman RNN is 'rnn_tanh' or 'rnn_relu'; gpurnn.cells.rnn_cell builds the name)"
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}{hint}")


def _dtype_name(dtype, allowed):
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or dtype
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"dtype must be one of {allowed}; got {dtype!r}")
    return name


def _threads(threads, dev):
    if threads is None:
        return dev.default_threads
    _validate_int("threads", threads, 32)
    if threads % 32 or threads > dev.max_threads_per_block:
        raise ValueError(f"threads must be a multiple of 32 in 32..{dev.max_threads_per_block} "
                         f"on {dev.name}; got {threads}")
    return threads


def _regs_budget(regs_per_thread, threads, dev):
    """The registers a thread may use; by default what one block of `threads` per SM allows,
    in whole allocation units (registers are handed out per warp, _REG_ALLOC_UNIT at a time)."""
    warps = threads // 32
    per_warp = min(dev.regs_per_block, dev.regs_per_sm) // warps // _REG_ALLOC_UNIT * _REG_ALLOC_UNIT
    limit = min(_MAX_REGS_PER_THREAD, per_warp // 32)
    if regs_per_thread is None:
        return limit
    _validate_int("regs_per_thread", regs_per_thread)
    if regs_per_thread > limit:
        raise ValueError(f"regs_per_thread must be <= {limit} for {threads} threads per block on "
                         f"{dev.name}; got {regs_per_thread}")
    return regs_per_thread


def _resident_limit(threads, regs, dev):
    """Blocks per SM allowed by threads, registers and the hardware cap (not shared memory)."""
    regs_per_warp = -(-regs * 32 // _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    by_regs = dev.regs_per_sm // (regs_per_warp * (threads // 32))
    return min(dev.max_blocks_per_sm, dev.max_threads_per_sm // threads, by_regs)


@dataclass(frozen=True)
class _Fit:
    blocks: int
    units: int
    fwd: int
    bwd: int
    per_sm: int          # resident blocks per SM at this shared memory (and the other limits)
    coop: int            # SMs x per_sm
    tile: int            # batch rows staged at once

    @property
    def smem(self):
        return max(self.fwd, self.bwd)


def _fit_tile(gates, hidden, dtype, blocks, cap, dev, threads, tile):
    units = units_per_block(hidden, blocks)
    fwd = smem_bytes_for("fwd", gates, hidden, tile, units, dtype, threads=threads)
    bwd = smem_bytes_for("bwd", gates, hidden, tile, units, dtype, threads=threads)
    by_smem = dev.smem_per_sm // (max(fwd, bwd) + dev.smem_reserved_per_block)
    per_sm = min(cap, by_smem)
    return _Fit(blocks, units, fwd, bwd, per_sm, per_sm * dev.sm_count, tile)


def _fits(f, dev):
    return f.smem <= dev.smem_per_block_optin and 1 <= f.blocks <= f.coop


def _fit_at(gates, hidden, batch, dtype, blocks, cap, dev, threads, tile=None):
    """The fit of a P = blocks grid: with `tile` rows staged at once if given, else with the
    largest tile (whole batch first) that fits; else the one-row attempt, which explains why
    nothing does. Shared memory grows with the tile, so a bisection finds the largest."""
    if tile is not None:
        return _fit_tile(gates, hidden, dtype, blocks, cap, dev, threads, tile)
    whole = _fit_tile(gates, hidden, dtype, blocks, cap, dev, threads, batch)
    if _fits(whole, dev) or batch == 1:
        return whole
    one = _fit_tile(gates, hidden, dtype, blocks, cap, dev, threads, 1)
    if not _fits(one, dev):
        return one
    lo, hi = 1, batch          # fits at lo, not at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits(_fit_tile(gates, hidden, dtype, blocks, cap, dev, threads, mid), dev):
            lo = mid
        else:
            hi = mid
    return _fit_tile(gates, hidden, dtype, blocks, cap, dev, threads, lo)


def _search(gates, hidden, batch, dtype, cap, dev, threads, tile=None):
    """The persistent grid with the smallest slice per block: P = min(H, SMs x k) for the most
    resident blocks per SM k that still fit, then U = ceil(H/P) and P = ceil(H/U) (no empty
    block) — first staging the whole batch at once, then in the largest batch tiles that fit
    (so the weights, not the batch, decide whether a layer is persistent). Returns the fit, or
    the k = 1 attempt (which explains the failure)."""
    tries = (tile,) if tile is not None else (batch, None)
    first = None
    for t in tries:
        for k in range(max(cap, 1), 0, -1):
            blocks = min(hidden, dev.sm_count * k)
            units = units_per_block(hidden, blocks)
            f = _fit_at(gates, hidden, batch, dtype, -(-hidden // units), cap, dev, threads, t)
            if _fits(f, dev):
                return f
            if k == 1:
                first = f
    return first


def _kb(n):
    if n >= KB * KB:
        return f"{n:,} B ({n / KB / KB:.1f} MB)"
    return f"{n:,} B ({n / KB:.1f} KB)"


def plan(cell, input_size, hidden_size, batch, dtype="float32", device=None, *, blocks=None,
         threads=None, regs_per_thread=None, batch_tile=None) -> Plan:
    """Choose the persistent or the stepwise path for one layer and direction.

    cell: one of gpurnn.cells.CELLS. dtype: "float32" | "float64" (or the NumPy dtype).
    device: a profile name (see PROFILES), a DeviceProfile, or None for the current device.
    blocks: force the persistent grid size P (still checked: a grid that cannot be co-resident
    is never planned; the plan falls back to stepwise and says why).
    threads: threads per block (multiple of 32); default 256 on GPUs, 32 for "sim".
    regs_per_thread: the register budget per thread to assume; default what one block per SM
    allows (min(255, 65536 / threads)), so by default one block per SM is resident. A backend
    holding the compiled kernel may pass its real count to allow more resident blocks.
    batch_tile: force the rows of the batch a persistent block stages at once (1..batch);
    default the whole batch if it fits, else the largest tile that does.

    The persistent path fits iff the forward and backward shared memory per block fit the
    opt-in limit and P does not exceed SMs x resident blocks per SM (residency from shared
    memory, threads and registers), with threads within the device's limits. Where both paths
    can run, the step-time model (gpurnn.cost) picks the one it predicts faster, and the plan
    prints both predictions; a forced `blocks` or `batch_tile` keeps the persistent path.
    """
    _validate_cell(cell)
    _validate_int("input_size", input_size)
    _validate_int("hidden_size", hidden_size)
    _validate_int("batch", batch)
    dtype = _dtype_name(dtype, KERNEL_DTYPES)
    dev = device_profile(device)
    nthreads = _threads(threads, dev)
    regs = _regs_budget(regs_per_thread, nthreads, dev)
    if blocks is not None:
        _validate_int("blocks", blocks)
    if batch_tile is not None:
        _validate_int("batch_tile", batch_tile)
        if batch_tile > batch:
            raise ValueError(f"batch_tile must be <= batch ({batch}); got {batch_tile}")
    return _plan(cell, input_size, hidden_size, batch, dtype, ITEMSIZE[dtype], dev, blocks,
                 nthreads, regs, batch_tile)


def _plan(cell, input_size, hidden, batch, dtype, itemsize, dev, blocks, threads, regs,
          tile=None, by_time=True):
    gates = GATES[cell]
    cap = _resident_limit(threads, regs, dev)
    reasons = []
    if blocks is None:
        f = _search(gates, hidden, batch, dtype, cap, dev, threads, tile)
    else:
        f = _fit_at(gates, hidden, batch, dtype, blocks, cap, dev, threads, tile)
        reasons.append(f"blocks={blocks} forced by the caller")
        used = -(-hidden // f.units)
        if used < blocks:
            idle = blocks - used
            reasons.append(f"{idle} of the {blocks} blocks own{'s' if idle == 1 else ''} no unit "
                           f"(U={f.units} covers H={hidden} with {used}) and only join"
                           f"{'s' if idle == 1 else ''} the grid barriers")
    if tile is not None:
        reasons.append(f"batch_tile={tile} forced by the caller")

    failures = []
    limit = dev.smem_per_block_optin
    for direction, need in (("forward", f.fwd), ("backward", f.bwd)):
        if need > limit:
            over = need - limit
            failures.append(f"{direction} needs {_kb(need)} of shared memory per block at P={f.blocks} "
                            f"(U={f.units}), {over:,} B ({100 * over / limit:.1f}%) over the "
                            f"{_kb(limit)} opt-in limit of {dev.name}")
    if cap < 1:
        failures.append(f"{threads} threads x {regs} registers per thread do not fit one SM "
                        f"({dev.regs_per_sm} registers)")
    elif regs < KERNEL_REGS_MAX:
        failures.append(f"{threads} threads per block leave {regs} registers per thread; the "
                        f"persistent kernels are built to use up to {KERNEL_REGS_MAX} (at most "
                        f"{dev.regs_per_block // KERNEL_REGS_MAX} threads per block)")
    elif not failures and f.blocks > f.coop:
        failures.append(f"a cooperative grid of P={f.blocks} blocks cannot be co-resident: at most "
                        f"{f.per_sm} per SM x {dev.sm_count} SMs = {f.coop}")

    timing = cost.timing_for(dev) if by_time else None
    predicted = None
    if timing is not None:
        predicted = {"stepwise": tuple(cost.stepwise_step(d, gates, hidden, batch, itemsize,
                                                          dev.l2_bytes, dev, timing)
                                       for d in ("fwd", "bwd"))}
        if not failures:
            predicted["persistent"] = tuple(
                cost.persistent_step(d, gates, hidden, batch, itemsize, f.blocks, f.units, f.tile,
                                     RESERVE_GATES[cell], dev, timing) for d in ("fwd", "bwd"))

    if failures:
        path = "stepwise"
        reasons += failures
        reasons.append(f"stepwise: per step one GEMM re-reads W_hh ({_kb(gates * hidden * hidden * itemsize)}) "
                       f"and one pointwise kernel ({threads} threads per block)")
    else:
        path = "persistent"
        w = gates * f.units * hidden * itemsize
        staged = "the whole batch" if f.tile == batch else f"the batch in tiles of {f.tile} rows"
        reasons.append(f"W_hh slice of {f.units} units x {gates} gates x H={hidden} = {_kb(w)} stays in "
                       f"shared memory, staging {staged}; forward needs {_kb(f.fwd)}, backward "
                       f"{_kb(f.bwd)} per block, within the {_kb(limit)} opt-in limit of {dev.name} "
                       f"({100 * f.smem / limit:.0f}% used)")
        reasons.append(f"grid of P={f.blocks} blocks <= cooperative limit {f.coop} "
                       f"({f.per_sm} resident per SM x {dev.sm_count} SMs; "
                       f"{threads} threads x <= {regs} registers per thread)")
        if f.smem > 48 * KB and not dev.simulator:
            reasons.append("shared memory above 48 KB per block: the launch opts in with "
                           "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")
    if predicted is not None:
        pers = predicted.get("persistent")
        step = predicted["stepwise"]
        s_total = step[0].total + step[1].total
        line = f"step-time model (unmeasured): stepwise {s_total * 1e6:.2f} us per fwd+bwd step"
        if pers is not None:
            p_total = pers[0].total + pers[1].total
            line = (f"step-time model (unmeasured): persistent {p_total * 1e6:.2f} us per fwd+bwd "
                    f"step (fwd {pers[0]}), stepwise {s_total * 1e6:.2f} us (fwd {step[0]})")
            if s_total < p_total and blocks is None and tile is None:
                path = "stepwise"
                line += "; stepwise is predicted faster, so it runs"
        reasons.append(line)
    return Plan(cell=cell, input_size=input_size, hidden_size=hidden, batch=batch, dtype=dtype,
                device=dev, path=path, blocks=f.blocks, threads=threads, units_per_block=f.units,
                smem_bytes_fwd=f.fwd, smem_bytes_bwd=f.bwd, blocks_per_sm=f.per_sm,
                max_cooperative_blocks=f.coop, regs_per_thread=regs, reasons=tuple(reasons),
                batch_tile=f.tile, predicted=predicted, persistent_fits=not failures)


def capacity(cell, dtype="float32", device="H100", batch=1, *, threads=None,
             regs_per_thread=None) -> int:
    """The largest hidden size H the persistent path fits on `device` (0 if none), whatever
    the step-time model would choose. dtype is a storage dtype: "float16" and "bfloat16" keep
    the weight slice in 2-byte elements (the rest of shared memory stays fp32).
    Feasibility falls monotonically with H (U = ceil(H/P) never shrinks as H grows, and the
    shared memory grows with both), so a bisection finds the edge.
    """
    _validate_cell(cell)
    _validate_int("batch", batch)
    dtype = _dtype_name(dtype, KERNEL_DTYPES)
    dev = device_profile(device)
    nthreads = _threads(threads, dev)
    regs = _regs_budget(regs_per_thread, nthreads, dev)

    def persistent(h):      # fits: capacity is about shared memory, not predicted speed
        return _plan(cell, 1, h, batch, dtype, ITEMSIZE[dtype], dev, None, nthreads,
                     regs, by_time=False).persistent_fits

    if not persistent(1):
        return 0
    lo, hi = 1, 2
    while persistent(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if persistent(mid) else (lo, mid)
    return lo


# Pointwise work per (batch row, unit), transcendental functions counted as one operation each:
# LSTM 3 sigmoid + 2 tanh + c = f*c + i*g (3) + h = o*tanh(c) (1) = 9 (+1 for c's tanh input);
# GRU 2 sigmoid + tanh + r*(..)+.. (2) + (1-z)*n + z*h (4) = 9 (+ the b_hn add); RNN act only.
_POINTWISE_OPS = {"lstm": 10, "gru": 10, "rnn_tanh": 1, "rnn_relu": 1}


def _check_plan(plan):
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a gpurnn.plan.Plan (what gpurnn.plan(...) returns); got "
                        f"{type(plan).__name__} {plan!r}")


def step_traffic(plan: Plan, path: Optional[str] = None, *, training: bool = True) -> dict:
    """Global-memory bytes and FLOPs of one forward step of `path` (default: plan.path).

    Returns a dict: path; bytes (breakdown: name -> bytes); global_bytes (every load and store
    the kernels issue to global memory, i.e. what passes through L2); dram_bytes (each tensor
    region touched in the step counted once per read and once per write: what DRAM moves if
    nothing survives in L2 between steps); flops; launches (kernels per step); w_hh_bytes and
    w_hh_fits_l2.

    Model (s = itemsize, G gates, S reserve gate slots, P blocks):
      both    read Gx_t (B*G*H*s, produced by the input GEMM before the recurrence), read
              c_{t-1} (LSTM), write h_t (also y_t: the output is a view of the reserve's h),
              write c_t (LSTM), write the reserve gates B*S*H*s when training; GRU reads
              b_hh (G*H*s) every step. FLOPs: 2*B*G*H*H (recurrent product) + B*G*H (adding
              Gx) + pointwise ops (_POINTWISE_OPS per unit, transcendentals count as one).
      persistent  W_hh stays in shared memory (its one load per launch, G*H*H*s, is not
              counted per step); every block stages the whole h_{t-1}: P*B*H*s through L2, of
              which DRAM sees B*H*s at most. One launch for all steps.
      stepwise  the GEMM reads W_hh (G*H*H*s) and h_{t-1} (B*H*s) and writes the pre-
              activations Gh (B*G*H*s), which the pointwise kernel reads back. Two launches.
    Not modelled: the input GEMM and dW/dX GEMMs (the same for both paths), tile re-reads
    inside the GEMM, the backward pass, and L2 hits across steps (when w_hh_fits_l2 the
    stepwise W_hh re-read is served by L2, so its real DRAM cost is lower than dram_bytes).
    """
    _check_plan(plan)
    path = plan.path if path is None else path
    if path not in ("persistent", "stepwise"):
        raise ValueError(f"path must be 'persistent', 'stepwise' or None; got {path!r}")
    s, G, H, B = plan.itemsize, plan.gates, plan.hidden_size, plan.batch
    S = RESERVE_GATES[plan.cell]
    lstm = plan.cell == "lstm"
    state = B * H * s
    common = {
        "read gx_t": B * G * H * s,
        "read c_prev": state if lstm else 0,
        "read b_hh": G * H * s if plan.cell == "gru" else 0,
        "write h_t": state,
        "write c_t": state if lstm else 0,
        "write reserve gates": B * S * H * s if training else 0,
    }
    if path == "persistent":
        per_path = {"read h_prev (every block)": plan.blocks * state}
        dram_extra = {"read h_prev (every block)": state}
        launches = 1
    else:
        gh = B * G * H * s
        per_path = {"gemm read w_hh": G * H * H * s, "gemm read h_prev": state,
                    "gemm write gh": gh, "pointwise read gh": gh}
        dram_extra = per_path
        launches = 2
    breakdown = {k: v for k, v in {**common, **per_path}.items() if v}
    flops = 2 * B * G * H * H + B * G * H + _POINTWISE_OPS[plan.cell] * B * H
    w_bytes = G * H * H * s
    l2 = plan.device.l2_bytes
    return {
        "path": path,
        "bytes": breakdown,
        "global_bytes": sum(breakdown.values()),
        "dram_bytes": sum(common.values()) + sum(dram_extra.values()),
        "flops": flops,
        "launches": launches,
        "w_hh_bytes": w_bytes,
        "w_hh_fits_l2": bool(l2) and w_bytes <= l2,
    }


def step_floor_seconds(plan: Plan, path: Optional[str] = None, *, training: bool = True) -> float:
    """A lower bound on one forward step's time: its dram_bytes (step_traffic) at the device's
    DRAM bandwidth. It ignores compute, latency and launch overhead, and counts the persistent
    h broadcast at its DRAM cost (the other P-1 copies are L2 hits); at small B the persistent
    step is latency-bound (a grid barrier per step), far above this floor."""
    _check_plan(plan)
    bw = plan.device.mem_bandwidth
    if not bw:
        raise ValueError(f"device profile {plan.device.name!r} has no mem_bandwidth; pass a "
                         f"DeviceProfile with mem_bandwidth in bytes/s")
    return step_traffic(plan, path, training=training)["dram_bytes"] / bw


def traffic_saving(plan: Plan, *, training: bool = True) -> dict:
    """Bytes per forward step the persistent path saves over the stepwise one (positive: fewer).
    The plan's own path does not matter; the persistent grid it considered is used."""
    _check_plan(plan)
    p = step_traffic(plan, "persistent", training=training)
    q = step_traffic(plan, "stepwise", training=training)
    return {"global_bytes": q["global_bytes"] - p["global_bytes"],
            "dram_bytes": q["dram_bytes"] - p["dram_bytes"],
            "launches": q["launches"] - p["launches"]}


__all__ = ["DeviceProfile", "PROFILES", "Plan", "plan", "capacity", "device_profile",
           "profile_from_numba_device", "step_traffic", "step_floor_seconds", "traffic_saving"]


class _CallableModule(types.ModuleType):
    """`gpurnn.plan` is this module (capacity, step_traffic, ...) and, called, its main
    function: docs/design.md §4 names both the module and the public `gpurnn.plan(...)`, and a
    package attribute cannot be two objects, so the module answers calls with plan()."""

    def __call__(self, *args, **kwargs):
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
