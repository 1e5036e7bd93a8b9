"""What fits: the persistent kernel's grid, batch tile and residency on a device, what stops it,
and the capacity (largest hidden size) the persistent path fits.

A persistent launch is possible when every block's shared memory (gpurnn.kernels.layout, the one
model the kernels allocate by) fits the device's opt-in limit per block and the whole grid can be
resident at once (a cooperative launch never waits for a block to finish).

The argument checks of the public planning functions (plan, capacity) live here too: both resolve
the same dtype, device, threads and register budget.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..cells import ALL_CELLS, GATES
from ..kernels.dtypes import STORAGE
from ..kernels.layout import KERNEL_REGS_MAX, smem_bytes_for, units_per_block
from . import grid
from .profiles import KB, device_profile

# Dtypes the kernels exist for; the capacity model also takes 16-bit storage (see capacity()).
KERNEL_DTYPES = STORAGE        # storage dtypes (gpurnn.kernels.dtypes); 16-bit computes in fp32
# Registers are allocated per warp in units of 256 (sm_50 .. sm_90).
_REG_ALLOC_UNIT = 256
_MAX_REGS_PER_THREAD = 255


def check_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}")


def check_cell(cell):
    if cell not in GATES:
        hint = ""
        if cell in ("rnn", "RNN"):
            hint = " (an Elman RNN is 'rnn_tanh' or 'rnn_relu'; gpurnn.cells.rnn_cell builds the name)"
        raise ValueError(f"cell must be one of {ALL_CELLS}; got {cell!r}{hint}")


def _dtype_name(dtype, allowed):
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or dtype
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"dtype must be one of {allowed}; got {dtype!r}")
    return name


def _threads(threads, dev):
    if threads is None:
        return dev.default_threads
    check_int("threads", threads, 32)
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
    check_int("regs_per_thread", regs_per_thread)
    if regs_per_thread > limit:
        raise ValueError(f"regs_per_thread must be <= {limit} for {threads} threads per block on "
                         f"{dev.name}; got {regs_per_thread}")
    return regs_per_thread


def resolve(cell, batch, dtype, device, threads, regs_per_thread):
    """Check the arguments plan() and capacity() share, in this order; returns (dtype name,
    DeviceProfile, threads per block, registers per thread)."""
    check_cell(cell)
    check_int("batch", batch)
    dtype = _dtype_name(dtype, KERNEL_DTYPES)
    dev = device_profile(device)
    nthreads = _threads(threads, dev)
    return dtype, dev, nthreads, _regs_budget(regs_per_thread, nthreads, dev)


def resident_limit(threads, regs, dev):
    """Blocks per SM allowed by threads, registers and the hardware cap (not shared memory)."""
    regs_per_warp = -(-regs * 32 // _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    by_regs = dev.regs_per_sm // (regs_per_warp * (threads // 32))
    return min(dev.max_blocks_per_sm, dev.max_threads_per_sm // threads, by_regs)


@dataclass(frozen=True)
class Fit:
    """One persistent configuration: grid, slice, shared memory per block, residency."""
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
    return Fit(blocks, units, fwd, bwd, per_sm, per_sm * dev.sm_count, tile)


def fit_at(gates, hidden, batch, dtype, blocks, cap, dev, threads, tile=None):
    """The fit of a P = blocks grid: with `tile` rows staged at once if given, else with the
    largest tile (whole batch first) that fits; else the one-row attempt, which explains why
    nothing does (planning.grid.best_tile)."""
    return grid.best_tile(lambda t: _fit_tile(gates, hidden, dtype, blocks, cap, dev, threads, t),
                          batch, dev, tile)


def search(gates, hidden, batch, dtype, cap, dev, threads, tile=None):
    """The persistent grid with the smallest slice per block that fits (planning.grid.search:
    P = min(H, SMs x k) for the most resident blocks per SM k, the whole batch staged first,
    then the largest batch tile), or the k = 1 attempt (which explains the failure)."""
    return grid.search(lambda blocks, t: fit_at(gates, hidden, batch, dtype, blocks, cap, dev,
                                                threads, t), hidden, batch, cap, dev, tile)


def kb(n):
    """Bytes as text: '1,024 B (1.0 KB)'."""
    if n >= KB * KB:
        return f"{n:,} B ({n / KB / KB:.1f} MB)"
    return f"{n:,} B ({n / KB:.1f} KB)"


def persistent_failures(f, cap, threads, regs, dev):
    """Why the persistent configuration `f` cannot launch (an empty list: it can): shared memory
    per block over the opt-in limit, registers, or a grid that cannot be co-resident."""
    out = []
    limit = dev.smem_per_block_optin
    for direction, need in (("forward", f.fwd), ("backward", f.bwd)):
        if need > limit:
            over = need - limit
            out.append(f"{direction} needs {kb(need)} of shared memory per block at P={f.blocks} "
                       f"(U={f.units}), {over:,} B ({100 * over / limit:.1f}%) over the "
                       f"{kb(limit)} opt-in limit of {dev.name}")
    if cap < 1:
        out.append(f"{threads} threads x {regs} registers per thread do not fit one SM "
                   f"({dev.regs_per_sm} registers)")
    elif regs < KERNEL_REGS_MAX:
        out.append(f"{threads} threads per block leave {regs} registers per thread; the "
                   f"persistent kernels are built to use up to {KERNEL_REGS_MAX} (at most "
                   f"{dev.regs_per_block // KERNEL_REGS_MAX} threads per block)")
    elif not out and f.blocks > f.coop:
        out.append(f"a cooperative grid of P={f.blocks} blocks cannot be co-resident: at most "
                   f"{f.per_sm} per SM x {dev.sm_count} SMs = {f.coop}")
    return out


def capacity(cell, dtype="float32", device="H100", batch=1, *, threads=None,
             regs_per_thread=None) -> int:
    """The largest hidden size H the persistent path fits on `device` (0 if none), whatever
    the step-time model would choose. dtype is a storage dtype: "float16" and "bfloat16" keep
    the weight slice in 2-byte elements (the rest of shared memory stays fp32).
    Feasibility falls monotonically with H (U = ceil(H/P) never shrinks as H grows, and the
    shared memory grows with both), so a bisection finds the edge.
    """
    dtype, dev, nthreads, regs = resolve(cell, batch, dtype, device, threads, regs_per_thread)
    gates = GATES[cell]
    cap = resident_limit(nthreads, regs, dev)

    def persistent(h):      # fits: capacity is about shared memory, not predicted speed
        f = search(gates, h, batch, dtype, cap, dev, nthreads)
        return not persistent_failures(f, cap, nthreads, regs, dev)

    if not persistent(1):
        return 0
    lo, hi = 1, 2
    while persistent(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if persistent(mid) else (lo, mid)
    return lo


__all__ = ["KERNEL_DTYPES", "capacity"]
