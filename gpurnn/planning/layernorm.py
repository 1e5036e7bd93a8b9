"""The LayerNormLSTM's plan: what fits, the path, its predicted step time and its bytes per step
(kernels: gpurnn/kernels/layernorm.py, whose smem_bytes is the one shared-memory model).

Capacity. A persistent block holds the plain LSTM's weight slice of its U = ceil(H/P) units
for the whole launch (forward the rows W_hh[gate*H + U_j, :], backward the columns W_hh[:, U_j]:
4*U*H weights, each row padded) plus the staged batch tile (h: bt*H forward; da: bt*4H
backward), the pre-activations (bt*4U), one partial per thread, and what the layer norm adds:
the row statistics (2 bt) and, backward, the c-side partial products (2 bt U). The per-block row
partials of the grid-wide statistics live in global memory (2 x P x B x 2), so they set no
shared-memory capacity; the LN parameters are read from global memory. So the capacity is the
plain LSTM's less a few elements per block (capacity_table()).
The grid search is every family's (planning.grid.search: P = min(H, SMs x k) for the most
resident blocks per SM k that fit, then the largest batch tile that fits), given this kernel's
shared-memory model.

Path and time. Each step is two grid-synchronised phases, forward and backward (the c~ and h
statistics span the blocks, kernels/layernorm.py says why two and not three): a persistent step
is planning.cost.persistent_step of the 4-gate product plus one more grid barrier and each
block's extra reads (all P partials per row twice a step; forward every block forms all of
h_{t-1}, backward all of da). A stepwise step is planning.cost.stepwise_step's GEMM plus two
more pointwise kernels, the host's row statistics and their launches. The faster predicted
path runs where both fit; a forced blocks or batch_tile keeps the persistent one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..kernels import layernorm as kernels
from ..kernels.dtypes import ITEMSIZE
from ..kernels.layout import KERNEL_REGS_MAX as KERNEL_REGS_MAX_PLAIN
from ..kernels.layout import units_per_block
from . import cost, grid
from .capacity import Fit, check_int, kb, persistent_failures, resident_limit, resolve
from .profiles import KB, DeviceProfile

DTYPES = kernels.DTYPES
GATES = kernels.GATES
GRID_BARRIERS_PER_STEP = 2
# Registers per thread the persistent LayerNormLSTM kernels are held to (ptxas, sm_80/sm_90,
# tests/test_sim_layernorm.py): above the plain kernels' layout.KERNEL_REGS_MAX (192), as the
# layer norm's statistics, staging and row sums add to the plain step's working set. A block
# size that leaves a thread fewer is refused (at most 288 threads per block).
KERNEL_REGS = 224


@dataclass(frozen=True)
class LayerNormPlan:
    """The path for one LayerNormLSTM layer and direction, and why (fields as
    gpurnn.planning.Plan)."""
    input_size: int
    hidden_size: int
    batch: int
    dtype: str
    device: DeviceProfile
    path: str                       # "persistent" | "stepwise"
    blocks: int
    threads: int
    units_per_block: int
    smem_bytes_fwd: int
    smem_bytes_bwd: int
    blocks_per_sm: int
    max_cooperative_blocks: int
    regs_per_thread: int
    batch_tile: int
    persistent_fits: bool
    reasons: tuple = field(default=())
    predicted: Optional[dict] = None
    cell: str = kernels.CELL

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    def __str__(self):
        head = (f"layernorm_lstm H={self.hidden_size} I={self.input_size} B={self.batch} "
                f"{self.dtype} on {self.device.name}: {self.path}")
        return "\n".join([head] + [f"  - {r}" for r in self.reasons])


def _fit_tile(hidden, dtype, blocks, cap, dev, threads, tile):
    units = units_per_block(hidden, blocks)
    fwd = kernels.smem_bytes("fwd", hidden, tile, units, dtype, threads=threads)
    bwd = kernels.smem_bytes("bwd", hidden, tile, units, dtype, threads=threads)
    per_sm = min(cap, dev.smem_per_sm // (max(fwd, bwd) + dev.smem_reserved_per_block))
    return Fit(blocks, units, fwd, bwd, per_sm, per_sm * dev.sm_count, tile)


def fit_at(hidden, batch, dtype, blocks, cap, dev, threads, tile=None):
    """The fit of a P = blocks grid: with `tile` if given, else the largest tile that fits (the
    whole batch first), else the one-row attempt (which says why nothing fits)."""
    return grid.best_tile(lambda t: _fit_tile(hidden, dtype, blocks, cap, dev, threads, t),
                          batch, dev, tile)


def search(hidden, batch, dtype, cap, dev, threads, tile=None):
    """planning.grid.search's grid (smallest slice per block that fits) for this kernel."""
    return grid.search(lambda blocks, t: fit_at(hidden, batch, dtype, blocks, cap, dev, threads, t),
                       hidden, batch, cap, dev, tile)


