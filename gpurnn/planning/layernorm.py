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

import functools
import sys
from dataclasses import dataclass
from typing import Optional

from ..kernels import layernorm as kernels
from ..kernels.layout import KERNEL_REGS_MAX as KERNEL_REGS_MAX_PLAIN
from . import cost, family
from .capacity import kb, persistent_failures

NAME = kernels.CELL
DTYPES = kernels.DTYPES
GATES = kernels.GATES
GRID_BARRIERS_PER_STEP = 2
# Registers per thread the persistent LayerNormLSTM kernels are held to (ptxas, sm_80/sm_90,
# tests/test_sim_layernorm.py): above the plain kernels' layout.KERNEL_REGS_MAX (192), as the
# layer norm's statistics, staging and row sums add to the plain step's working set. A block
# size that leaves a thread fewer is refused (at most 288 threads per block).
KERNEL_REGS = 224


@dataclass(frozen=True)
class LayerNormPlan(family.FamilyPlan):
    """The path for one LayerNormLSTM layer and direction, and why (fields as
    gpurnn.planning.Plan)."""
    cell: str = kernels.CELL


# this kernel's grid: planning.family's fit_at and search by its smem_bytes
fit_at = functools.partial(family.fit_at, kernels.smem_bytes)
search = functools.partial(family.search, kernels.smem_bytes)
_resolve = functools.partial(family.resolve_family, NAME, DTYPES)


def failures(f, cap, threads, regs, dev):
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


def stepwise_reason(H, itemsize):
    return (f"stepwise: per step a GEMM re-reads W_hh ({kb(4 * H * H * itemsize)}), "
            f"the host forms the row statistics, two pointwise kernels")


def persistent_reasons(f, H, batch, itemsize, dev):
    w = 4 * f.units * H * itemsize
    return family.persistent_reasons(
        f, batch, dev, f"W_hh slices of {f.units} units (4 x {f.units} x H={H} = {kb(w)})",
        "two grid barriers per step (the LN statistics of the gates and of c~ span every "
        "block: per-block partials, a barrier, a fixed-order sum)")


_FAMILY = sys.modules[__name__]      # what family.plan_layer and layer_capacity call


def plan(input_size, hidden_size, batch, dtype="float32", device=None, *, blocks=None,
         threads=None, regs_per_thread=None, batch_tile=None) -> LayerNormPlan:
    """The persistent or the stepwise path for one LayerNormLSTM layer and direction
    (arguments as gpurnn.planning.plan's, without the cell)."""
    return family.plan_layer(LayerNormPlan, _FAMILY, input_size, hidden_size, batch, dtype,
                             device, blocks, threads, regs_per_thread, batch_tile)


def capacity(dtype="float32", device="H100", batch=1, *, threads=None,
             regs_per_thread=None) -> int:
    """The largest H the persistent LayerNormLSTM fits on `device` (0 if none); feasibility
    falls monotonically with H, so a bisection finds the edge (as planning.capacity.capacity)."""
    return family.layer_capacity(_FAMILY, dtype, device, batch, threads, regs_per_thread)


def capacity_table(devices=("H100", "A100"), batches=(1, 8)):
    """Text: the LayerNormLSTM's capacity beside the plain LSTM's, per device, dtype and batch."""
    return family.capacity_table(_FAMILY, devices, batches)


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
    path = family.traffic_path(p, path)
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
    return family.traffic(path, common, per_path, dram, launches, weight_bytes=4 * H * H * s)


__all__ = ["LayerNormPlan", "plan", "capacity", "capacity_table", "step_traffic",
           "GRID_BARRIERS_PER_STEP", "KERNEL_REGS"]
