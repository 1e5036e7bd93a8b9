"""What the kernel families' plans share (the mLSTM, the LayerNormLSTM, the projection, the layer
wavefront): the plan dataclass of a one-layer family, the argument checks, the fit of a grid
from a family's shared-memory model, the capacity bisection, the path choice by the step-time
model and the reasons every family gives. Each family's module keeps what is its own (its
shared-memory model, its step-time model, its reasons' wording).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..kernels.dtypes import ITEMSIZE
from ..kernels.layout import units_per_block
from . import cost, grid
from .capacity import Fit, check_int, kb, resident_limit, resolve
from .profiles import KB, DeviceProfile

PATHS = ("persistent", "stepwise")
SMEM_OPT_IN = ("shared memory above 48 KB per block: the launch opts in with "
               "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)")


@dataclass(frozen=True)
class FamilyPlan:
    """The path for one layer and direction of a one-layer kernel family, and why (fields as
    gpurnn.planning.Plan); a family's plan subclasses it with its `cell` default."""
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

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    def __str__(self):
        head = (f"{self.cell} H={self.hidden_size} I={self.input_size} B={self.batch} "
                f"{self.dtype} on {self.device.name}: {self.path}")
        return explained(head, self.reasons)


def explained(head, reasons):
    """A plan's text: its head line, then one indented line per reason."""
    return "\n".join([head] + [f"  - {r}" for r in reasons])


def check_forced(batch, blocks=None, batch_tile=None):
    """The checks of a forced grid size and batch tile (either may be None)."""
    if blocks is not None:
        check_int("blocks", blocks)
    if batch_tile is not None:
        check_int("batch_tile", batch_tile)
        if batch_tile > batch:
            raise ValueError(f"batch_tile must be <= batch ({batch}); got {batch_tile}")


def resolve_family(name, dtypes, batch, dtype, device, threads, regs_per_thread):
    """(dtype name, device profile, threads, registers per thread): the dtype one of the
    family's `dtypes`, then the plain LSTM's checks of batch, device, threads and registers."""
    dname = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or dtype
    if dname not in dtypes:
        raise ValueError(f"dtype must be one of {dtypes} for the {name}; got {dtype!r}")
    return resolve("lstm", batch, dname, device, threads, regs_per_thread)


