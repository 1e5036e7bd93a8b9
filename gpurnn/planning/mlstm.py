"""The multiplicative LSTM's plan: what fits, the path, its predicted step time and its bytes
per step (kernels: gpurnn/kernels/mlstm.py, whose smem_bytes is the one shared-memory model).

Capacity. A persistent block holds both weight slices of its U = ceil(H/P) units for the whole
launch: forward the rows W_mh[U_j, :] and W_hh[gate*H + U_j, :] (5*U*H weights, each row
padded), backward the columns W_mh[:, U_j] and W_hh[:, U_j] (U*H + U*4H, the same count), plus
the staged batch tile (h or m: bt*H forward; dmh or dgh: bt*4H backward), the pre-activations
and one partial sum per thread. So the weights of an mLSTM layer are 5*H*H against the plain
LSTM's 4*H*H, and its capacity is about sqrt(4/5) = 0.89 of the LSTM's (capacity() below;
`python -c "from gpurnn.planning import mlstm; print(mlstm.capacity_table())"`).
The grid search is the plain cells' (planning.capacity: P = min(H, SMs x k) for the most
resident blocks per SM k that fit, then the largest batch tile that fits); only the shared
memory per block differs, so it is passed in as a function.

Path and time. Each step is two grid-synchronised phases (the mh product, then the gates), so
a persistent step is modelled as planning.cost.persistent_step of a 1-gate phase plus that of
the 4-gate phase (each with its grid barrier), and a stepwise step as two stepwise_step GEMMs
(h_{t-1} W_mh^T and m W_hh^T forward; dgh W_hh and dmh W_mh backward). The faster predicted
path runs where both fit; a forced blocks or batch_tile keeps the persistent one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..kernels import mlstm as kernels
from ..kernels.dtypes import ITEMSIZE
from ..kernels.layout import units_per_block
from . import cost, grid
from .capacity import Fit, check_int, kb, persistent_failures, resident_limit, resolve
from .profiles import KB, DeviceProfile

DTYPES = kernels.DTYPES
GATES = kernels.GATES


@dataclass(frozen=True)
class MLSTMPlan:
    """The path for one mLSTM layer and direction, and why (fields as gpurnn.planning.Plan)."""
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
        head = (f"mlstm H={self.hidden_size} I={self.input_size} B={self.batch} {self.dtype} on "
                f"{self.device.name}: {self.path}")
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
    """planning.grid.search's grid (smallest slice per block that fits) for the mLSTM."""
    return grid.search(lambda blocks, t: fit_at(hidden, batch, dtype, blocks, cap, dev, threads, t),
                       hidden, batch, cap, dev, tile)


def _resolve(batch, dtype, device, threads, regs_per_thread):
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} for the mlstm; got {dtype!r}")
    # the plain LSTM's checks of batch, device, threads and the register budget
    return resolve("lstm", batch, name, device, threads, regs_per_thread)


def persistent_step(direction, hidden, batch, itemsize, f, dev, timing):
    """Two grid-synchronised phases: a 1-gate product (W_mh) and the 4-gate one (W_hh)."""
    one = cost.persistent_step(direction, 1, hidden, batch, itemsize, f.blocks, f.units, f.tile,
                               1, dev, timing)
    four = cost.persistent_step(direction, GATES, hidden, batch, itemsize, f.blocks, f.units,
                                f.tile, GATES, dev, timing)
    parts = {k: one.parts[k] + four.parts[k] for k in one.parts}
    return cost.StepTime(one.total + four.total, parts)


def stepwise_step(direction, hidden, batch, itemsize, dev, timing):
    """Two GEMMs a step (W_mh and W_hh), each with its pointwise work and launches."""
    one = cost.stepwise_step(direction, 1, hidden, batch, itemsize, dev.l2_bytes, dev, timing)
    four = cost.stepwise_step(direction, GATES, hidden, batch, itemsize, dev.l2_bytes, dev,
                              timing)
    parts = {k: one.parts[k] + four.parts[k] for k in one.parts}
    return cost.StepTime(one.total + four.total, parts)


