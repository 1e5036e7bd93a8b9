"""The gated-feedback stack's plan: what fits, the path, its predicted step time (kernels:
gpurnn/kernels/feedback.py, whose smem_elements is the one shared-memory model).

Capacity. ONE persistent launch runs the whole stack, so the whole stack's recurrent-side
weights are spread over the P blocks and stay in shared memory: per block, for its U = ceil(H/P)
units of every layer, the rows (forward) or columns (backward) of every layer's weight_fb
(L*U*L*H), weight_hh (L*HH*U*H) and, for the layer phases, weight_ih of layers > 1
((L-1)*G*U*H), plus weight_gx of layers > 1 (forward: whole, (L-1)*L*H; backward: the U
columns) and weight_gh (forward: NG = ceil(L*L/P) owned rows of L*H; backward: the L*L*U*L
columns), and B*L reset gates (or their gradients). So the weights per unit are about
L*(L + HH + G)*H against a plain layer's G*H: GF-LSTM at L = 3 holds 3*(3+3+4) = 30 H per unit
where one LSTM layer holds 4 H, and its capacity is about sqrt(4/30) of the LSTM's
(capacity_table()). The grid search is the plain cells' (P = min(H, SMs x k) for the most
resident blocks per SM k that fit).

Step model. Forward: phase 0 (the h*_{t-1} products: L*L*U*H feedback partials, L*HH*U*H own
rows, NG*L*H gate rows per batch row) and L layer phases (G*U*H input rows and the L*H reset
gates per row), each phase behind a grid barrier: 1 + L grid barriers a step; backward: L
layer phases plus phase Z, L grid barriers a step. The activations are read from L2, unstaged,
once per multiply-add (the kernels stage nothing), which the model charges. Stepwise: per step
and layer five GEMMs (h* W_gh^T, x W_gx^T, the gated feedback's W_fb, x W_ih^T, h W_hh^T) that
re-read the layer's weights, and a pointwise kernel. The faster predicted path runs where both
fit; a forced `blocks` keeps the persistent one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..kernels import feedback as kernels
from ..kernels.dtypes import ITEMSIZE
from ..kernels.layout import units_per_block
from . import cost, grid
from .capacity import Fit, check_int, kb, persistent_failures, resident_limit, resolve
from .profiles import KB, DeviceProfile

DTYPES = kernels.DTYPES
CELLS = kernels.CELLS


@dataclass(frozen=True)
class FeedbackPlan:
    """The path for one gated-feedback stack, and why (fields as gpurnn.planning.Plan)."""
    cell: str
    input_size: int
    hidden_size: int
    num_layers: int
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
    persistent_fits: bool
    grid_barriers_per_step: tuple   # (forward 1 + L, backward L)
    reasons: tuple = field(default=())
    predicted: Optional[dict] = None

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    def __str__(self):
        head = (f"{self.cell} L={self.num_layers} H={self.hidden_size} I={self.input_size} "
                f"B={self.batch} {self.dtype} on {self.device.name}: {self.path}")
        return "\n".join([head] + [f"  - {r}" for r in self.reasons])


def fit_at(cell, hidden, layers, batch, dtype, blocks, cap, dev):
    units = units_per_block(hidden, blocks)
    fwd = kernels.smem_bytes("fwd", cell, hidden, layers, batch, units, blocks, dtype)
    bwd = kernels.smem_bytes("bwd", cell, hidden, layers, batch, units, blocks, dtype)
    per_sm = min(cap, dev.smem_per_sm // (max(fwd, bwd) + dev.smem_reserved_per_block))
    return Fit(blocks, units, fwd, bwd, per_sm, per_sm * dev.sm_count, batch)


def search(cell, hidden, layers, batch, dtype, cap, dev):
    """The smallest slice per block that fits (planning.grid.search; these kernels stage no
    batch tile, so one pass)."""
    return grid.search(lambda blocks, _: fit_at(cell, hidden, layers, batch, dtype, blocks, cap,
                                                dev), hidden, batch, cap, dev, tile=batch)


def _resolve(cell, batch, dtype, device, threads, regs_per_thread):
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}; got {cell!r}")
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} for {cell}; got {dtype!r}")
    return resolve("lstm", batch, name, device, threads, regs_per_thread)


def _macs(cell, hidden, layers, batch, units, blocks):
    """Multiply-adds per step of one block: (forward phase 0, forward layers, backward)."""
    G, HH, H, L = kernels.GATES[cell], kernels.HH_GATES[cell], hidden, layers
    ng = kernels.gate_rows(L, blocks)
    phase0 = batch * (units * (L * L * H + L * HH * H) + ng * L * H)
    layers_f = batch * ((L - 1) * (units * G * H + L * H))
    # backward: d_in (G*H + L per unit, layers > 1), ds (L*H per row and layer, redundant),
    # phase Z (L*(H + L) + HH*H per unit and source layer)
    bwd = batch * ((L - 1) * units * (G * H + L) + L * L * H
                   + L * units * (L * (H + L) + HH * H))
    return phase0, layers_f, bwd


def persistent_step(direction, cell, hidden, layers, batch, itemsize, f, dev, timing):
    n = -(-f.blocks // dev.sm_count)
    phase0, layers_f, bwd = _macs(cell, hidden, layers, batch, f.units, f.blocks)
    macs = phase0 + layers_f if direction == "fwd" else bwd
    fma = n * macs / (timing.fma_per_clk_sm[itemsize] * timing.clock_hz)
    l2_share = timing.l2_bytes_per_clk * timing.clock_hz / dev.sm_count
    unstaged = n * macs * itemsize / l2_share        # one activation read per multiply-add
    grid = (1 + layers) if direction == "fwd" else layers
    barriers = grid * timing.grid_sync_s + layers * timing.block_sync_s
    return cost.StepTime(fma + unstaged + barriers,
                         {"fma": fma, "activations": unstaged, "barriers": barriers})


def stepwise_step(direction, cell, hidden, layers, batch, itemsize, dev, timing):
    G, HH, H, L = kernels.GATES[cell], kernels.HH_GATES[cell], hidden, layers
    peak = dev.sm_count * timing.fma_per_clk_sm[itemsize] * 2 * timing.clock_hz
    l2_bw = timing.l2_bytes_per_clk * timing.clock_hz
    dram = dev.mem_bandwidth or l2_bw / 3
    w = (L * H * L * H + G * H * H + HH * H * H + L * L * H + L * H) * itemsize   # one layer
    w_bw = l2_bw if dev.l2_bytes and L * w <= dev.l2_bytes else dram
    gemm = max(2 * batch * w / itemsize / peak, w / w_bw)
    pointwise = 4 * batch * G * H * itemsize / dram
    launches = 6 * timing.launch_s
    per_layer = gemm + pointwise + launches
    return cost.StepTime(L * per_layer, {"gemm": L * gemm, "pointwise": L * pointwise,
                                         "launches": L * launches})


def plan(cell, input_size, hidden_size, num_layers, batch, dtype="float32", device=None, *,
         blocks=None, threads=None, regs_per_thread=None) -> FeedbackPlan:
    """The persistent or the stepwise path for one gated-feedback stack."""
    check_int("input_size", input_size)
    check_int("hidden_size", hidden_size)
    check_int("num_layers", num_layers)
    dtype, dev, threads, regs = _resolve(cell, batch, dtype, device, threads, regs_per_thread)
    if blocks is not None:
        check_int("blocks", blocks)
    H, L, itemsize = hidden_size, num_layers, ITEMSIZE[dtype]
    cap = resident_limit(threads, regs, dev)
    reasons = []
    if blocks is None:
        f = search(cell, H, L, batch, dtype, cap, dev)
    else:
        f = fit_at(cell, H, L, batch, dtype, blocks, cap, dev)
        reasons.append(f"blocks={blocks} forced by the caller")
    failures = persistent_failures(f, cap, threads, regs, dev)
    timing = cost.timing_for(dev)
    predicted = None
    if timing is not None:
        predicted = {"stepwise": tuple(stepwise_step(d, cell, H, L, batch, itemsize, dev, timing)
                                       for d in ("fwd", "bwd"))}
        if not failures:
            predicted["persistent"] = tuple(persistent_step(d, cell, H, L, batch, itemsize, f,
                                                            dev, timing)
                                            for d in ("fwd", "bwd"))
    if failures:
        path = "stepwise"
        reasons += failures
        reasons.append(f"stepwise: per step and layer five GEMMs re-read the layer's weights "
                       f"and a pointwise kernel")
    else:
        path = "persistent"
        reasons.append(f"the whole stack's recurrent-side weights of {f.units} units per block "
                       f"stay in shared memory: forward needs {kb(f.fwd)}, backward {kb(f.bwd)} "
                       f"per block, within the {kb(dev.smem_per_block_optin)} opt-in limit of "
                       f"{dev.name}")
        reasons.append(f"grid of P={f.blocks} blocks <= cooperative limit {f.coop}; {1 + L} grid "
                       f"barriers per forward step (the h* products, then each of the {L} "
                       f"layers), {L} per backward step")
        if f.smem > 48 * KB and not dev.simulator:
            reasons.append("shared memory above 48 KB per block: the launch opts in with "
                           "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")
    if predicted is not None:
        s_total = sum(p.total for p in predicted["stepwise"])
        line = f"step-time model (unmeasured): stepwise {s_total * 1e6:.2f} us per fwd+bwd step"
        if "persistent" in predicted:
            p_total = sum(p.total for p in predicted["persistent"])
            line += f", persistent {p_total * 1e6:.2f} us"
            if s_total < p_total and blocks is None:
                path = "stepwise"
                line += "; stepwise is predicted faster, so it runs"
        reasons.append(line)
    return FeedbackPlan(cell=cell, input_size=input_size, hidden_size=H, num_layers=L,
                        batch=batch, dtype=dtype, device=dev, path=path, blocks=f.blocks,
                        threads=threads, units_per_block=f.units, smem_bytes_fwd=f.fwd,
                        smem_bytes_bwd=f.bwd, blocks_per_sm=f.per_sm,
                        max_cooperative_blocks=f.coop, regs_per_thread=regs,
                        persistent_fits=not failures, grid_barriers_per_step=(1 + L, L),
                        reasons=tuple(reasons), predicted=predicted)


def capacity(cell, num_layers, dtype="float32", device="H100", batch=1, *, threads=None,
             regs_per_thread=None) -> int:
    """The largest H the persistent stack fits on `device` (0 if none); feasibility falls
    monotonically with H, so a bisection finds the edge."""
    check_int("num_layers", num_layers)
    dtype, dev, threads, regs = _resolve(cell, batch, dtype, device, threads, regs_per_thread)
    cap = resident_limit(threads, regs, dev)

    def fits(h):
        return not persistent_failures(search(cell, h, num_layers, batch, dtype, cap, dev), cap,
                                       threads, regs, dev)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def capacity_table(cells=CELLS, devices=("H100", "A100"), layers=(2, 3), batches=(1, 8)):
    """Text: the persistent capacity (largest H) per cell, device, dtype, L and batch."""
    lines = ["cell         device  dtype    L  batch  H"]
    for cell in cells:
        for d in devices:
            for dt in DTYPES:
                for L in layers:
                    for b in batches:
                        lines.append(f"{cell:<12} {d:<7} {dt:<8} {L}  {b:>5}  "
                                     f"{capacity(cell, L, dt, d, b)}")
    return "\n".join(lines)


__all__ = ["FeedbackPlan", "plan", "capacity", "capacity_table"]
