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

import functools
import sys
from dataclasses import dataclass
from typing import Optional

from ..kernels import mlstm as kernels
from . import cost, family
from .capacity import kb, persistent_failures

NAME = kernels.CELL
DTYPES = kernels.DTYPES
GATES = kernels.GATES


@dataclass(frozen=True)
class MLSTMPlan(family.FamilyPlan):
    """The path for one mLSTM layer and direction, and why (fields as gpurnn.planning.Plan)."""
    cell: str = kernels.CELL


# the mLSTM's grid: planning.family's fit_at and search by kernels/mlstm.py's smem_bytes
fit_at = functools.partial(family.fit_at, kernels.smem_bytes)
search = functools.partial(family.search, kernels.smem_bytes)
_resolve = functools.partial(family.resolve_family, NAME, DTYPES)
failures = persistent_failures      # the plain cells' reasons: the mLSTM adds none
_FAMILY = sys.modules[__name__]      # what family.plan_layer and layer_capacity call


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


def stepwise_reason(H, itemsize):
    return (f"stepwise: per step two GEMMs re-read W_mh and W_hh "
            f"({kb(5 * H * H * itemsize)}) and pointwise kernels")


def persistent_reasons(f, H, batch, itemsize, dev):
    w = 5 * f.units * H * itemsize
    return family.persistent_reasons(
        f, batch, dev, f"W_mh and W_hh slices of {f.units} units (5 x {f.units} x H={H} = "
        f"{kb(w)})", "two grid barriers per step (m needs all of h, the gates all of m)")


def plan(input_size, hidden_size, batch, dtype="float32", device=None, *, blocks=None,
         threads=None, regs_per_thread=None, batch_tile=None) -> MLSTMPlan:
    """The persistent or the stepwise path for one mLSTM layer and direction (arguments as
    gpurnn.planning.plan's, without the cell)."""
    return family.plan_layer(MLSTMPlan, _FAMILY, input_size, hidden_size, batch,
                             dtype, device, blocks, threads, regs_per_thread, batch_tile)


def capacity(dtype="float32", device="H100", batch=1, *, threads=None,
             regs_per_thread=None) -> int:
    """The largest H the persistent mLSTM fits on `device` (0 if none); feasibility falls
    monotonically with H, so a bisection finds the edge (as planning.capacity.capacity)."""
    return family.layer_capacity(_FAMILY, dtype, device, batch, threads,
                                 regs_per_thread)


def capacity_table(devices=("H100", "A100"), batches=(1, 8)):
    """Text: the mLSTM's capacity beside the plain LSTM's, per device, dtype and batch."""
    return family.capacity_table(_FAMILY, devices, batches)


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
    path = family.traffic_path(p, path)
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
    return family.traffic(path, common, per_path, dram, launches, weight_bytes=5 * H * H * s)


__all__ = ["MLSTMPlan", "plan", "capacity", "capacity_table", "step_traffic"]