def _resolve(batch, dtype, device, threads, regs_per_thread):
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} for the layernorm_lstm; got {dtype!r}")
    # the plain LSTM's checks of batch, device, threads and the register budget
    return resolve("lstm", batch, name, device, threads, regs_per_thread)


def _failures(f, cap, threads, regs, dev):
    """planning.capacity.persistent_failures plus this kernel's own register need."""
    out = persistent_failures(f, cap, threads, regs, dev)
    if 1 <= cap and KERNEL_REGS_MAX_PLAIN <= regs < KERNEL_REGS:
        out.append(f"{threads} threads per block leave {regs} registers per thread; the "
                   f"persistent LayerNormLSTM kernels use up to {KERNEL_REGS}")
    return out


def persistent_step(direction, hidden, batch, itemsize, f, dev, timing):
    """The plain 4-gate persistent step plus the layer norm's: one more grid barrier (two a
    step), every block's reads of the P row partials (2 x B x 2P values a step) and its
    redundant staging work (forward: all of h_{t-1} from c~ and o, 2 more B*H reads; backward:
    all of da from dz and hhat, 2 more B*4H reads), at the SM's share of L2 bandwidth."""
    base = cost.persistent_step(direction, GATES, hidden, batch, itemsize, f.blocks, f.units,
                                f.tile, GATES, dev, timing)
    n = -(-f.blocks // dev.sm_count)
    l2_share = timing.l2_bytes_per_clk * timing.clock_hz / dev.sm_count
    extra_reads = 2 * batch * 2 * f.blocks
    extra_reads += 2 * batch * hidden if direction == "fwd" else 2 * batch * GATES * hidden
    layer_norm = n * extra_reads * itemsize / l2_share
    tiles = -(-batch // f.tile)
    barriers = (GRID_BARRIERS_PER_STEP - 1) * timing.grid_sync_s + tiles * timing.block_sync_s
    parts = dict(base.parts)
    parts["staging"] += layer_norm
    parts["barriers"] += barriers
    return cost.StepTime(base.total + layer_norm + barriers, parts)


def stepwise_step(direction, hidden, batch, itemsize, dev, timing):
    """The plain stepwise step (one GEMM, a pointwise kernel, two launches) plus a second
    pointwise kernel and the host's two row statistics (each an elementwise pass over B*4H or
    B*H values and a launch)."""
    base = cost.stepwise_step(direction, GATES, hidden, batch, itemsize, dev.l2_bytes, dev,
                              timing)
    l2_bw = timing.l2_bytes_per_clk * timing.clock_hz
    dram = dev.mem_bandwidth or l2_bw / 3
    extra = (4 * batch * hidden + 2 * batch * GATES * hidden) * itemsize / dram
    parts = dict(base.parts)
    parts["pointwise"] += extra
    parts["launches"] += 3 * timing.launch_s
    return cost.StepTime(base.total + extra + 3 * timing.launch_s, parts)


def plan(input_size, hidden_size, batch, dtype="float32", device=None, *, blocks=None,
         threads=None, regs_per_thread=None, batch_tile=None) -> LayerNormPlan:
    """The persistent or the stepwise path for one LayerNormLSTM layer and direction
    (arguments as gpurnn.planning.plan's, without the cell)."""
    check_int("input_size", input_size)
    check_int("hidden_size", hidden_size)
    dtype, dev, threads, regs = _resolve(batch, dtype, device, threads, regs_per_thread)
    if blocks is not None:
        check_int("blocks", blocks)
    if batch_tile is not None:
        check_int("batch_tile", batch_tile)
        if batch_tile > batch:
            raise ValueError(f"batch_tile must be <= batch ({batch}); got {batch_tile}")
    H, itemsize = hidden_size, ITEMSIZE[dtype]
    cap = resident_limit(threads, regs, dev)
    reasons = []
    if blocks is None:
        f = search(H, batch, dtype, cap, dev, threads, batch_tile)
    else:
        f = fit_at(H, batch, dtype, blocks, cap, dev, threads, batch_tile)
        reasons.append(f"blocks={blocks} forced by the caller")
    if batch_tile is not None:
        reasons.append(f"batch_tile={batch_tile} forced by the caller")
    failures = _failures(f, cap, threads, regs, dev)
    timing = cost.timing_for(dev)
    predicted = None
    if timing is not None:
        predicted = {"stepwise": tuple(stepwise_step(d, H, batch, itemsize, dev, timing)
                                       for d in ("fwd", "bwd"))}
        if not failures:
            predicted["persistent"] = tuple(persistent_step(d, H, batch, itemsize, f, dev, timing)
                                            for d in ("fwd", "bwd"))
    if failures:
        path = "stepwise"
        reasons += failures
        reasons.append(f"stepwise: per step a GEMM re-reads W_hh ({kb(4 * H * H * itemsize)}), "
                       f"the host forms the row statistics, two pointwise kernels")
    else:
        path = "persistent"
        w = 4 * f.units * H * itemsize
        reasons.append(f"W_hh slices of {f.units} units (4 x {f.units} x H={H} = {kb(w)}) stay "
                       f"in shared memory, staging {f.tile} of {batch} rows at once; forward "
                       f"needs {kb(f.fwd)}, backward {kb(f.bwd)} per block, within the "
                       f"{kb(dev.smem_per_block_optin)} opt-in limit of {dev.name}")
        reasons.append(f"grid of P={f.blocks} blocks <= cooperative limit {f.coop}; two grid "
                       f"barriers per step (the LN statistics of the gates and of c~ span every "
                       f"block: per-block partials, a barrier, a fixed-order sum)")
        if f.smem > 48 * KB and not dev.simulator:
            reasons.append("shared memory above 48 KB per block: the launch opts in with "
                           "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")
    if predicted is not None:
        s_total = sum(p.total for p in predicted["stepwise"])
        line = f"step-time model (unmeasured): stepwise {s_total * 1e6:.2f} us per fwd+bwd step"
        if "persistent" in predicted:
            p_total = sum(p.total for p in predicted["persistent"])
            line += f", persistent {p_total * 1e6:.2f} us"
            if s_total < p_total and blocks is None and batch_tile is None:
                path = "stepwise"
                line += "; stepwise is predicted faster, so it runs"
        reasons.append(line)
    return LayerNormPlan(input_size=input_size, hidden_size=H, batch=batch, dtype=dtype,
                         device=dev, path=path, blocks=f.blocks, threads=threads,
                         units_per_block=f.units, smem_bytes_fwd=f.fwd, smem_bytes_bwd=f.bwd,
                         blocks_per_sm=f.per_sm, max_cooperative_blocks=f.coop,
                         regs_per_thread=regs, batch_tile=f.tile,
                         persistent_fits=not failures, reasons=tuple(reasons),
                         predicted=predicted)


def capacity(dtype="float32", device="H100", batch=1, *, threads=None,
             regs_per_thread=None) -> int:
    """The largest H the persistent LayerNormLSTM fits on `device` (0 if none); feasibility
    falls monotonically with H, so a bisection finds the edge (as planning.capacity.capacity)."""
    dtype, dev, threads, regs = _resolve(batch, dtype, device, threads, regs_per_thread)
    cap = resident_limit(threads, regs, dev)

    def fits(h):
        return not _failures(search(h, batch, dtype, cap, dev, threads), cap, threads, regs, dev)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def capacity_table(devices=("H100", "A100"), batches=(1, 8)):
    """Text: the LayerNormLSTM's capacity beside the plain LSTM's, per device, dtype and batch."""
    from .capacity import capacity as lstm_capacity
    lines = ["device  dtype    batch  layernorm_lstm  lstm"]
    for d in devices:
        for dt in DTYPES:
            for b in batches:
                lines.append(f"{d:<7} {dt:<8} {b:>5}  {capacity(dt, d, b):>14}  "
                             f"{lstm_capacity('lstm', dt, d, b):>4}")
    return "\n".join(lines)


def step_traffic(p: LayerNormPlan, path: Optional[str] = None, *, training: bool = True) -> dict:
    """Global-memory bytes of one forward step of `path` (default p.path), as
    planning.traffic.step_traffic counts them (s = itemsize, P blocks):
      both        read gx_t (4BH s) and c_{t-1}, write h_t, c_t, y_t; write the gates and
                  hhat (4BH s each: the working copy even in inference), c~ (BH s)
      persistent  every block stages all of h_{t-1}, forming it from c~ and o (P 2BH s) and
                  reads h_{t-1} for zoneout (P BH s); the raw products go out and back (4BH s
                  each); the row partials: written 2 x P B 2 s, read by every block (P x 2 x
                  P B 2 s)
      stepwise    the GEMM reads W_hh (4 H H s) and the masked h_{t-1}, writes Gh (4BH s); the
                  host's statistics read Gh and write hhat; the gate kernel reads hhat, the
                  host reads c~ for its statistics, the output kernel reads c~ and o
    dram_bytes counts the per-block staging once (the other P-1 copies are L2 hits)."""
    path = p.path if path is None else path
    if path not in ("persistent", "stepwise"):
        raise ValueError(f"path must be 'persistent', 'stepwise' or None; got {path!r}")
    s, H, B, P = p.itemsize, p.hidden_size, p.batch, p.blocks
    state = B * H * s
    common = {"read gx_t": 4 * state, "read c_prev": state, "write h_t": state,
              "write c_t": state, "write y_t": state, "write gates": 4 * state,
              "write hhat": 4 * state, "write c~": state}
    if path == "persistent":
        partials = 2 * P * B * 2 * s
        per_path = {"stage h_prev from c~, o, h_in (every block)": 3 * P * state,
                    "write raw products": 4 * state, "read raw products": 4 * state,
                    "write row partials": partials, "read row partials (every block)": P * partials}
        dram = {"stage h_prev": 3 * state, "write raw products": 4 * state,
                "read raw products": 4 * state, "row partials": 2 * partials}
        launches = 1
    else:
        per_path = {"gemm read w_hh": 4 * H * H * s, "gemm read h_prev": state,
                    "gemm write gh": 4 * state, "stats read gh": 4 * state,
                    "gates read hhat": 4 * state, "stats read c~": state,
                    "out read c~, o": 2 * state}
        dram = per_path
        launches = 3            # the GEMM and two pointwise kernels (and the host's statistics)
    breakdown = {k: v for k, v in {**common, **per_path}.items() if v}
    return {"path": path, "bytes": breakdown, "global_bytes": sum(breakdown.values()),
            "dram_bytes": sum(common.values()) + sum(dram.values()), "launches": launches,
            "weight_bytes": 4 * H * H * s}


__all__ = ["LayerNormPlan", "plan", "capacity", "capacity_table", "step_traffic",
           "GRID_BARRIERS_PER_STEP", "KERNEL_REGS"]