def plan(input_size, hidden_size, batch, dtype="float32", device=None, *, blocks=None,
         threads=None, regs_per_thread=None, batch_tile=None) -> MLSTMPlan:
    """The persistent or the stepwise path for one mLSTM layer and direction (arguments as
    gpurnn.planning.plan's, without the cell)."""
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
    failures = persistent_failures(f, cap, threads, regs, dev)
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
        reasons.append(f"stepwise: per step two GEMMs re-read W_mh and W_hh "
                       f"({kb(5 * H * H * itemsize)}) and pointwise kernels")
    else:
        path = "persistent"
        w = 5 * f.units * H * itemsize
        reasons.append(f"W_mh and W_hh slices of {f.units} units (5 x {f.units} x H={H} = {kb(w)}) "
                       f"stay in shared memory, staging {f.tile} of {batch} rows at once; forward "
                       f"needs {kb(f.fwd)}, backward {kb(f.bwd)} per block, within the "
                       f"{kb(dev.smem_per_block_optin)} opt-in limit of {dev.name}")
        reasons.append(f"grid of P={f.blocks} blocks <= cooperative limit {f.coop}; two grid "
                       f"barriers per step (m needs all of h, the gates all of m)")
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
    return MLSTMPlan(input_size=input_size, hidden_size=H, batch=batch, dtype=dtype, device=dev,
                     path=path, blocks=f.blocks, threads=threads, units_per_block=f.units,
                     smem_bytes_fwd=f.fwd, smem_bytes_bwd=f.bwd, blocks_per_sm=f.per_sm,
                     max_cooperative_blocks=f.coop, regs_per_thread=regs, batch_tile=f.tile,
                     persistent_fits=not failures, reasons=tuple(reasons), predicted=predicted)


def capacity(dtype="float32", device="H100", batch=1, *, threads=None,
             regs_per_thread=None) -> int:
    """The largest H the persistent mLSTM fits on `device` (0 if none); feasibility falls
    monotonically with H, so a bisection finds the edge (as planning.capacity.capacity)."""
    dtype, dev, threads, regs = _resolve(batch, dtype, device, threads, regs_per_thread)
    cap = resident_limit(threads, regs, dev)

    def fits(h):
        return not persistent_failures(search(h, batch, dtype, cap, dev, threads), cap, threads,
                                       regs, dev)

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
    """Text: the mLSTM's capacity beside the plain LSTM's, per device, dtype and batch."""
    from .capacity import capacity as lstm_capacity
    lines = ["device  dtype    batch  mlstm  lstm"]
    for d in devices:
        for dt in DTYPES:
            for b in batches:
                lines.append(f"{d:<7} {dt:<8} {b:>5}  {capacity(dt, d, b):>5}  "
                             f"{lstm_capacity('lstm', dt, d, b):>4}")
    return "\n".join(lines)


def step_traffic(p: MLSTMPlan, path: Optional[str] = None, *, training: bool = True) -> dict:
    """Global-memory bytes of one forward step of `path` (default p.path), as
    planning.traffic.step_traffic counts them (s = itemsize, P blocks):
      both        read Gx_t (4BH s) and mx_t (BH s), read c_{t-1}, write h_t, c_t, y_t; when
                  training write the gates (4BH s) and mh_t (BH s)
      persistent  every block stages all of h_{t-1} (P BH s) and all of m_t (P BH s); m_t is
                  written once (BH s); the weights stay in shared memory
      stepwise    GEMM 1 reads W_mh (H H s) and h_{t-1}, writes mh_t; m_t = mx*mh reads
                  both, writes m_t; GEMM 2 reads W_hh (4 H H s) and m_t, writes Gh (4BH s);
                  the pointwise kernel reads Gh back
    dram_bytes counts the per-block staging once (the other P-1 copies are L2 hits)."""
    path = p.path if path is None else path
    if path not in ("persistent", "stepwise"):
        raise ValueError(f"path must be 'persistent', 'stepwise' or None; got {path!r}")
    s, H, B = p.itemsize, p.hidden_size, p.batch
    state = B * H * s
    common = {"read gx_t": 4 * state, "read mx_t": state, "read c_prev": state,
              "write h_t": state, "write c_t": state, "write y_t": state,
              "write reserve gates": 4 * state if training else 0,
              "write mh_t": state if training else 0}
    if path == "persistent":
        per_path = {"read h_prev (every block)": p.blocks * state, "write m_t": state,
                    "read m_t (every block)": p.blocks * state}
        dram = {"read h_prev": state, "write m_t": state, "read m_t": state}
        launches = 1
    else:
        per_path = {"gemm read w_mh": H * H * s, "gemm read h_prev": state,
                    "gemm write mh_t": state if not training else 0,
                    "m read mx_t, mh_t": 2 * state, "write m_t": state,
                    "gemm read w_hh": 4 * H * H * s, "gemm read m_t": state,
                    "gemm write gh": 4 * state, "pointwise read gh": 4 * state}
        dram = per_path
        launches = 4            # two GEMMs, the m product, the pointwise kernel
    breakdown = {k: v for k, v in {**common, **per_path}.items() if v}
    return {"path": path, "bytes": breakdown, "global_bytes": sum(breakdown.values()),
            "dram_bytes": sum(common.values()) + sum(dram.values()), "launches": launches,
            "weight_bytes": 5 * H * H * s}


__all__ = ["MLSTMPlan", "plan", "capacity", "capacity_table", "step_traffic"]
