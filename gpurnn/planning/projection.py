"""The plan of the LSTM projection (proj_size; kernels: gpurnn/kernels/projection.py): what fits
the persistent projection kernels, the capacity table, the choice persistent vs stepwise, the
step-time model and the bytes per step.

Fit: block j holds both weight slices in shared memory for the whole launch — forward the
W_hh rows of its U = ceil(H/P) units (G*U rows of R) and the W_hr rows of its Q = ceil(R/P)
features (Q rows of H); backward the W_hh columns of its features (Q columns of G*H) and the
W_hr columns of its units (U columns of R) — plus the batch-tile stage, the pre-activations
(forward) and the scratch (kernels.projection.smem_elements, the one model the kernels lay
their memory out by). A configuration runs when both directions fit the opt-in limit per block
and the grid can be co-resident (SMs x resident blocks per SM, from shared memory, threads and
registers, as gpurnn.planning.capacity). The grid search is capacity.search's: the most
resident blocks per SM that fit, P = min(H, SMs x k), then U = ceil(H/P) and P = ceil(H/U),
the whole batch staged first, else the largest batch tile that fits.

Step-time model (unmeasured, as gpurnn.planning.cost; the busiest SM, n = ceil(P/SMs)):
  persistent  max(FMA time, shared reads) + staging + 2 grid barriers + the block barriers
              forward MACs per block B*(G*U*R + Q*H); backward B*(Q*G*H + U*R); staged per
              block: B*(R + H) forward, B*(G*H + R) backward, and the per-block writes
  stepwise    per step two GEMMs (forward h_in W_hh^T and m W_hr^T; backward dgh W_hh and
              dhp W_hr) re-reading W_hh and W_hr, the pointwise kernel, the host's masking
              (two elementwise kernels) and every launch (cost.Timing.launch_s each)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ..kernels import projection as kproj
from ..kernels.dtypes import ITEMSIZE
from ..kernels.layout import batch_tiles
from . import cost, family, grid
from .capacity import check_int, kb, resident_limit, resolve
from .profiles import KB, DeviceProfile

DTYPES = kproj.DTYPES
STEPWISE_LAUNCHES = {"fwd": 5, "bwd": 6}    # kernels per stepwise step (GEMMs, pointwise, where)


@dataclass(frozen=True)
class Fit:
    blocks: int
    units: int           # U = ceil(H / P)
    feats: int           # Q = ceil(R / P)
    tile: int
    fwd: int             # dynamic shared memory bytes per block
    bwd: int
    per_sm: int
    coop: int

    @property
    def smem(self):
        return max(self.fwd, self.bwd)


def _fit_tile(G, H, R, dtype, blocks, cap, dev, threads, tile):
    units, feats = kproj.slices(H, R, blocks)
    fwd = kproj.smem_bytes("fwd", G, H, R, tile, blocks, dtype, threads=threads)
    bwd = kproj.smem_bytes("bwd", G, H, R, tile, blocks, dtype, threads=threads)
    k = family.per_sm(cap, dev, fwd, bwd)
    return Fit(blocks, units, feats, tile, fwd, bwd, k, k * dev.sm_count)


def fit_at(G, H, R, B, dtype, blocks, cap, dev, threads, tile=None):
    """The fit of a P = blocks grid, with `tile` if given, else the largest batch tile that fits
    (the whole batch first); else the one-row attempt, which says why nothing does."""
    return grid.best_tile(lambda t: _fit_tile(G, H, R, dtype, blocks, cap, dev, threads, t),
                          B, dev, tile)


def search(G, H, R, B, dtype, cap, dev, threads, tile=None):
    """The grid with the smallest slices that fits (planning.grid.search), or the k = 1
    attempt, which explains the failure."""
    return grid.search(lambda blocks, t: fit_at(G, H, R, B, dtype, blocks, cap, dev, threads, t),
                       H, B, cap, dev, tile)


def failures(f, cap, threads, regs, dev):
    """Why configuration f cannot launch (empty: it can)."""
    out = []
    limit = dev.smem_per_block_optin
    for name, need in (("forward", f.fwd), ("backward", f.bwd)):
        if need > limit:
            out.append(f"the projection {name} needs {kb(need)} of shared memory per block at "
                       f"P={f.blocks} (U={f.units}, Q={f.feats}), over the {kb(limit)} opt-in "
                       f"limit of {dev.name}")
    if cap < 1:
        out.append(f"{threads} threads x {regs} registers per thread do not fit one SM")
    elif regs < kproj.REGS_MAX:
        out.append(f"{threads} threads per block leave {regs} registers per thread; the "
                   f"persistent projection kernels use up to {kproj.REGS_MAX} (at most "
                   f"{dev.regs_per_block // kproj.REGS_MAX // 32 * 32} threads per block)")
    elif not out and f.blocks > f.coop:
        out.append(f"a cooperative grid of P={f.blocks} blocks cannot be co-resident: at most "
                   f"{f.per_sm} per SM x {dev.sm_count} SMs = {f.coop}")
    return out


def _words(itemsize):
    return 2 if itemsize == 8 else 1


def persistent_step(direction, G, H, R, B, itemsize, f, dev, timing) -> cost.StepTime:
    """One persistent projection step ('fwd' or 'bwd') on the busiest SM."""
    n = -(-f.blocks // dev.sm_count)
    U, Q = f.units, f.feats
    if direction == "fwd":
        macs = B * (G * U * R + Q * H)
        staged = B * (R + H)
        written = B * U * (G + 2) + 2 * B * Q                 # gates, c, m; h, y
        block_syncs = 5
    else:
        macs = B * (Q * G * H + U * R)
        staged = B * (G * H + R)
        written = 2 * B * Q + B * U * (G + 3)                 # dhp, carry; dgh, dm, carries
        block_syncs = 4
    fma = n * macs / (timing.fma_per_clk_sm[itemsize] * timing.clock_hz)
    smem = n * 2 * macs * _words(itemsize) / 32 / timing.clock_hz
    l2_share = timing.l2_bytes_per_clk * timing.clock_hz / dev.sm_count
    staging = n * (staged + written) * itemsize / l2_share
    barriers = (2 * timing.grid_sync_s
                + batch_tiles(B, f.tile) * block_syncs * timing.block_sync_s)
    return cost.StepTime(max(fma, smem) + staging + barriers,
                         {"fma": fma, "smem": smem, "staging": staging, "barriers": barriers})


def stepwise_step(direction, G, H, R, B, itemsize, dev, timing) -> cost.StepTime:
    """One stepwise projection step: two GEMMs, the pointwise kernel, the masking, launches."""
    peak = dev.sm_count * timing.fma_per_clk_sm[itemsize] * 2 * timing.clock_hz
    w = (G * H * R + R * H) * itemsize
    l2_bw = timing.l2_bytes_per_clk * timing.clock_hz
    dram = dev.mem_bandwidth or l2_bw / 3
    w_bw = l2_bw if dev.l2_bytes and w <= dev.l2_bytes else dram
    act = B * (R + G * H + H + R) * itemsize
    gemm = max(2 * B * (G * H * R + R * H) / peak, w / w_bw + act / l2_bw)
    pointwise = (4 * B * G * H + 4 * B * R) * itemsize / dram
    launches = STEPWISE_LAUNCHES[direction] * timing.launch_s
    return cost.StepTime(gemm + pointwise + launches,
                         {"gemm": gemm, "pointwise": pointwise, "launches": launches})


@dataclass(frozen=True)
class Plan:
    """The path of one projected LSTM layer-direction, and why. blocks .. smem_bytes_* describe
    the persistent configuration considered (launched when path == 'persistent')."""
    cell: str
    input_size: int
    hidden_size: int
    proj_size: int
    batch: int
    dtype: str
    device: DeviceProfile
    path: str
    blocks: int
    threads: int
    units_per_block: int
    feats_per_block: int
    batch_tile: int
    smem_bytes_fwd: int
    smem_bytes_bwd: int
    blocks_per_sm: int
    max_cooperative_blocks: int
    regs_per_thread: int
    persistent_fits: bool
    failures: tuple = ()
    reasons: tuple = field(default=())
    predicted: Optional[dict] = None

    @property
    def gates(self):
        return kproj.GATES[self.cell]

    @property
    def itemsize(self):
        return ITEMSIZE[self.dtype]

    def with_path(self, path):
        return self if path == self.path else replace(
            self, path=path, reasons=self.reasons + (f"path={path!r} forced by the caller",))

    def __str__(self):
        head = (f"{self.cell} H={self.hidden_size} proj_size={self.proj_size} "
                f"I={self.input_size} B={self.batch} {self.dtype} on {self.device.name}: "
                f"{self.path}")
        if self.path == "persistent":
            head += (f", {self.blocks} blocks x {self.threads} threads, {self.units_per_block} "
                     f"units and {self.feats_per_block} features per block")
        return family.explained(head, self.reasons)


def _check(cell, input_size, hidden, proj):
    if cell not in kproj.GATES:
        raise ValueError(f"cell must be one of {kproj.CELLS}; got {cell!r}")
    check_int("input_size", input_size)
    check_int("hidden_size", hidden)
    check_int("proj_size", proj)
    if proj >= hidden:
        raise ValueError(f"proj_size must be < hidden_size ({hidden}); got {proj}")


def _resolve(batch, dtype, device, threads, regs_per_thread):
    # capacity.resolve checks batch, dtype, device, threads and registers (its cell check is
    # satisfied by "lstm": the projection's cells are checked by _check)
    dtype, dev, nthreads, regs = resolve("lstm", batch, dtype, device, threads, regs_per_thread)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} for the projection; got {dtype!r}")
    return dtype, dev, nthreads, regs


def plan(cell, input_size, hidden_size, proj_size, batch, dtype="float32", device=None, *,
         blocks=None, threads=None, regs_per_thread=None, batch_tile=None) -> Plan:
    """Choose the persistent or the stepwise path of a projected LSTM layer-direction.

    As gpurnn.planning.plan: device a profile name, a DeviceProfile or None (the current
    device); blocks / batch_tile force the persistent grid / tile (still checked; a forced one
    keeps the persistent path where it fits); where both paths fit the step-time model picks
    the faster (none on the simulator profile: persistent where it fits)."""
    _check(cell, input_size, hidden_size, proj_size)
    dtype, dev, nthreads, regs = _resolve(batch, dtype, device, threads, regs_per_thread)
    family.check_forced(batch, blocks, batch_tile)
    G, H, R, B = kproj.GATES[cell], hidden_size, proj_size, batch
    cap = resident_limit(nthreads, regs, dev)
    reasons = []
    if blocks is None:
        f = search(G, H, R, B, dtype, cap, dev, nthreads, batch_tile)
    else:
        f = fit_at(G, H, R, B, dtype, blocks, cap, dev, nthreads, batch_tile)
        reasons.append(f"blocks={blocks} forced by the caller")
    fails = failures(f, cap, nthreads, regs, dev)
    itemsize = ITEMSIZE[dtype]
    timing = cost.timing_for(dev)
    predicted = family.predict(
        lambda d: stepwise_step(d, G, H, R, B, itemsize, dev, timing),
        lambda d: persistent_step(d, G, H, R, B, itemsize, f, dev, timing), fails, timing)
    if fails:
        path = "stepwise"
        reasons += fails
        reasons.append("stepwise: per step the GEMMs re-read W_hh and W_hr "
                       f"({kb((G * H * R + R * H) * itemsize)}) around the pointwise kernel")
    else:
        path = "persistent"
        w = (G * f.units * R + f.feats * H) * itemsize
        reasons.append(f"W_hh rows of {f.units} units x {G} gates (R={R}) and W_hr rows of "
                       f"{f.feats} features (H={H}) = {kb(w)} stay in shared memory; forward "
                       f"needs {kb(f.fwd)}, backward {kb(f.bwd)} per block (batch tile "
                       f"{f.tile}), within the {kb(dev.smem_per_block_optin)} opt-in limit")
        reasons.append(f"grid of P={f.blocks} blocks <= cooperative limit {f.coop}; two grid "
                       f"barriers per step (the cell, then the projection)")
        if f.smem > 48 * KB and not dev.simulator:
            reasons.append("shared memory above 48 KB per block: the launch opts in")
    if predicted is not None:
        path, line = family.model_choice(predicted, path,
                                         blocks is not None or batch_tile is not None,
                                         both_first=True)
        reasons.append(line)
    return Plan(cell=cell, input_size=input_size, hidden_size=H, proj_size=R, batch=B,
                dtype=dtype, device=dev, path=path, blocks=f.blocks, threads=nthreads,
                units_per_block=f.units, feats_per_block=f.feats, batch_tile=f.tile,
                smem_bytes_fwd=f.fwd, smem_bytes_bwd=f.bwd, blocks_per_sm=f.per_sm,
                max_cooperative_blocks=f.coop, regs_per_thread=regs, persistent_fits=not fails,
                failures=tuple(fails), reasons=tuple(reasons), predicted=predicted)


def capacity(cell, dtype="float32", device="H100", batch=1, *, proj_size=None, ratio=None,
             threads=None, regs_per_thread=None) -> int:
    """The largest hidden size H the persistent projection kernels fit (0 if none), with a
    fixed proj_size R (H > R), or with R = max(1, H // ratio). Exactly one of proj_size and
    ratio. Feasibility falls with H (every region grows with H at a fixed or proportional R
    once the grid is full), so a doubling and a bisection find the edge."""
    if (proj_size is None) == (ratio is None):
        raise ValueError("pass exactly one of proj_size and ratio")
    if cell not in kproj.GATES:
        raise ValueError(f"cell must be one of {kproj.CELLS}; got {cell!r}")
    dtype, dev, nthreads, regs = _resolve(batch, dtype, device, threads, regs_per_thread)
    G = kproj.GATES[cell]
    cap = resident_limit(nthreads, regs, dev)
    if proj_size is not None:
        check_int("proj_size", proj_size)
        lo_h = proj_size + 1
    else:
        check_int("ratio", ratio, 2)
        lo_h = 2

    def fits(H):
        R = proj_size if proj_size is not None else max(1, H // ratio)
        f = search(G, H, R, batch, dtype, cap, dev, nthreads)
        return not failures(f, cap, nthreads, regs, dev)

    return family.largest(fits, lo_h)


def step_traffic(p: Plan, path: Optional[str] = None, *, training: bool = True) -> dict:
    """Global-memory bytes of one forward step of `path` (default p.path): {path, bytes
    (name -> bytes), global_bytes, launches}. Both paths read Gx_t and c_{t-1}, write c_t,
    h_t, y_t and (training) the gates; the persistent path writes m (B*H) and every block
    stages all of h_{t-1} (P*B*R) and all of m (P*B*H) through L2, its weights in shared
    memory; the stepwise path's GEMMs read W_hh, W_hr, h_{t-1}, m and write Gh and h_proj,
    which the pointwise kernel and the masking read back."""
    if not isinstance(p, Plan):
        raise TypeError(f"p must be a gpurnn.planning.projection.Plan; got {type(p).__name__}")
    path = family.traffic_path(p, path)
    s, G, H, R, B = p.itemsize, p.gates, p.hidden_size, p.proj_size, p.batch
    common = {"read gx_t": B * G * H * s, "read c_prev": B * H * s, "write c_t": B * H * s,
              "write h_t": B * R * s, "write y_t": B * R * s,
              "write gates": B * G * H * s if training else 0, "write m": B * H * s}
    if path == "persistent":
        extra = {"stage h_prev (every block)": p.blocks * B * R * s,
                 "stage m (every block)": p.blocks * B * H * s}
        launches = 1
    else:
        extra = {"gemm read w_hh": G * H * R * s, "gemm read h_prev": B * R * s,
                 "gemm write gh": B * G * H * s, "pointwise read gh": B * G * H * s,
                 "gemm read w_hr": R * H * s, "gemm read m": B * H * s,
                 "gemm write h_proj": B * R * s, "masking read h_proj, h_prev": 2 * B * R * s}
        launches = STEPWISE_LAUNCHES["fwd"]
    return family.traffic(path, common, extra, None, launches)


__all__ = ["Plan", "plan", "capacity", "step_traffic", "persistent_step", "stepwise_step"]