def per_sm(cap, dev, fwd, bwd):
    """Resident blocks per SM at fwd / bwd bytes of shared memory per block (at most cap)."""
    return min(cap, dev.smem_per_sm // (max(fwd, bwd) + dev.smem_reserved_per_block))


def fit_tile(smem_bytes, hidden, dtype, blocks, cap, dev, threads, tile):
    """The Fit of a grid of `blocks` blocks staging `tile` rows, by a family's shared-memory
    model smem_bytes(direction, hidden, tile, units, dtype, threads=)."""
    units = units_per_block(hidden, blocks)
    fwd = smem_bytes("fwd", hidden, tile, units, dtype, threads=threads)
    bwd = smem_bytes("bwd", hidden, tile, units, dtype, threads=threads)
    k = per_sm(cap, dev, fwd, bwd)
    return Fit(blocks, units, fwd, bwd, k, k * dev.sm_count, tile)


def fit_at(smem_bytes, hidden, batch, dtype, blocks, cap, dev, threads, tile=None):
    """The fit of a P = blocks grid: with `tile` if given, else the largest tile that fits (the
    whole batch first), else the one-row attempt (which says why nothing fits)."""
    return grid.best_tile(lambda t: fit_tile(smem_bytes, hidden, dtype, blocks, cap, dev,
                                             threads, t), batch, dev, tile)


def search(smem_bytes, hidden, batch, dtype, cap, dev, threads, tile=None):
    """planning.grid.search's grid (smallest slice per block that fits) for a family's
    shared-memory model."""
    return grid.search(lambda blocks, t: fit_at(smem_bytes, hidden, batch, dtype, blocks, cap,
                                                dev, threads, t), hidden, batch, cap, dev, tile)


def largest(fits, lo=1):
    """The largest n >= lo with fits(n) (0 if not even lo): feasibility falls monotonically,
    so a doubling and a bisection find the edge."""
    if not fits(lo):
        return 0
    lo, hi = lo, 2 * lo
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def forced_reasons(blocks, batch_tile, what=""):
    """The reasons of a caller's forced grid size and batch tile."""
    out = []
    if blocks is not None:
        out.append(f"blocks={blocks}{what} forced by the caller")
    if batch_tile is not None:
        out.append(f"batch_tile={batch_tile} forced by the caller")
    return out


def predict(stepwise_step, persistent_step, failures, timing):
    """{"stepwise": (fwd, bwd), "persistent": (fwd, bwd) where it fits} of StepTime from the
    family's step models (each called with the direction); None without a timing."""
    if timing is None:
        return None
    predicted = {"stepwise": tuple(stepwise_step(d) for d in ("fwd", "bwd"))}
    if not failures:
        predicted["persistent"] = tuple(persistent_step(d) for d in ("fwd", "bwd"))
    return predicted


def model_choice(predicted, path, forced, both_first=False):
    """(path, the model's reason line): stepwise where the model predicts it faster and nothing
    was forced. both_first: the line names the persistent prediction first."""
    sw = sum(p.total for p in predicted["stepwise"])
    line = f"step-time model (unmeasured): stepwise {sw * 1e6:.2f} us per fwd+bwd step"
    if "persistent" in predicted:
        pe = sum(p.total for p in predicted["persistent"])
        if both_first:
            line = (f"step-time model (unmeasured): persistent {pe * 1e6:.2f} us, stepwise "
                    f"{sw * 1e6:.2f} us per fwd+bwd step")
        else:
            line += f", persistent {pe * 1e6:.2f} us"
        if sw < pe and not forced:
            path = "stepwise"
            line += "; stepwise is predicted faster, so it runs"
    return path, line


def persistent_reasons(f, batch, dev, weights, barriers):
    """The reasons of a family's persistent configuration f: its weight slices (`weights`, the
    text naming them), the shared memory and the grid (`barriers`: why the grid syncs)."""
    out = [f"{weights} stay in shared memory, staging {f.tile} of {batch} rows at once; forward "
           f"needs {kb(f.fwd)}, backward {kb(f.bwd)} per block, within the "
           f"{kb(dev.smem_per_block_optin)} opt-in limit of {dev.name}",
           f"grid of P={f.blocks} blocks <= cooperative limit {f.coop}; {barriers}"]
    if f.smem > 48 * KB and not dev.simulator:
        out.append(SMEM_OPT_IN)
    return out


def plan_layer(plan_cls, fam, input_size, hidden_size, batch, dtype, device, blocks, threads,
               regs_per_thread, batch_tile):
    """A one-layer family's plan: the persistent grid (fam.search / fam.fit_at), why it cannot
    run (fam.failures), the step-time model of both paths (fam.stepwise_step,
    fam.persistent_step) and the reasons (fam.stepwise_reason(H, itemsize),
    fam.persistent_reasons(f, H, batch, itemsize, dev)); fam is the family's module (NAME,
    DTYPES)."""
    check_int("input_size", input_size)
    check_int("hidden_size", hidden_size)
    dtype, dev, threads, regs = fam._resolve(batch, dtype, device, threads, regs_per_thread)
    check_forced(batch, blocks, batch_tile)
    H, itemsize = hidden_size, ITEMSIZE[dtype]
    cap = resident_limit(threads, regs, dev)
    if blocks is None:
        f = fam.search(H, batch, dtype, cap, dev, threads, batch_tile)
    else:
        f = fam.fit_at(H, batch, dtype, blocks, cap, dev, threads, batch_tile)
    reasons = forced_reasons(blocks, batch_tile)
    failures = fam.failures(f, cap, threads, regs, dev)
    timing = cost.timing_for(dev)
    predicted = predict(lambda d: fam.stepwise_step(d, H, batch, itemsize, dev, timing),
                        lambda d: fam.persistent_step(d, H, batch, itemsize, f, dev, timing),
                        failures, timing)
    if failures:
        path = "stepwise"
        reasons += failures
        reasons.append(fam.stepwise_reason(H, itemsize))
    else:
        path = "persistent"
        reasons += fam.persistent_reasons(f, H, batch, itemsize, dev)
    if predicted is not None:
        path, line = model_choice(predicted, path, blocks is not None or batch_tile is not None)
        reasons.append(line)
    return plan_cls(input_size=input_size, hidden_size=H, batch=batch, dtype=dtype, device=dev,
                    path=path, blocks=f.blocks, threads=threads, units_per_block=f.units,
                    smem_bytes_fwd=f.fwd, smem_bytes_bwd=f.bwd, blocks_per_sm=f.per_sm,
                    max_cooperative_blocks=f.coop, regs_per_thread=regs, batch_tile=f.tile,
                    persistent_fits=not failures, reasons=tuple(reasons), predicted=predicted)


def layer_capacity(fam, dtype, device, batch, threads, regs_per_thread):
    """The largest H a one-layer family's persistent kernels fit (0 if none)."""
    dtype, dev, threads, regs = fam._resolve(batch, dtype, device, threads, regs_per_thread)
    cap = resident_limit(threads, regs, dev)
    return largest(lambda h: not fam.failures(fam.search(h, batch, dtype, cap, dev, threads),
                                              cap, threads, regs, dev))


def capacity_table(fam, devices, batches):
    """Text: a one-layer family's capacity beside the plain LSTM's, per device, dtype, batch."""
    from .capacity import capacity as lstm_capacity
    w = len(fam.NAME)
    lines = [f"device  dtype    batch  {fam.NAME}  lstm"]
    for d in devices:
        for dt in fam.DTYPES:
            for b in batches:
                lines.append(f"{d:<7} {dt:<8} {b:>5}  {fam.capacity(dt, d, b):>{w}}  "
                             f"{lstm_capacity('lstm', dt, d, b):>4}")
    return "\n".join(lines)


def traffic_path(p, path):
    """step_traffic's path: p.path by default, else 'persistent' or 'stepwise'."""
    path = p.path if path is None else path
    if path not in PATHS:
        raise ValueError(f"path must be 'persistent', 'stepwise' or None; got {path!r}")
    return path


def traffic(path, common, per_path, dram, launches, **more):
    """step_traffic's result from the bytes both paths move (common), the path's own
    (per_path) and its DRAM share (dram)."""
    breakdown = {k: v for k, v in {**common, **per_path}.items() if v}
    out = {"path": path, "bytes": breakdown, "global_bytes": sum(breakdown.values())}
    if dram is not None:
        out["dram_bytes"] = sum(common.values()) + sum(dram.values())
    out["launches"] = launches
    out.update(more)
    return out


__all__ = ["FamilyPlan", "explained", "check_forced", "resolve_family", "per_sm", "fit_tile",
           "fit_at", "search", "largest", "forced_reasons", "predict", "model_choice",
           "persistent_reasons", "plan_layer", "layer_capacity", "capacity_table",
           "traffic_path", "traffic", "SMEM_OPT_IN", "PATHS"]
