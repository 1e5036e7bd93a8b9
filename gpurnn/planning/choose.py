"""Which path runs a layer, and why: plan() tries the persistent configuration (capacity.py),
asks the step-time model (cost.py) for both paths, and returns a Plan with its reasons.

Where the persistent configuration does not fit, the layer runs stepwise: per step one GEMM +
one pointwise kernel. Where both fit, the faster predicted path runs.

    >>> p = plan("lstm", 256, 512, 8, device="H100")
    >>> p.path, p.blocks, p.units_per_block
    ('persistent', 128, 4)
    >>> p.reasons[2]
    'shared memory above 48 KB per block: the launch opts in with cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)'

`print(p)` explains the choice in a few lines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..cells import GATES, PEEPHOLES, RESERVE_GATES
from ..kernels.dtypes import ITEMSIZE
from ..kernels.layout import batch_tiles
from . import cost
from .capacity import (check_cell, check_int, fit_at, kb, persistent_failures, resident_limit,
                       resolve, search)
from .profiles import KB, DeviceProfile


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
    # predicted seconds per step (planning.cost): {"persistent": (fwd, bwd), "stepwise": (fwd,
    # bwd)} of StepTime; None on the simulator profile (no timing) or where a path cannot run
    predicted: Optional[dict] = None
    # the regularisers the predictions and step_traffic count (gpurnn/layernorm.py's keys)
    noise: tuple = ()

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


def plan(cell, input_size, hidden_size, batch, dtype="float32", device=None, *, blocks=None,
         threads=None, regs_per_thread=None, batch_tile=None, noise=None) -> Plan:
    """Choose the persistent or the stepwise path for one layer and direction.

    cell: one of gpurnn.cells.ALL_CELLS (the torch-facing cells and the kernel-only LSTM
    variants lstm_peephole, cifg, cifg_peephole: G = 4, 3, 3 gates of W_hh in shared memory;
    the peephole vectors are read from global memory and set no capacity). dtype: "float32" | "float64" (or the NumPy dtype).
    device: a profile name (see PROFILES), a DeviceProfile, or None for the current device.
    blocks: force the persistent grid size P (still checked: a grid that cannot be co-resident
    is never planned; the plan falls back to stepwise and says why).
    threads: threads per block (multiple of 32); default 256 on GPUs, 32 for "sim".
    regs_per_thread: the register budget per thread to assume; default what one block per SM
    allows (min(255, 65536 / threads)), so by default one block per SM is resident. A backend
    holding the compiled kernel may pass its real count to allow more resident blocks.
    batch_tile: force the rows of the batch a persistent block stages at once (1..batch);
    default the whole batch if it fits, else the largest tile that does.
    noise: the regularisers that will be on (a noise dict or its keys: 'recurrent',
    'zoneout_h', 'zoneout_c'); the step model counts their mask reads (Plan.noise keeps them).
    They take no shared memory, so they change no capacity.

    The persistent path fits iff the forward and backward shared memory per block fit the
    opt-in limit and P does not exceed SMs x resident blocks per SM (residency from shared
    memory, threads and registers), with threads within the device's limits. Where both paths
    can run, the step-time model (planning.cost) picks the one it predicts faster, and the plan
    prints both predictions; a forced `blocks` or `batch_tile` keeps the persistent path.
    """
    check_cell(cell)
    check_int("input_size", input_size)
    check_int("hidden_size", hidden_size)
    dtype, dev, nthreads, regs = resolve(cell, batch, dtype, device, threads, regs_per_thread)
    if blocks is not None:
        check_int("blocks", blocks)
    if batch_tile is not None:
        check_int("batch_tile", batch_tile)
        if batch_tile > batch:
            raise ValueError(f"batch_tile must be <= batch ({batch}); got {batch_tile}")
    keys = tuple(sorted(cost._noise_keys(noise)))
    return _plan(cell, input_size, hidden_size, batch, dtype, dev, blocks, nthreads, regs,
                 batch_tile, keys)


def _plan(cell, input_size, hidden, batch, dtype, dev, blocks, threads, regs, tile, noise=()):
    gates = GATES[cell]
    itemsize = ITEMSIZE[dtype]
    cap = resident_limit(threads, regs, dev)
    reasons = []
    if blocks is None:
        f = search(gates, hidden, batch, dtype, cap, dev, threads, tile)
    else:
        f = fit_at(gates, hidden, batch, dtype, blocks, cap, dev, threads, tile)
        reasons.append(f"blocks={blocks} forced by the caller")
        used = -(-hidden // f.units)
        if used < blocks:
            idle = blocks - used
            reasons.append(f"{idle} of the {blocks} blocks own{'s' if idle == 1 else ''} no unit "
                           f"(U={f.units} covers H={hidden} with {used}) and only join"
                           f"{'s' if idle == 1 else ''} the grid barriers")
    if tile is not None:
        reasons.append(f"batch_tile={tile} forced by the caller")

    failures = persistent_failures(f, cap, threads, regs, dev)
    limit = dev.smem_per_block_optin
    timing = cost.timing_for(dev)
    predicted = None
    if timing is not None:
        predicted = {"stepwise": tuple(cost.stepwise_step(d, gates, hidden, batch, itemsize,
                                                          dev.l2_bytes, dev, timing, noise=noise)
                                       for d in ("fwd", "bwd"))}
        if not failures:
            predicted["persistent"] = tuple(
                cost.persistent_step(d, gates, hidden, batch, itemsize, f.blocks, f.units, f.tile,
                                     RESERVE_GATES[cell], dev, timing,
                                     peepholes=PEEPHOLES.get(cell, 0), noise=noise)
                for d in ("fwd", "bwd"))

    if failures:
        path = "stepwise"
        reasons += failures
        reasons.append(f"stepwise: per step one GEMM re-reads W_hh ({kb(gates * hidden * hidden * itemsize)}) "
                       f"and one pointwise kernel ({threads} threads per block)")
    else:
        path = "persistent"
        w = gates * f.units * hidden * itemsize
        staged = "the whole batch" if f.tile == batch else f"the batch in tiles of {f.tile} rows"
        reasons.append(f"W_hh slice of {f.units} units x {gates} gates x H={hidden} = {kb(w)} stays in "
                       f"shared memory, staging {staged}; forward needs {kb(f.fwd)}, backward "
                       f"{kb(f.bwd)} per block, within the {kb(limit)} opt-in limit of {dev.name} "
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
                batch_tile=f.tile, predicted=predicted, persistent_fits=not failures,
                noise=noise)


__all__ = ["Plan", "plan"]
