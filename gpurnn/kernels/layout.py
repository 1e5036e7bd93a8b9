"""The persistent kernels' resource contract, shared by the kernels, the plan and the static
checks (one place, so the plan's capacity model and the kernels cannot drift apart).

Persistent forward: block j of P owns the contiguous unit slice U_j = [j*U, min((j+1)*U, H))
with U = units_per_block = ceil(H / P). Its dynamic shared memory holds
    w_slice   G*U*H   rows of W_hh for every gate of its units (loaded once per launch)
    h_prev    B*H     the step's input state
    pre       B*G*U   the step's recurrent pre-activations for its units
Persistent backward: block j keeps the columns W_hh[:, U_j] and stages the step's recurrent
gate gradients of every unit:
    w_cols    G*H*U
    dgates    B*G*H
All in the compute dtype (float32 or float64). Threads per block is a launch parameter
(a multiple of 32, 32..1024); kernels loop with a block stride, so any such value is correct.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


# Registers per thread every kernel is held to (tests/test_static_compile.py checks the ptxas
# counts against it). The plan refuses block sizes that would leave a thread fewer: with ~100
# registers in use, a 1024-thread persistent block cannot launch at all.
KERNEL_REGS_MAX = 128


def units_per_block(hidden: int, blocks: int) -> int:
    return -(-hidden // blocks)


def smem_elements(direction: str, gates: int, hidden: int, batch: int, units: int) -> int:
    """Elements of dynamic shared memory one persistent block needs ('fwd' or 'bwd')."""
    if direction == "fwd":
        return gates * units * hidden + batch * hidden + batch * gates * units
    if direction == "bwd":
        return gates * hidden * units + batch * gates * hidden
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


def smem_bytes(direction: str, gates: int, hidden: int, batch: int, units: int, itemsize: int) -> int:
    return smem_elements(direction, gates, hidden, batch, units) * itemsize


@dataclass(frozen=True)
class KernelSpec:
    """One compiled specialization, as the static checks and the compile cache see it."""
    name: str              # e.g. "lstm_persistent_fwd_f32"
    func: Callable         # the Python kernel function (undecorated or cuda.jit-able)
    signature: Any         # numba signature, e.g. void(float32[:, :, ::1], ..., int32)
    cell: str              # gpurnn.cells name
    kind: str              # persistent_fwd | persistent_bwd | pointwise_fwd | pointwise_bwd
    dtype: str             # float32 | float64
    grid_sync: bool        # uses grid.sync(): link with cudadevrt, launch cooperatively
