"""The persistent kernels' resource contract, shared by the kernels, the plan and the static
checks (one place, so the plan's capacity model and the kernels cannot drift apart).

Persistent forward: block j of P owns the contiguous unit slice U_j = [j*U, min((j+1)*U, H))
with U = units_per_block = ceil(H / P). The batch is processed in tiles of bt <= B rows (the
plan's batch_tile), so the batch never sets the capacity. Its dynamic shared memory holds
    w_slice   G*U*S   rows of W_hh for every gate of its units (loaded once per launch), each
                      row padded to S = padded_row(H, L) >= H
    h_prev    bt*H    the tile's input state
    pre       bt*G*U  the tile's recurrent pre-activations for the block's units
Persistent backward: block j keeps the columns W_hh[:, U_j] (one padded row per unit) and
stages the tile's recurrent gate gradients of every unit:
    w_cols    U*S     S = padded_row(G*H, L)
    dgates    bt*G*H
Both also hold
    scratch   threads one partial sum per thread
because every dot product (length H forward, G*H backward) is split over a group of L lanes
(L a power of two <= 32, as many as the block's threads allow for its outputs) whose partial
sums meet in `scratch` and are added in a fixed order — the short serial chains keep small
batches fast and the reduction stays deterministic without atomics or warp shuffles (which
Numba's simulator lacks).
The weight slice is in the storage dtype (16-bit for float16/bfloat16: half the bytes per
weight), everything after it in the compute dtype (gpurnn.kernels.dtypes), starting at the
first compute-aligned element past the slice. Threads per block is a launch parameter (a
multiple of 32, 32..1024); kernels loop with a block stride, so any such value is correct.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


# Registers per thread every kernel is held to (tests/test_static_compile.py checks the ptxas
# counts against it). The plan refuses block sizes that would leave a thread fewer: with up to
# ~170 registers in use (sm_80 unrolls the split dot products), a persistent block of more than
# 320 threads could not launch. The plan's default is 256 threads (a budget of 255).
KERNEL_REGS_MAX = 192


# Bits of the `noise` flags the regularised kernels take (gpurnn/layernorm.py's contract):
# which of the masks is on; the arrays of the others are placeholders and never read.
NOISE_REC, NOISE_ZH, NOISE_ZC = 1, 2, 4
# the cells with a regularised specialization (zoneout, variational recurrent dropout)
REGULARISED_CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")


def noise_flags(noise) -> int:
    """The kernels' NOISE_* flags for a noise dict (None or {}: 0)."""
    if not noise:
        return 0
    return ((NOISE_REC if "recurrent" in noise else 0) | (NOISE_ZH if "zoneout_h" in noise else 0)
            | (NOISE_ZC if "zoneout_c" in noise else 0))


def units_per_block(hidden: int, blocks: int) -> int:
    return -(-hidden // blocks)


def _regions(direction, gates, hidden, batch_tile, units, threads):
    """(weight elements, compute elements) of one persistent block's shared memory."""
    if direction == "fwd":
        row = padded_row(hidden, lanes_per_output(batch_tile * gates * units, threads))
        return gates * units * row, batch_tile * hidden + batch_tile * gates * units + threads
    if direction == "bwd":
        row = padded_row(gates * hidden, lanes_per_output(batch_tile * units, threads))
        return units * row, batch_tile * gates * hidden + threads
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")


def smem_elements(direction: str, gates: int, hidden: int, batch_tile: int, units: int, *,
                  threads: int) -> int:
    """Elements of dynamic shared memory one persistent block needs ('fwd' or 'bwd') when the
    batch is staged batch_tile rows at a time and weights and compute share one dtype."""
    w, rest = _regions(direction, gates, hidden, batch_tile, units, threads)
    return w + rest


def padded_row(length: int, lanes: int) -> int:
    """Shared-memory row stride of a weight slice: the smallest S >= length with
    S = lanes (mod 32). A warp holds 32 / lanes groups on consecutive rows, each group's lanes
    on consecutive elements, so word (q*S + lane) falls in bank (q*lanes + lane) mod 32:
    all distinct, no bank conflicts (with lanes = 1, consecutive threads on consecutive rows)."""
    return length + (lanes - length % 32 + 32) % 32


def smem_bytes(direction: str, gates: int, hidden: int, batch_tile: int, units: int,
               itemsize: int, *, threads: int, weight_itemsize: int = None) -> int:
    """Bytes of dynamic shared memory: the weight slice at weight_itemsize (default itemsize),
    padded to a compute element, then the compute regions at itemsize (the compute dtype's)."""
    w, rest = _regions(direction, gates, hidden, batch_tile, units, threads)
    wi = itemsize if weight_itemsize is None else weight_itemsize
    return -(-w * wi // itemsize) * itemsize + rest * itemsize


def smem_bytes_for(direction: str, gates: int, hidden: int, batch_tile: int, units: int,
                   dtype: str, *, threads: int) -> int:
    """smem_bytes for a storage dtype name (gpurnn.kernels.dtypes)."""
    from .dtypes import COMPUTE, ITEMSIZE
    return smem_bytes(direction, gates, hidden, batch_tile, units, ITEMSIZE[COMPUTE[dtype]],
                      threads=threads, weight_itemsize=ITEMSIZE[dtype])


def batch_tiles(batch: int, batch_tile: int) -> int:
    """Tiles a step of `batch` rows takes at `batch_tile` rows each."""
    return -(-batch // batch_tile)


def lanes_per_output(outputs: int, threads: int) -> int:
    """L: lanes that share one dot product — the largest power of two <= 32 with
    outputs * L <= threads (1 when the outputs alone fill the block). The kernels compute the
    same value on the device; it only depends on the launch, so results are reproducible."""
    lanes = 1
    while lanes < 32 and 2 * lanes * outputs <= threads:
        lanes *= 2
    return lanes


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
    regularised: bool = False   # the specialization with zoneout / recurrent dropout masks
